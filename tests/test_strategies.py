"""Sub-class strategies on hand-made models: a tag that only part of a class carries is found by
its group, where the class's mean dilutes it below any threshold; a class of
objects read as objects forms no such group; the monitor judges a group score by its strongest
group; with too few samples per class nothing is judged."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_saliency import shortcut_scores
from lightning_saliency.evaluate.alarms import default_thresholds

SIZE = 40
TAGGED = 4  # of the 12 images of class 1


class TagOrObjectReader(nn.Module):
    """Class 1 when a small red tag is anywhere, or a large green block (8 x 8 at least)."""

    def forward(self, x):
        redness = x[:, 0] - (x[:, 1] + x[:, 2]) / 2
        green = x[:, 1] - (x[:, 0] + x[:, 2]) / 2
        tag = 12 * F.max_pool2d(redness[:, None], 3, 1).amax(dim=(1, 2, 3)) - 6
        block = 12 * F.avg_pool2d(green[:, None], 8, 1).amax(dim=(1, 2, 3)) - 6
        score = torch.maximum(tag, block)
        return torch.stack([torch.zeros_like(score), score], dim=1)


def _class_with_a_part(tagged: int = TAGGED, seed: int = 0):
    """24 grey images: 12 of class 0 (nothing), 12 of class 1 of which ``tagged`` carry a red
    tag at a place of its own and no object, the others a green block at a place of its own.
    The maps lie on what each image's decision rests on (the tag, the block; somewhere for
    class 0). Returns images, maps, labels."""
    gen = torch.Generator().manual_seed(seed)
    n = 24
    x = 0.4 + 0.05 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    labels = torch.tensor([0] * 12 + [1] * 12)
    maps = torch.zeros(n, SIZE, SIZE)
    for i in range(n):
        top, left = torch.randint(2, 30, (2,), generator=gen).tolist()
        if i < 12:
            maps[i, top : top + 6, left : left + 6] = 1.0
        elif i < 12 + tagged:
            x[i, :, top : top + 3, left : left + 3] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
            maps[i, top : top + 3, left : left + 3] = 1.0
        else:
            top, left = (min(v, 22) for v in (top, left))
            x[i, :, top : top + 16, left : left + 16] = torch.tensor([0.2, 0.9, 0.2])[:, None, None]
            maps[i, top : top + 16, left : left + 16] = 1.0
    return x, maps + 0.01 * torch.rand(n, SIZE, SIZE, generator=gen), labels


def _probe(model, tagged=TAGGED, keep=None):
    images, maps, labels = _class_with_a_part(tagged)
    if keep is not None:
        images, maps, labels = images[keep], maps[keep], labels[keep]
    right = model(images).argmax(1) == labels
    assert bool(right.all())
    return shortcut_scores(model, images, {"m": maps}, labels, labels, right)["m"], labels


def _largest(values):
    return float(values[~torch.isnan(values)].max())


def _class_one(values, labels):
    return values[labels == 1]


def test_a_tag_on_a_third_of_a_class_is_found_by_its_group_and_missed_by_the_mean():
    scores, labels = _probe(TagOrObjectReader())
    thresholds = default_thresholds()
    group = _class_one(scores["sub_class_stamped_cue"], labels)
    assert group[:TAGGED].min() > 1.25 * thresholds["sub_class_stamped_cue"]
    # the same cue in the mean: a third of the class, a sixth of the samples
    assert scores["stamped_cue_reliance"].nanmean() < thresholds["stamped_cue_reliance"]
    # objects form no group: those read by the block score low
    assert group[TAGGED:].max() < 0.5 * group[:TAGGED].min()


def test_a_class_read_by_its_objects_alone_forms_no_strategy_group():
    scores, labels = _probe(TagOrObjectReader(), tagged=0)
    assert (
        _largest(scores["sub_class_stamped_cue"])
        < 0.25 * default_thresholds()["sub_class_stamped_cue"]
    )


def test_with_too_few_images_per_class_no_group_is_judged():
    keep = torch.tensor([*range(8), *range(12, 20)])  # 8 per class: a part is not a whole
    scores, _ = _probe(TagOrObjectReader(), keep=keep)
    assert bool(torch.isnan(scores["sub_class_stamped_cue"]).all())
    assert not bool(torch.isnan(scores["stamped_cue_reliance"]).any())


def test_the_monitor_judges_a_group_score_by_its_strongest_group():
    from lightning_saliency.engine.explanations import Explanations
    from lightning_saliency.evaluate.monitor import ScoreMonitor

    labels = torch.tensor([0, 1] * 6)
    out = Explanations(
        {"gradcam": torch.rand(12, 12, 12)}, logits=torch.eye(2)[labels], targets=labels
    )
    threshold = default_thresholds()["sub_class_stamped_cue"]
    strong = 1.5 * threshold
    values = torch.tensor([strong] * 3 + [0.0] * 8 + [math.nan])  # one group of three
    extra = {"gradcam": {"sub_class_stamped_cue": values}}
    report = ScoreMonitor().observe(0, out, labels=labels, extra_scores=extra)
    assert report.metrics["saliency/gradcam/sub_class_stamped_cue"] == pytest.approx(strong)
    assert [e.score for e in report.events] == ["sub_class_stamped_cue"]
    assert report.scores.judged["gradcam"]["sub_class_stamped_cue"] == pytest.approx(strong)
