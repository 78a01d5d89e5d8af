"""The benchmark's own machinery, checked without timing anything: on a GPU, its passes must
keep every tensor on the model's device, and its clock must wait for the device's queued work.
No GPU is needed: the ``meta`` device refuses a CPU tensor as a GPU would, and the CUDA calls
of the clock are recorded."""

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from lightning_saliency.engine.explanations import explanation_context

OVERHEAD = Path(__file__).resolve().parent.parent / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_benchmark", OVERHEAD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("chunk", [2, 64])
def test_the_floor_passes_keep_every_tensor_on_the_models_device(overhead, chunk):
    model = overhead.realistic_resnet18().to("meta")
    x = torch.randn(2, 3, 32, 32, device="meta")
    targets = torch.zeros(2, dtype=torch.long, device="meta")
    passes = overhead.floor_passes(model, x, targets, steps=4, chunk=chunk)
    assert sorted(passes) == ["dff", "gradcam", "ig", "shared"]
    with explanation_context(model):
        for run in passes.values():
            run()  # a tensor made on the CPU raises here, as on a GPU


def test_the_clock_waits_for_the_gpu_before_and_after_each_timed_call(overhead, monkeypatch):
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: events.append("wait"))
    overhead.timed(lambda: events.append("run"), repeat=2)
    assert events == ["run", "wait", "run", "wait", "wait", "run", "wait"]


def test_the_clock_leaves_the_cpu_alone(overhead, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("synchronised"))
    calls: list[float] = []

    def twenty_milliseconds() -> None:
        calls.append(time.perf_counter())
        time.sleep(0.02)

    seconds = overhead.timed(twenty_milliseconds, repeat=2)
    assert len(calls) == 3  # one warm-up, then the two timed calls
    assert 0.02 <= seconds < 0.5  # one call's time, not a sum and not the warm-up's
