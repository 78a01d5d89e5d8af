"""Real DDP on the CPU (gloo, 2 processes): no hang, one writer, the other rank fine."""

import json
import os
import subprocess
import sys

import ddp_script
import lightning as L
import pytest
import torch
from helpers import read_events, tiny_model, trainer

from lightning_saliency import SaliencyCallback, explain

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")
FSDP_SCRIPT = os.path.join(os.path.dirname(__file__), "fsdp_script.py")


def run_ranks(script, *args):
    """Run a 2-process script (bounded: a hang fails the test) and read each rank's record."""
    proc = subprocess.run(
        [sys.executable, script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out_dir = args[1] if script == SCRIPT else args[0]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    return proc, ranks


def single_device_forward_rows():
    """The forward rows of one device's explanation of the script's 4 samples (the same
    methods and options, as the callback calls them)."""
    from lightning_saliency.engine.explanations import layer_activations

    model = tiny_model()
    images = torch.rand(4, 3, 32, 32)
    methods = ["gradcam", "guided_gradcam", "integrated_gradients"]
    _, maps_rows = ddp_script.forward_rows(
        model,
        lambda: explain(model, images, None, methods, "features", ig_steps=8, on_error="collect"),
    )
    _, dff_rows = ddp_script.forward_rows(
        model, lambda: layer_activations(model, images, "features")
    )
    return maps_rows + dff_rows


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_two_cpu_processes(tmp_path, strategy):
    proc, ranks = run_ranks(SCRIPT, strategy, tmp_path)
    assert ranks[0]["written"] > 0 and ranks[1]["written"] == 0  # exactly one writer
    for record in ranks:  # every rank explained and has the same scores for EarlyStopping
        assert record["explained"] == ["gradcam", "guided_gradcam", "integrated_gradients"]
        # each rank explained half of the 4 samples; DFF takes the layer's activations of its
        # half and factorises the gathered activations of all 4; half the forward rows of one
        # device's explanation went through each rank's model
        rows = dict(record["last_run_rows"])
        forwards = rows.pop("forward_rows")
        assert rows == {"gradcam": 2, "guided_gradcam": 2, "integrated_gradients": 2, "dff": 2}
        assert forwards * 2 == single_device_forward_rows(), forwards
        assert "dff" in record["maps_match_explain"]
        # the gathered maps are those of explain() on all samples and the same weights
        assert all(diff < 1e-5 for diff in record["maps_match_explain"].values()), record
        assert record["alarms"] == ranks[0]["alarms"] >= 0
        assert record["history"] == ranks[0]["history"]  # the public record agrees
        assert record["alarm_events"] == ranks[0]["alarm_events"]
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/gradcam")) == 2  # two epochs, not doubled
    # Every rank holds the samples a single-device run chooses, read from the batches each
    # rank's DistributedSampler gives it (each sample copied on one rank, summed over them).
    single = SaliencyCallback(num_samples=4, ig_steps=8)
    L.seed_everything(0)
    trainer(str(tmp_path / "single"), [single], max_epochs=1, limit_train_batches=1).fit(
        tiny_model(), ddp_script.subset_datamodule()
    )
    assert set(single.fixed_samples.indices) <= set(range(len(ddp_script.VAL_INDICES)))
    for record in ranks:
        assert record["indices"] == single.fixed_samples.indices
        assert record["images_sum"] == pytest.approx(
            float(single.fixed_samples.images.double().sum())
        )
    assert "self.log('saliency" not in proc.stdout + proc.stderr  # logged as Lightning asks


@pytest.mark.slow
def test_a_method_failing_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """Integrated Gradients raises on rank 1 only, mid-run: both ranks switch it off together
    (the flag travels with the gathered shares), the other methods go on, nobody hangs."""
    proc, ranks = run_ranks(SCRIPT, "ddp", tmp_path, "fail")
    # its val loader has no fixed order: every rank holds rank zero's first rows
    assert ranks[0]["indices"] is None and ranks[1]["images_sum"] == ranks[0]["images_sum"]
    for record in ranks:
        assert record["switched_off"] == ["integrated_gradients"]
        assert record["explained"] == ["gradcam", "guided_gradcam"]
        assert record["history"] == ranks[0]["history"]
        assert all(diff < 1e-5 for diff in record["maps_match_explain"].values()), record
    assert "integrated_gradients failed" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_method_whose_pictures_fail_on_rank_zero_is_switched_off_on_every_rank(tmp_path):
    """Grad-CAM's pictures fail on rank zero (the only rank that draws) at the second logged
    run: every rank switches it off together, so the ranks keep the same methods and enter
    the same collectives at the third run (before, rank zero alone dropped it, and the next
    run's collectives no longer matched: the run hung)."""
    proc, ranks = run_ranks(SCRIPT, "ddp", tmp_path, "figure")
    for record in ranks:
        assert record["switched_off"] == ["gradcam"]
        assert record["explained"] == ["guided_gradcam", "integrated_gradients"]
        assert record["history"] == ranks[0]["history"]
        assert len(record["history"]) == 3
    assert "gradcam failed and is switched off" in proc.stdout + proc.stderr
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/gradcam")) == 1  # drawn at the first run only
    assert len(events.Images("saliency/guided_gradcam")) == 3


@pytest.mark.slow
def test_fsdp2_two_cpu_processes(tmp_path):
    """FSDP2 (fully_shard under ModelParallelStrategy): all ranks explain together; the maps
    equal explain() of an unsharded copy with the gathered weights; training is bitwise the
    same with and without the callback (and two runs without it agree: the control); the
    pictures land once."""
    _, ranks = run_ranks(FSDP_SCRIPT, tmp_path)
    for record in ranks:
        assert record["control_equal"], "two runs without the callback differ: no control"
        assert record["with_callback_equal"], record["differ"]
        assert record["explained"] == ["gradcam", "guided_gradcam", "integrated_gradients"]
        assert record["switched_off"] == [] and record["sanity_failed"] is not None
        assert set(record["maps_match_explain"]) == set(record["explained"])
        assert all(diff < 1e-5 for diff in record["maps_match_explain"].values()), record
    assert ranks[0]["written"] > 0 and ranks[1]["written"] == 0
    events = read_events(str(tmp_path / "saliency"))
    assert len(events.Images("saliency/gradcam")) == 2  # two epochs, once each
