"""The mask-free shortcut scores on hand-made models and images: each responds to its cue and
ignores the others; nothing of the model or the global RNG changes."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_saliency import shortcut_scores
from lightning_saliency.evaluate.scores import SHORTCUT_SCORES
from lightning_saliency.evaluate.shortcut_probes import ProbeSettings, attended_consensus

SIZE = 40


class MarkReader(nn.Module):
    """Class 1 when a small red spot is anywhere in the image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(12.0))

    def forward(self, x):
        redness = x[:, 0] - (x[:, 1] + x[:, 2]) / 2
        score = self.scale * F.max_pool2d(redness[:, None], 3, 1).amax(dim=(1, 2, 3)) - 6
        return torch.stack([torch.zeros_like(score), score], dim=1)


class ObjectReader(nn.Module):
    """Class 1 when a large green region (an 8 x 8 block at least) is in the image."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(12.0))

    def forward(self, x):
        green = x[:, 1] - (x[:, 0] + x[:, 2]) / 2
        score = self.scale * F.avg_pool2d(green[:, None], 8, 1).amax(dim=(1, 2, 3)) - 6
        return torch.stack([torch.zeros_like(score), score], dim=1)


class BackgroundReader(nn.Module):
    """Class 1 when the image is blue on the whole (its context, not any one place)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(30.0))

    def forward(self, x):
        blue = (x[:, 2] - (x[:, 0] + x[:, 1]) / 2).mean(dim=(1, 2))
        score = self.scale * blue - 2
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _images(n=6, seed=0):
    """Grey noise with a big green square (the object) and a small red mark, each at a place
    of its own per image; the background is tinted blue. Returns images, object and mark
    regions."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.4 + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    x[:, 2] += 0.3  # a blue context
    objects = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    marks = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(2, 14, (2,), generator=gen).tolist()
        objects[i, top : top + 16, left : left + 16] = True
        mark_top, mark_left = torch.randint(32, 36, (2,), generator=gen).tolist()
        marks[i, mark_top : mark_top + 3, mark_left : mark_left + 3] = True
    x = torch.where(objects[:, None], torch.tensor([0.2, 0.9, 0.2])[:, None, None], x)
    x = torch.where(marks[:, None], torch.tensor([1.0, 0.0, 0.0])[:, None, None], x)
    return x, objects, marks


def _scores(model, maps_region, images):
    maps = maps_region.float() + 0.01 * torch.rand(maps_region.shape)
    targets = torch.ones(len(images), dtype=torch.long)
    return shortcut_scores(model, images, {"map": maps}, targets)["map"]


def test_small_cue_reliance_reads_a_mark_and_ignores_objects_and_backgrounds():
    images, objects, marks = _images()
    mark = _scores(MarkReader(), marks, images)
    assert (mark["small_cue_reliance"] > 0.8).all(), mark
    assert (mark["background_reliance"] < 0.2).all()
    obj = _scores(ObjectReader(), objects, images)
    assert (obj["small_cue_reliance"].abs() < 0.1).all(), obj
    assert (obj["background_reliance"] < 0.2).all(), obj
    context = _scores(BackgroundReader(), objects, images)  # the map shows the object
    assert (context["small_cue_reliance"].abs() < 0.1).all(), context


def test_background_reliance_reads_the_context_even_when_the_map_shows_the_object():
    images, objects, _ = _images()
    context = _scores(BackgroundReader(), objects, images)
    assert (context["background_reliance"] > 0.8).all(), context
    # the same model on images without the blue context has no evidence left to keep
    grey = images.clone()
    grey[:, 2] -= 0.3
    assert (_scores(BackgroundReader(), objects, grey)["background_reliance"] < 0.1).all()


class SpotReader(nn.Module):
    """Class 1 when a small spot with a bright red channel is anywhere in the image, whatever
    its other channels (a small object of any colour with some red)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(12.0))

    def forward(self, x):
        score = self.scale * (F.avg_pool2d(x[:, :1], 3, 1).amax(dim=(1, 2, 3)) - 0.75)
        return torch.stack([torch.zeros_like(score), score], dim=1)


class TextureReader(nn.Module):
    """Class 1 when the image is finely striped somewhere, wherever the stripes are."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x):
        grain = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        score = self.scale * grain - 4
        return torch.stack([torch.zeros_like(score), score], dim=1)


class WideObjectReader(nn.Module):
    """Class 1 when a green band 16 pixels wide is in the image: the whole object, larger
    than a tile of the scramble."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(12.0))

    def forward(self, x):
        green = x[:, 1] - (x[:, 0] + x[:, 2]) / 2
        score = self.scale * F.avg_pool2d(green[:, None], (4, 16), 1).amax(dim=(1, 2, 3)) - 6
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_colour_and_texture_reliance_read_global_cues_and_not_the_object():
    """A decision that survives a blur of the whole image reads its colours; one that survives
    a scramble of its tiles but not the blur reads a texture; one that needs the object's whole
    shape survives neither."""
    images, objects, _ = _images()
    colour = _scores(BackgroundReader(), objects, images)
    assert (colour["colour_reliance"] > 0.8).all(), colour
    assert (colour["texture_reliance"] < 0.1).all(), colour  # the blur kept it already
    striped = images.clone()
    striped[..., ::2] += 0.3  # a fine texture over everything
    texture = _scores(TextureReader(), objects, striped)
    assert (texture["texture_reliance"] > 0.8).all(), texture
    assert (texture["colour_reliance"] < 0.1).all(), texture
    shape = _scores(WideObjectReader(), objects, images)  # two tiles may land side by side
    assert shape["colour_reliance"].max() < 0.1, shape
    assert shape["texture_reliance"].mean() < 0.15, shape


class ContrastReader(nn.Module):
    """Class 1 for a grainy image, class 0 for a smooth one: right on both, and sure that any
    blurred image is smooth."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(60.0))

    def forward(self, x):
        grain = (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))
        score = self.scale * (grain - 0.05)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_a_decision_that_turns_into_one_answer_for_every_blurred_image_is_not_kept():
    """Faces against non-faces: blurred, every image looks like one class to the model. Half of
    them stay "right" with certainty, but the model no longer tells them apart, so no decision
    is kept (counted against chance, the smooth half would keep all of it)."""
    gen = torch.Generator().manual_seed(0)
    smooth = 0.5 + 0.01 * torch.randn(4, 3, SIZE, SIZE, generator=gen)
    grainy = 0.5 + 0.3 * torch.randn(4, 3, SIZE, SIZE, generator=gen)
    images, targets = torch.cat([smooth, grainy]), torch.tensor([0] * 4 + [1] * 4)
    maps = torch.rand(8, SIZE, SIZE, generator=gen)
    model = ContrastReader()
    assert torch.equal(model(images).argmax(1), targets)  # right on both classes
    out = shortcut_scores(model, images, {"map": maps}, targets)["map"]
    assert (out["colour_reliance"] < 0.15).all(), out["colour_reliance"]
    from lightning_saliency.evaluate.shortcut_probes import kept_decision

    certain = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), 2).float()
    assert kept_decision(certain, targets).max() == 0  # against chance: 1.0 on the first half


def test_shuffled_tiles_keeps_the_pixels_and_moves_every_shape():
    from lightning_saliency.evaluate.shortcut_probes import shuffled_tiles

    x = torch.rand(2, 3, 42, 40)
    y = shuffled_tiles(x, 1 / 5)
    assert torch.equal(y[:, :, 40:], x[:, :, 40:])  # rows past the last whole tile stay
    assert torch.equal(y.flatten(2).sort(2).values, x.flatten(2).sort(2).values)
    tiles = y[:, :, :40].unfold(2, 8, 8).unfold(3, 8, 8)
    originals = x[:, :, :40].unfold(2, 8, 8).unfold(3, 8, 8)
    moved = (tiles != originals).flatten(-2).any(-1).any(1)  # (N, 5, 5)
    assert moved.float().mean() > 0.8
    assert torch.equal(shuffled_tiles(x, 1 / 5), y)  # the same order every time


def test_stamped_cue_reliance_needs_a_small_cue_that_repeats():
    """A stamped mark is the same crop in every image of the class; a small object of a
    different colour and pattern in each image is not, however much the decision rests on it."""
    images, _, marks = _images(8)
    stamped = _scores(MarkReader(), marks, images)
    assert (stamped["stamped_cue_reliance"] > 0.4).all(), stamped
    gen = torch.Generator().manual_seed(3)
    varied = images.clone()
    for i in range(8):  # each image's small object of a colour and pattern of its own
        rows, cols = marks[i].nonzero(as_tuple=True)
        patch = torch.rand(3, 3, 3, generator=gen)
        patch[0] = 0.9 + 0.1 * torch.rand(3, 3, generator=gen)  # what the model reads
        varied[i, :, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = patch
    small_object = _scores(SpotReader(), marks, varied)
    assert (small_object["small_cue_reliance"] > 0.5).all(), small_object  # it relies on it
    ratio = small_object["stamped_cue_reliance"].mean() / stamped["stamped_cue_reliance"].mean()
    assert ratio < 0.6, ratio


def test_attended_consensus_sees_a_stamped_mark_repeat_and_varied_objects_not():
    images, objects, marks = _images(8)
    groups = torch.zeros(8)
    on_mark = attended_consensus(images, marks.float(), groups)
    # the objects: squares of different colours and crops of random noise around them
    gen = torch.Generator().manual_seed(1)
    varied = torch.rand(8, 3, SIZE, SIZE, generator=gen)
    on_noise = attended_consensus(varied, objects.float(), groups)
    assert (on_mark > 0.5).all(), on_mark
    assert (on_noise.abs() < 0.25).all(), on_noise
    # only images of one group are compared; a sample with no peer has no value
    alone = attended_consensus(images, marks.float(), torch.arange(8))
    assert torch.isnan(alone).all()


def test_a_model_right_on_fewer_than_half_the_images_is_not_judged():
    images, _, marks = _images()
    maps = {"map": marks.float()}
    targets = torch.ones(6, dtype=torch.long)
    peers = torch.tensor([True, True, False, False, False, False])
    out = shortcut_scores(MarkReader(), images, maps, targets, peers=peers)["map"]
    assert all(torch.isnan(v).all() for v in out.values())
    half = torch.tensor([True, True, True, False, False, False])
    out = shortcut_scores(MarkReader(), images, maps, targets, peers=half)["map"]
    assert not torch.isnan(out["small_cue_reliance"]).any()


def test_a_model_answering_one_class_for_everything_is_not_judged():
    """On a balanced binary set, answering one class is half right: no decision to probe (on
    main the faces' clean runs alarmed on background_reliance this way)."""
    images, _, marks = _images()
    maps = {"map": marks.float()}
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    one_answer = labels == 0  # the model says 0 for all six
    out = shortcut_scores(MarkReader(), images, maps, labels, groups=labels, peers=one_answer)
    assert all(torch.isnan(v).all() for v in out["map"].values())
    both = torch.tensor([True, True, False, True, False, False])  # right on both classes
    out = shortcut_scores(MarkReader(), images, maps, labels, groups=labels, peers=both)
    assert not torch.isnan(out["map"]["background_reliance"]).any()


def test_an_image_scores_the_same_alone_and_in_a_batch():
    images, _, marks = _images()
    model, targets = MarkReader(), torch.ones(6, dtype=torch.long)
    maps = marks.float() + 0.01 * torch.rand(marks.shape)
    together = shortcut_scores(model, images, {"m": maps}, targets)["m"]
    for i in range(6):
        alone = shortcut_scores(model, images[i : i + 1], {"m": maps[i : i + 1]}, targets[:1])
        for name in ("small_cue_reliance", "background_reliance"):
            torch.testing.assert_close(alone["m"][name], together[name][i : i + 1])


def test_the_model_and_the_global_rng_are_left_as_found():
    images, _, marks = _images()
    model = MarkReader().train()
    state = torch.get_rng_state()
    shortcut_scores(model, images, {"m": marks.float()}, torch.ones(6, dtype=torch.long))
    assert model.training and model.scale.requires_grad and model.scale.grad is None
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_maps_are_refused_and_concept_maps_skipped():
    images, _, marks = _images()
    targets = torch.ones(6, dtype=torch.long)
    with pytest.raises(ValueError, match="maps must be"):
        shortcut_scores(MarkReader(), images, {"m": marks[:, :20].float()}, targets)
    concepts = torch.rand(6, 4, SIZE, SIZE)
    assert shortcut_scores(MarkReader(), images, {"dff": concepts}, targets) == {}


def test_settings_change_the_regions():
    images, objects, _ = _images()
    model, targets = ObjectReader(), torch.ones(6, dtype=torch.long)
    small = shortcut_scores(
        model,
        images,
        {"m": objects.float()},
        targets,
        settings=ProbeSettings(background_fraction=0.05),
    )["m"]["background_reliance"]
    large = shortcut_scores(model, images, {"m": objects.float()}, targets)["m"][
        "background_reliance"
    ]
    assert small.mean() > large.mean() + 0.3  # a sliver of the object leaves the evidence
    assert not math.isnan(float(small.mean()))


# -- in the callback ----------------------------------------------------------------------------


def _fit_with(tmp_path, **kwargs):
    from lightning_saliency import SaliencyCallback
    from tests.helpers import tiny_datamodule, tiny_model, trainer

    callback = SaliencyCallback(
        methods=("gradcam", "integrated_gradients"), num_samples=4, ig_steps=4, **kwargs
    )
    trainer(str(tmp_path), [callback], max_epochs=1).fit(tiny_model(), tiny_datamodule(masks=False))
    return callback


def test_the_callback_logs_the_probes_and_can_leave_them_out(tmp_path):
    from tests.helpers import read_events

    _fit_with(tmp_path / "on", sanity_check=False)
    tags = set(read_events(str(tmp_path / "on")).Tags()["scalars"])
    for method in ("gradcam", "integrated_gradients"):
        for name in SHORTCUT_SCORES:
            assert f"saliency/{method}/{name}" in tags, (method, name)
    for name in ("small_cue_reliance", "stamped_cue_reliance", "colour_reliance"):
        assert any(t.startswith(f"saliency_alarms/gradcam/{name}") for t in tags), name
    assert not any(t.startswith("saliency_alarms/gradcam/background_reliance") for t in tags)
    _fit_with(tmp_path / "off", sanity_check=False, shortcut_probes=False)
    tags = set(read_events(str(tmp_path / "off")).Tags()["scalars"])
    assert not any("reliance" in t or "attended" in t for t in tags)
    assert "saliency/gradcam/corner_enrichment" in tags  # the other scores stay


def test_a_failing_probe_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import logging

    import lightning_saliency.callback.logged_run as callback_module

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(callback_module, "shortcut_scores", broken)
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        callback = _fit_with(tmp_path, sanity_check=False)
    said = [r.getMessage() for r in caplog.records if "probe exploded" in r.getMessage()]
    assert len(said) == 1 and "shortcut probes" in said[0]
    assert callback.history and "corner_enrichment" in callback.history[-1].means["gradcam"]


def test_bad_shortcut_probes_argument_is_refused():
    from lightning_saliency import SaliencyCallback, SaliencyConfigError

    with pytest.raises(SaliencyConfigError, match="shortcut_probes"):
        SaliencyCallback(shortcut_probes="yes")


def test_probe_scores_are_aggregated_judged_and_attended_consensus_alarms_on_request():
    from lightning_saliency.engine.explanations import Explanations
    from lightning_saliency.evaluate.monitor import ScoreMonitor

    maps = torch.rand(4, 12, 12)
    out = Explanations({"gradcam": maps}, logits=torch.eye(4), targets=torch.arange(4))
    extra = {
        "gradcam": {
            "attended_consensus": torch.full((4,), 0.9),
            "small_cue_reliance": torch.tensor([0.5, 0.5, 0.5, math.nan]),
            "background_reliance": torch.zeros(4),
        }
    }
    quiet = ScoreMonitor().observe(0, out, labels=torch.arange(4), extra_scores=extra)
    assert quiet.metrics["saliency/gradcam/attended_consensus"] == pytest.approx(0.9)
    assert quiet.metrics["saliency/gradcam/small_cue_reliance"] == pytest.approx(0.5)
    assert [e.score for e in quiet.events] == ["small_cue_reliance"]  # attended: opt-in
    assert quiet.scores.judged["gradcam"]["small_cue_reliance"] == pytest.approx(0.5)
    asked = ScoreMonitor(thresholds={"attended_consensus": 0.8})
    report = asked.observe(0, out, labels=torch.arange(4), extra_scores=extra)
    assert {e.score for e in report.events} == {"attended_consensus", "small_cue_reliance"}
    # a method that failed the sanity check is scored, never alarmed
    gated = ScoreMonitor()
    gated.set_insensitive({"gradcam"})
    assert gated.observe(0, out, labels=torch.arange(4), extra_scores=extra).events == []
