"""Real DDP on the CPU (gloo, 2 processes): no hang, one writer, the other rank fine."""

import json
import os
import subprocess
import sys

import pytest
from helpers import read_events

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
