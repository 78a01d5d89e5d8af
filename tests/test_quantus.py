"""Quantus as the referee: our localisation scores equal Quantus's metrics on the same maps.

Quantus 0.6.0 (dev dependency) is called as a user would, on numpy copies of the same maps and
masks. Its own normalisation is switched off (``normalise=False``): the scores are ratios, so
a positive scale changes neither ours nor theirs, and with it off Quantus reads the maps as
given. Signed maps are handed to Quantus as their positive part where ours counts that part
(the default), and with ``abs=True`` for ``signed_mass="absolute"``.
"""

import warnings

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus")

from lightning_saliency.evaluate.scores import object_energy, pointing_game, rank_accuracy  # noqa: E402


def shapes_masks(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Rectangles of random place and size: the object masks."""
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        h, w = torch.randint(3, size // 2, (2,), generator=generator).tolist()
        masks[i, top : top + h, left : left + w] = True
    return masks


def quantus_scores(metric: object, maps: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    n, h, w = maps.shape
    x = np.zeros((n, 1, h, w), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = metric(  # type: ignore[operator]
            model=None,
            x_batch=x,
            y_batch=np.zeros(n, dtype=np.int64),
            a_batch=maps[:, None].numpy(),
            s_batch=masks[:, None].numpy().astype(np.float32),
            channel_first=True,
        )
    return np.asarray(scores, dtype=np.float64)


def metric(name: str, **kwargs: object) -> object:
    return getattr(quantus, name)(normalise=False, disable_warnings=True, **kwargs)


@pytest.mark.parametrize("signed_mass", ["positive", "absolute"])
def test_object_energy_and_rank_accuracy_equal_quantus(signed_mass: str) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(16, 24, 24, generator=g)  # signed, as IG's
    masks = shapes_masks(16, 24, g)
    given = maps.clamp(min=0) if signed_mass == "positive" else maps
    absolute = signed_mass == "absolute"
    mass = quantus_scores(metric("RelevanceMassAccuracy", abs=absolute), given, masks)
    ranks = quantus_scores(metric("RelevanceRankAccuracy", abs=absolute), given, masks)
    ours_mass = object_energy(maps, masks, signed_mass).numpy()  # type: ignore[arg-type]
    ours_rank = rank_accuracy(maps, masks, signed_mass).numpy()  # type: ignore[arg-type]
    np.testing.assert_allclose(ours_mass, mass, atol=1e-5)
    np.testing.assert_allclose(ours_rank, ranks, atol=1e-6)
    assert mass.std() > 0.02 and ranks.std() > 0.02  # the maps differ: the test can fail


def test_pointing_game_with_no_tolerance_equals_quantus() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(32, 24, 24, generator=g)  # one maximum per map
    masks = shapes_masks(32, 24, g)
    theirs = quantus_scores(metric("PointingGame"), maps, masks)
    ours = pointing_game(maps, masks, tolerance=0).numpy()
    np.testing.assert_array_equal(ours, theirs)
    assert 0 < theirs.mean() < 1  # hits and misses both occur


def test_positive_part_is_the_default_and_differs_from_magnitude() -> None:
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[:, :4] = True
    signed = torch.zeros(1, 8, 8)
    signed[0, 0, 0], signed[0, 7, 7] = -3.0, 1.0  # evidence against inside, for outside
    assert object_energy(signed, masks).item() == 0.0
    assert object_energy(signed, masks, "absolute").item() == pytest.approx(0.75)
