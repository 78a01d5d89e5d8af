"""The map scores on hand-made maps: each responds to its cue and ignores the others."""

import importlib

import pytest
import torch

from lightning_saliency.evaluate.scores import (
    border_enrichment,
    consensus,
    corner_enrichment,
    dead_maps,
    downsample_for_drift,
    enrichment,
    map_scores,
    object_energy,
    pointing_game,
    pointing_tolerance,
    rank_accuracy,
    spearman,
)


def blob(n: int, size: int, top: int, left: int, side: int = 4) -> torch.Tensor:
    maps = torch.zeros(n, size, size)
    maps[:, top : top + side, left : left + side] = 1.0
    return maps


def test_spearman_sees_ordering_not_scale():
    maps = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(spearman(maps, maps.pow(3) * 10), torch.ones(3), atol=1e-5)
    assert torch.allclose(spearman(maps, -maps), -torch.ones(3), atol=1e-5)
    assert torch.equal(spearman(torch.zeros(2, 8, 8), maps[:2, :8, :8]), torch.zeros(2))


def test_drift_maps_are_at_most_32_pixels_a_side():
    assert downsample_for_drift(torch.rand(2, 96, 64)).shape == (2, 32, 32)
    small = torch.rand(2, 16, 16)
    assert torch.equal(downsample_for_drift(small), small)


def test_object_energy_enrichment_and_rank_accuracy():
    masks = torch.zeros(2, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True  # the object: 1/16 of the image
    inside, uniform = blob(1, 16, 4, 4), torch.ones(1, 16, 16)
    maps = torch.cat([inside, uniform])
    assert object_energy(maps, masks).tolist() == pytest.approx([1.0, 1 / 16])
    assert enrichment(maps, masks).tolist() == pytest.approx([16.0, 1.0])
    assert rank_accuracy(inside, masks[:1]).item() == 1.0
    assert rank_accuracy(blob(1, 16, 10, 10), masks[:1]).item() == 0.0


def test_pointing_game_with_and_without_tolerance():
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[:, 4:8, 4:8] = True
    near = torch.zeros(1, 16, 16)
    near[0, 9, 9] = 1.0  # two pixels off the object's corner
    assert pointing_game(near, masks, tolerance=0).item() == 0.0
    assert pointing_game(near, masks, tolerance=2).item() == 1.0


def test_pointing_tolerance_is_one_cell_of_the_target_layer():
    """Bug: it was width // 8 (6 px at 48 px, where the demo's layer cell is 4 px)."""
    assert pointing_tolerance((48, 48), (12, 12)) == 4
    assert pointing_tolerance((224, 224), (7, 7)) == 32
    assert pointing_tolerance((50, 40), (12, 12)) == 5  # ceil, the larger side
    assert pointing_tolerance((48, 48), None) == 0


def test_pointing_ties_go_to_the_centre_of_the_maxima_not_the_top_left():
    """Bug: argmax took the first maximum in raster order, a bias to the top-left corner
    (where the demo's shortcut sits)."""
    masks = torch.zeros(1, 12, 12, dtype=torch.bool)
    masks[0, 5:7, 5:7] = True  # the object, in the middle
    flat = torch.zeros(1, 12, 12)
    flat[0, 2:10, 2:10] = 1.0  # an upsampled CAM cell: a flat top around the object
    assert pointing_game(flat, masks, tolerance=0).item() == 1.0
    corner = torch.zeros(1, 12, 12, dtype=torch.bool)
    corner[0, 2, 2] = True  # raster order's first maximum
    assert pointing_game(flat, corner, tolerance=0).item() == 0.0


def test_corner_and_border_enrichment_find_a_corner_patch_only():
    corner, centre = blob(1, 24, 0, 0), blob(1, 24, 10, 10)
    assert corner_enrichment(corner).item() > 20
    assert corner_enrichment(centre).item() == 0.0
    assert corner_enrichment(torch.ones(1, 24, 24)).item() == pytest.approx(1.0)
    assert border_enrichment(corner).item() > 1.5 > border_enrichment(centre).item()


def test_consensus_is_high_for_a_fixed_place_and_low_for_moving_objects():
    fixed = blob(4, 32, 0, 0, side=6)
    moving = torch.cat(
        [blob(1, 32, top, left, side=6) for top, left in [(2, 20), (20, 2), (12, 12), (24, 24)]]
    )
    assert consensus(fixed).min() > 0.99
    assert consensus(moving).max() < 0.1
    assert consensus(fixed[:1]).tolist() == [0.0]  # a single map agrees with nobody


def test_signed_maps_count_their_positive_part_unless_told_otherwise():
    """Bug: signed maps were scored by magnitude, undocumented; evidence against the class
    counted as attention on the object."""
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[:, :4] = True
    signed = torch.zeros(1, 8, 8)
    signed[0, 0, 0], signed[0, 7, 7] = -3.0, 1.0
    assert object_energy(signed, masks).item() == 0.0
    assert object_energy(signed, masks, "absolute").item() == pytest.approx(0.75)
    assert map_scores(signed, masks, signed_mass="absolute")["object_energy"].item() == 0.75
    against = -torch.rand(1, 8, 8)  # evidence against the class only: points nowhere
    scores = map_scores(against, masks)
    assert torch.isnan(scores["pointing_game"]).all() and scores["dead_maps"].item() == 0.0


def test_dead_maps_are_left_out_of_localisation_scores():
    maps = torch.cat([blob(1, 16, 0, 0), torch.zeros(1, 16, 16)])
    masks = torch.ones(2, 16, 16, dtype=torch.bool)
    scores = map_scores(maps, masks, previous=maps, first=maps)
    assert dead_maps(maps).tolist() == [0.0, 1.0]
    assert scores["dead_maps"].tolist() == [0.0, 1.0]
    for name in ("object_energy", "pointing_game", "corner_enrichment"):
        assert not torch.isnan(scores[name][0]) and torch.isnan(scores[name][1]), name
    assert scores["drift_prev"][0].item() == pytest.approx(1.0)
    assert {"drift_first", "rank_accuracy", "border_enrichment", "consensus"} <= set(scores)
    assert "object_energy" not in map_scores(maps)  # no masks, no localisation scores


def test_the_docstring_table_gives_the_default_thresholds():
    """Bug: scores.py's docstring gave the corner and consensus thresholds as 5 and 0.5 while
    the defaults were 3.0 and 0.8."""
    import lightning_saliency.evaluate.scores as scores

    shortcut_scores = importlib.import_module("lightning_saliency.evaluate.shortcut_probes")
    strategies = importlib.import_module("lightning_saliency.evaluate.strategies")
    from lightning_saliency.evaluate.alarms import LOW_IS_BAD, default_thresholds

    lines = [
        line
        for module in (scores, shortcut_scores, strategies)
        for line in (module.__doc__ or "").splitlines()
        if line.startswith("``")
    ]
    rows = {line.split()[0].strip("`"): line.split()[-1] for line in lines}
    for name, threshold in default_thresholds().items():
        side = "<" if name in LOW_IS_BAD else ">"
        assert name in rows and rows[name] == f"{threshold:g}", (name, rows.get(name))
        line = next(r for r in lines if r.startswith(f"``{name}``"))
        assert f"{side} {threshold:g}" in line, line
