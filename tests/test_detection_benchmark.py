"""The detection benchmark's judging, on hand-made run records (no training): when a cue counts
as learnt, how thresholds are set on the setting seeds, and what counts as a detection, a false
alarm and a flicker. The benchmark itself runs outside the suite (``benchmarks/detection.py``);
its carriers and cues are checked here on a few images."""

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def detection():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import carriers
        import detection

        yield detection, carriers
    finally:
        sys.path.remove(str(BENCHMARKS))


def _record(values, broken, acc=None, clean=False, cue="mark", seed=0, classes=4):
    """A run whose methods both judged ``small_cue_reliance`` at ``values`` per epoch."""
    judged = [
        {m: {"small_cue_reliance": v} for m in ("gradcam", "integrated_gradients")} for v in values
    ]
    return {
        "cell": f"shapes-{cue}" + ("-clean" if clean else ""),
        "cue": cue,
        "clean": clean,
        "p": None if clean else 1.0,
        "share": 1.0,
        "seed": seed,
        "classes": classes,
        "acc": acc or [0.9] * len(values),
        "acc_broken": broken,
        "judged": judged,
    }


def test_a_cue_is_learnt_below_chance_and_well_below_the_intact_split(detection):
    bench, _ = detection
    # an untrained model dips below chance on both splits: not learnt
    assert bench.learnt_epoch(_record([0, 0], [0.23, 0.05], acc=[0.23, 0.9])) == 1
    assert bench.learnt_epoch(_record([0, 0], [0.3, 0.2], acc=[0.3, 0.3])) is None
    assert bench.learnt_epoch(_record([0], [0.0], clean=True)) is None


def test_thresholds_keep_every_clean_setting_run_under_two_thirds(detection):
    bench, _ = detection
    clean = [_record([0.02, 0.06], [0.9, 0.9], clean=True, seed=s) for s in range(3)]
    shortcut = [_record([0.1, 0.5], [0.5, 0.05], seed=s) for s in range(3)]
    thresholds = bench.set_thresholds(clean + shortcut)
    t = thresholds["small_cue_reliance"]
    assert 0.06 / t <= bench.CLEAN_KEEP
    assert 0.5 / t >= bench.FIRING_HEADROOM  # room on both sides: in the middle
    # learnt cues too weak to keep the headroom: the threshold keeps the clean runs quiet
    weak = [_record([0.1, 0.1], [0.5, 0.05], seed=s) for s in range(3)]
    quiet = bench.set_thresholds(clean + weak)["small_cue_reliance"]
    assert quiet == pytest.approx(0.06 / 0.67, 0.05)
    # a score no run judged (a group score with too few samples per class) sets nothing
    assert "sub_class_stamped_cue" not in thresholds


def test_alarms_replayed_clear_together_and_the_margin_counts_only_quiet_falls(detection):
    """A score that fades while another alarm of the run trips does not ask for a margin (the
    callback holds it raised); one that fades while nothing else trips does."""
    bench, _ = detection
    corner = [{"gradcam": {"small_cue_reliance": v, "corner_enrichment": c}} for v, c in
              ((0.5, 9.0), (0.1, 9.0), (0.1, 9.0))]  # fmt: skip
    held = dict(_record([0, 0, 0], [0.05, 0.05, 0.05]), judged=corner)
    limits = {"small_cue_reliance": 0.2, "corner_enrichment": 4.8}
    assert bench.set_margin([held], limits) == 0.05
    assert bench.judge(held, limits, 0.25).flickers == 0
    alone = _record([0.5, 0.1, 0.1], [0.05, 0.05, 0.05])
    assert bench.set_margin([alone], {"small_cue_reliance": 0.2}) == 0.5
    assert bench.judge(alone, {"small_cue_reliance": 0.2}, 0.25).flickers == 2  # both methods


def test_a_detection_is_an_alarm_by_one_epoch_after_the_cue_is_learnt(detection):
    bench, _ = detection
    limits = {"small_cue_reliance": 0.1}
    in_time = bench.judge(_record([0.0, 0.0, 0.3], [0.9, 0.1, 0.05]), limits, 0.25)
    assert (in_time.learnt, in_time.first, in_time.detected) == (1, 2, True)
    late = bench.judge(_record([0.0, 0.0, 0.0, 0.3], [0.9, 0.1, 0.05, 0.05]), limits, 0.25)
    assert (late.first, late.detected) == (3, False)
    quiet = bench.judge(_record([0.0, 0.05], [0.9, 0.9], clean=True), limits, 0.25)
    assert quiet.first is None and quiet.alarmed_epochs == 0


def test_an_alarm_cleared_while_the_cue_stays_learnt_is_a_flicker(detection):
    bench, _ = detection
    limits = {"small_cue_reliance": 0.1}
    values, broken = [0.3, 0.05, 0.05, 0.05], [0.05] * 4
    cleared = bench.judge(_record(values, broken), limits, 0.25)
    assert cleared.flickers == 2 and cleared.went_quiet  # one per method; then none is left
    near = [0.3, 0.09, 0.09, 0.09]  # under the threshold, within the margin: stays raised
    outcome = bench.judge(_record(near, broken), limits, 0.25)
    assert outcome.flickers == 0 and not outcome.went_quiet and outcome.alarmed_epochs == 4
    # the margin the setting seeds need: the deepest fall under the threshold while learnt
    assert bench.set_margin([_record(near, broken)], limits) == pytest.approx(0.1)


def test_every_cue_is_planted_with_its_class_and_only_where_asked(detection):
    _, carriers = detection
    train, _ = carriers.carrier("digits", 0)
    data = train.take(torch.arange(8))
    classes = torch.tensor([0, 1, 2, 3, -1, -1, 0, 1])
    gen = torch.Generator().manual_seed(0)
    for cue in ("corner", "mark", "tint", "texture"):
        planted = carriers.plant(data, cue, classes, gen)
        changed = (planted != data.images).flatten(1).any(1)
        assert changed.tolist() == [True] * 4 + [False] * 2 + [True] * 2, cue
        if cue == "corner":  # the patch has its class's colour
            from lightning_saliency.demos.shapes import PATCH_COLORS

            for i, c in ((0, 0), (6, 0), (1, 1), (3, 3)):
                assert torch.equal(planted[i, :, 3, 3], PATCH_COLORS[c])
        if cue == "tint":  # the background moves towards the class colour (red for class 0)
            red = (planted[0, 0] - data.images[0, 0])[~data.masks[0]].mean()
            green = (planted[0, 1] - data.images[0, 1])[~data.masks[0]].mean()
            assert red > green


def test_the_object_agrees_with_the_label_on_the_share_asked(detection):
    _, carriers = detection
    train, _ = carriers.carrier("faces", 0)
    mixed = carriers.with_object_agreement(train, 0.75, torch.Generator().manual_seed(0))
    swapped = (mixed.images != train.images).flatten(1).any(1)
    assert 0.2 < float(swapped.float().mean()) < 0.3
    assert torch.equal(mixed.labels, train.labels)
