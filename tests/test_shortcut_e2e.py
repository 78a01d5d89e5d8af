"""End to end on the generated set: the shortcut is caught, the clean control stays quiet."""

import os

import pytest
import torch
from PIL import Image

from lightning_saliency.cli import demo_command as shortcut_demo
from lightning_saliency.demos import ShortcutDataModule, make_shortcut_images

ARGS = ["--epochs", "5", "--n-train", "1000", "--methods", "gradcam,integrated_gradients"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    demo = shortcut_demo
    log_dir = str(tmp_path_factory.mktemp("demo"))
    shortcut = demo.main(ARGS + ["--logdir", log_dir])
    clean = demo.main(ARGS + ["--logdir", log_dir, "--clean"])
    return shortcut, clean


@pytest.mark.slow
def test_shortcut_run_alarms_before_or_with_the_collapse(runs):
    shortcut, _ = runs
    rows = shortcut["rows"]
    assert "gradcam/corner_enrichment" in shortcut["alarms"]
    collapsed = [r["epoch"] for r in rows if r["acc_broken"] < 0.5 and r["acc"] > 0.5]
    alarmed = [r["epoch"] for r in rows if r["alarms"] > 0]
    assert collapsed and alarmed
    assert alarmed[0] <= collapsed[0]
    print(f"shortcut: first alarm at epoch {alarmed[0]}, broken-split collapse at {collapsed[0]}")
    assert rows[-1]["acc"] > 0.9 and rows[-1]["acc_broken"] < 0.4  # the shortcut was learnt


@pytest.mark.slow
def test_clean_run_raises_no_alarm_and_looks_at_the_object(runs):
    shortcut, clean = runs
    assert clean["alarms"] == []
    assert all(r["alarms"] == 0 for r in clean["rows"])
    last_s, last_c = shortcut["rows"][-1], clean["rows"][-1]
    assert last_s["object_energy"] < 0.6 * last_c["object_energy"], (last_s, last_c)
    assert last_c["corner_enrichment"] < 1.5 < 3.0 < last_s["corner_enrichment"]
    assert abs(last_c["acc"] - last_c["acc_broken"]) < 0.15  # the patch means nothing to it


@pytest.mark.slow
def test_timeline_png_shows_every_epoch(runs):
    shortcut, _ = runs
    picture = Image.open(shortcut["timeline"])
    assert picture.width >= 5 * 64 and picture.height >= 8 * 64


def test_dataset_is_deterministic_and_the_patch_follows_p():
    a = make_shortcut_images(200, size=32, shortcut_p=0.9, seed=3)
    b = make_shortcut_images(200, size=32, shortcut_p=0.9, seed=3)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["masks"], b["masks"])
    agree = (a["patch_labels"] == a["labels"]).float().mean()
    assert 0.82 < agree < 0.97
    broken = make_shortcut_images(200, size=32, shortcut_p=0.0, seed=3)
    assert (broken["patch_labels"] != broken["labels"]).all()
    assert not (a["masks"] & a["patch_mask"]).any()  # the object never hides under the patch
    clean = make_shortcut_images(400, size=32, shortcut_p=None, seed=3)
    assert 0.15 < (clean["patch_labels"] == clean["labels"]).float().mean() < 0.35


def test_datamodule_splits():
    dm = ShortcutDataModule(n_train=32, n_val=16, size=32)
    dm.setup("fit")
    val, broken = dm.val_dataloader()
    batch = next(iter(val))
    assert set(batch) == {"image", "label", "mask"} and batch["mask"].dtype == torch.bool


def test_cifar10_path_runs_on_generated_data(tmp_path, monkeypatch):
    """The real-data path, with torchvision's CIFAR10 swapped for generated images offline."""
    import torchvision
    from torchvision.datasets import FakeData

    def fake_cifar(root, train, transform, download=False):
        assert not download  # nothing downloads unless the user asks
        data = FakeData(
            64 if train else 32,
            (3, 32, 32),
            10,
            transform=transform,
            random_offset=0 if train else 1000,
        )
        data.classes = [str(i) for i in range(10)]
        return data

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar)
    result = shortcut_demo.main(
        [
            "--data",
            "cifar10",
            "--epochs",
            "1",
            "--logdir",
            str(tmp_path),
            "--methods",
            "gradcam,dff",
            "--num-samples",
            "4",
        ]
    )
    assert result["rows"] and os.path.exists(result["timeline"])


# -- the detection benchmark's hardest clean control, on a held-out seed ----------------------
# benchmarks/detection.py carries the detection and false-alarm rates over 680 runs; the suite
# runs the clean control that cried wolf before: objects of 2-4.5 % of the image, about the
# small-cue probe's hottest 2 %, so that blurring the object away looked like blurring a mark.

# A held-out seed (thresholds were set on seeds 0-4) whose run stays at 0.55x or less of every
# threshold here and at 0.40x with ATEN_CPU_CAPABILITY=default. Seed 5 sits at 0.80x
# (stamped_cue_reliance) here and crossed it (1.02x) on that other kernel path: another
# processor trains another model, and a clean run that close to a threshold can alarm there
# (benchmarks/README.md says so).
SMALL_OBJECTS_SEED = 9


@pytest.fixture(scope="module")
def small_objects():
    import sys

    benchmarks = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
    sys.path.insert(0, benchmarks)
    try:
        import detection

        cell = detection.Cell("shapes_small", "none", None)
        return detection, detection.run(cell, SMALL_OBJECTS_SEED)
    finally:
        sys.path.remove(benchmarks)


@pytest.mark.slow
def test_a_clean_model_of_small_objects_raises_no_alarm(small_objects):
    """On 4c5245b this run raised IG's `small_cue_reliance` (0.153 > 0.096); now the threshold
    is set over carriers with small objects among them, and `stamped_cue_reliance` asks the
    attended content to repeat."""
    from lightning_saliency.evaluate.alarms import LOW_IS_BAD, default_thresholds, is_health

    bench, record = small_objects
    assert record["acc"][-1] >= 0.6, record["acc"]  # it learnt the objects: a decision to probe
    assert [a for a in record["alarms"] if a[5] != "cleared"] == [], record["alarms"]
    # the margin a clean run keeps on every mask-free alarm: another processor's rounding
    # moves these by a few hundredths, not by 15 % (the thresholds keep setting seeds at 0.67x)
    for score, threshold in default_thresholds().items():
        if score in LOW_IS_BAD or is_health(score):
            continue
        for value in bench.values(record, score):
            assert value <= 0.85 * threshold, (score, value, threshold)
