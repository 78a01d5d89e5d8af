"""Real DDP on the CPU (gloo, 2 processes): no hang, one writer, the other rank fine."""

import json
import os
import subprocess
import sys

import ddp_script
import lightning as L
import pytest
from helpers import read_events, tiny_model, trainer

from lightning_saliency import SaliencyCallback

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])
def test_ddp_two_cpu_processes(tmp_path, strategy):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, SCRIPT, strategy, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["written"] > 0 and ranks[1]["written"] == 0  # exactly one writer
    for record in ranks:  # every rank explained and has the same scores for EarlyStopping
        assert record["explained"] == ["gradcam", "guided_gradcam", "integrated_gradients"]
        assert record["alarms"] == ranks[0]["alarms"] >= 0
        assert record["history"] == ranks[0]["history"]  # the public record agrees
        assert record["alarm_events"] == ranks[0]["alarm_events"]
    events = read_events(str(tmp_path))
    assert len(events.Images("saliency/gradcam")) == 2  # two epochs, not doubled
    # Every rank holds the samples a single-device run chooses, from the user's sampler (not
    # the per-rank DistributedSampler Lightning wraps around it).
    single = SaliencyCallback(num_samples=4, ig_steps=8)
    L.seed_everything(0)
    trainer(str(tmp_path / "single"), [single], max_epochs=1, limit_train_batches=1).fit(
        tiny_model(), ddp_script.subset_datamodule()
    )
    assert set(single.fixed_samples.indices) <= set(ddp_script.VAL_INDICES)
    for record in ranks:
        assert record["indices"] == single.fixed_samples.indices
        assert record["images_sum"] == pytest.approx(
            float(single.fixed_samples.images.double().sum())
        )
    assert "self.log('saliency" not in proc.stdout + proc.stderr  # logged as Lightning asks
