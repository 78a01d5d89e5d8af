"""Integrated Gradients: equal to captum at a fixed step count; ``"auto"`` per image, without
recomputation, against a 256-step reference; chunks sized to the device, with the CUDA paths
(free memory, out of memory) simulated on the CPU."""

import logging

import pytest
import torch
from captum.attr import IntegratedGradients
from models import SmallCNN, seeded
from torch import nn

from lightning_saliency import explain
from lightning_saliency.engine.methods import integrated_gradients as ig_module

TARGETS = [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class RowCounter:
    """Counts the rows (images) of every forward of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = model.register_forward_pre_hook(
            lambda _m, args: self.batches.append(args[0].shape[0])
        )

    @property
    def rows(self) -> int:
        return sum(self.batches)


def _relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).flatten(1).abs().sum(1) / b.flatten(1).abs().sum(1)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_fixed_steps_equal_captum(batch, method):
    model = seeded(SmallCNN(), scale=0.6).eval()
    ours = explain(
        model,
        batch,
        targets=TARGETS,
        methods=("ig",),
        method_options={"ig": {"steps": 24, "method": method}},
    )
    ref = IntegratedGradients(model).attribute(
        batch, target=torch.tensor(TARGETS), n_steps=24, method=method
    )
    torch.testing.assert_close(ours["integrated_gradients"], ref.sum(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [0.3, 0.6, 1.0])
def test_auto_is_within_its_tolerances_of_a_256_step_reference(batch, scale):
    """Each image's map: completeness error <= 1 %, and within ``map_tolerance`` (5 %,
    relative L1) of captum's 256-step Gauss-Legendre map."""
    model = seeded(SmallCNN(), scale=scale).eval()
    auto = explain(model, batch, targets=TARGETS, methods=("ig",), ig_steps="auto")
    ref = (
        IntegratedGradients(model)
        .attribute(batch, target=torch.tensor(TARGETS), n_steps=256)
        .sum(1)
    )
    assert auto.extras["ig_completeness_error"].max() <= 0.01
    distance = _relative_l1(auto["integrated_gradients"], ref)
    assert distance.max() <= 0.05, distance
    assert auto.extras["ig_steps"].max() < 256  # it did stop early


def test_auto_costs_at_most_one_and_a_half_times_its_final_steps(batch):
    """Counted in rows through the model: each image pays for its final step count plus one
    end point (the nested rule reuses every earlier evaluation), and the explained scores."""
    model = seeded(SmallCNN(), scale=0.3).eval()
    counter = RowCounter(model)
    auto = explain(model, batch, targets=TARGETS, methods=("ig",), ig_steps="auto")
    steps = torch.as_tensor(auto.extras["ig_steps"])
    assert steps.numel() == len(batch) and steps.max() >= 32  # some images doubled 2+ times
    final = int(steps.sum())
    scoring = 2 * len(batch)  # the shared forward: predictions and explained scores
    assert counter.rows - scoring <= 1.5 * final, (counter.rows, final)
    assert auto.extras["ig_evaluations"] == final + len(batch)


def test_an_images_steps_and_map_do_not_depend_on_its_batch(batch):
    model = seeded(SmallCNN(), scale=0.3).eval()
    together = explain(model, batch, targets=TARGETS, methods=("ig",), ig_steps="auto")
    steps = torch.as_tensor(together.extras["ig_steps"])
    assert len(set(steps.tolist())) > 1  # the batch mixes easy and hard images
    for i in range(len(batch)):
        alone = explain(
            model, batch[i : i + 1], targets=TARGETS[i], methods=("ig",), ig_steps="auto"
        )
        assert int(torch.as_tensor(alone.extras["ig_steps"]).reshape(-1)[0]) == int(steps[i])
        torch.testing.assert_close(
            alone["integrated_gradients"][0],
            together["integrated_gradients"][i],
            rtol=1e-4,
            atol=1e-6,
        )


class RunsOutOfMemory(nn.Module):
    """Raises CUDA's out-of-memory error for batches above ``limit`` rows."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit, self.failures = model, limit, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.failures += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_a_chunk_that_runs_out_of_memory_is_retried_smaller(batch, caplog):
    model = seeded(SmallCNN(), scale=0.6).eval()
    plain = explain(model, batch, targets=TARGETS, methods=("ig",), ig_steps=16)
    tight = RunsOutOfMemory(model, limit=20).eval()
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        out = explain(
            tight,
            batch,
            targets=TARGETS,
            methods=("ig",),
            ig_steps=16,
            target_layer="model.features",
        )
    torch.testing.assert_close(out["integrated_gradients"], plain["integrated_gradients"])
    assert tight.failures >= 1
    said = [r for r in caplog.records if "ran out of device memory" in r.getMessage()]
    assert len(said) == 1  # once, however many chunks shrank


def test_a_single_row_that_runs_out_of_memory_is_the_error():
    sizer = ig_module.ChunkSizer(1, cuda=False)
    err = torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        sizer.shrink(err)


def test_cuda_chunks_are_sized_by_free_memory(batch, monkeypatch):
    """With CUDA's memory functions simulated: the first chunk measures what a row holds
    (1 MiB after the forward here), then chunks take half the free memory (64 MiB) at twice
    that per row: 16 rows."""
    model = seeded(SmallCNN(), scale=0.6).eval()
    plain = explain(model, batch, targets=TARGETS, methods=("ig",), ig_steps=16)
    held = {"bytes": 0}

    def count_memory(_module, args):
        if torch.is_grad_enabled():
            held["bytes"] += args[0].shape[0] * 2**20

    counter = RowCounter(model)
    model.register_forward_pre_hook(count_memory)
    real = ig_module.ChunkSizer
    monkeypatch.setattr(
        ig_module,
        "ChunkSizer",
        lambda rows, cuda, fixed=False: real(
            4, cuda=True, free_memory=lambda: 64 * 2**20, allocated=lambda: held["bytes"]
        ),
    )
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    out = explain(model, batch, targets=TARGETS, methods=("ig",), ig_steps=16)
    ig_batches = [b for b in counter.batches if b not in (len(batch),)]
    assert ig_batches[0] == 4 and set(ig_batches[1:-1]) == {16}
    torch.testing.assert_close(out["integrated_gradients"], plain["integrated_gradients"])
