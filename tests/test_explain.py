"""explain(): it leaves the model, its gradients, hooks and the RNG exactly as it found them;
its options, its result type and its errors."""

from dataclasses import replace

import pytest
import torch
from helpers import assert_same, snapshot
from models import FunctionalCNN, SmallCNN, seeded
from torch import nn

from lightning_saliency import DEFAULT_METHODS, SaliencyConfigError, explain
from lightning_saliency.engine.methods import METHODS


@pytest.fixture
def trained_state_model(images):
    """A model mid-training: train mode, accumulated grads, one frozen parameter, a user hook."""
    model = seeded(SmallCNN()).train()
    model(images).sum().backward()
    model.features[0].bias.requires_grad_(False)
    model.features[1].eval()  # a frozen BN, as in fine-tuning
    model.fc.register_forward_hook(lambda *a: None)
    return model


@pytest.mark.parametrize("context", ["plain", "no_grad", "inference_mode"])
def test_explain_leaves_everything_as_found(trained_state_model, images, context):
    model = trained_state_model
    before = snapshot(model)
    if context == "inference_mode":
        with torch.inference_mode():
            inputs = images * 1.0  # an inference tensor, as trainer.validate() hands it over
            assert inputs.is_inference()
            out = explain(model, inputs, ig_steps=8)
    elif context == "no_grad":
        with torch.no_grad():
            out = explain(model, images, ig_steps=8)
    else:
        out = explain(model, images, ig_steps=8)
    assert_same(before, snapshot(model))
    assert set(out) == set(DEFAULT_METHODS)
    for maps in out.values():
        assert torch.isfinite(maps).all()


class NoisyCNN(SmallCNN):
    """Draws from the global RNG in every forward, even in eval (noise layers, stochastic ops)."""

    def forward(self, x):
        self.seen_requires_grad = {p.requires_grad for p in self.parameters()}
        return super().forward(x + 0.01 * torch.randn_like(x))


def test_rng_isolated_and_parameters_frozen_while_explaining(images):
    model = seeded(NoisyCNN()).eval()
    before = snapshot(model)
    explain(model, images, ig_steps=8)
    assert model.seen_requires_grad == {False}  # no weight gradients are ever computed
    assert_same(before, snapshot(model))


def test_state_restored_when_a_method_raises(trained_state_model, images, monkeypatch):
    model = trained_state_model
    before = snapshot(model)

    def boom(session, options):
        session.layer_gradients()
        raise RuntimeError("simulated out of memory")

    monkeypatch.setitem(METHODS, "guided_gradcam", replace(METHODS["guided_gradcam"], compute=boom))
    with pytest.raises(RuntimeError, match="simulated"):
        explain(model, images, methods=("gradcam", "guided_gradcam"))
    assert_same(before, snapshot(model))

    out = explain(model, images, methods=("gradcam", "guided_gradcam"), on_error="collect")
    assert "gradcam" in out and "guided_gradcam" not in out
    assert "simulated" in str(out.errors["guided_gradcam"])
    assert_same(before, snapshot(model))


def test_constant_model_gives_finite_zero_maps(images):
    model = SmallCNN()
    for p in model.parameters():
        nn.init.zeros_(p)
    out = explain(model.eval(), images, ig_steps=8)
    for name, maps in out.items():
        assert torch.isfinite(maps).all(), name
    assert out["gradcam"].abs().max() == 0


def test_functional_relu_model_runs_all_methods(images):
    out = explain(seeded(FunctionalCNN()).eval(), images, ig_steps=8)
    assert out["guided_gradcam"].abs().sum() > 0


def test_model_without_relu_warns_for_guided_backprop(images):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.warns(UserWarning, match="no ReLU"):
        explain(model, images, methods=("guided_gradcam",))


def test_float64_and_bfloat16_models_give_float32_maps(images):
    for dtype in (torch.float64, torch.bfloat16):
        model = seeded(SmallCNN()).eval().to(dtype)
        out = explain(model, images, methods=("gradcam", "dff", "ig"), ig_steps=8)
        for maps in out.values():
            assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


def test_bad_arguments_are_named():
    model, x = SmallCNN(), torch.randn(2, 3, 32, 32)
    with pytest.raises(SaliencyConfigError, match="known methods: .*gradcam"):
        explain(model, x, methods=("gradcan",))
    with pytest.raises(SaliencyConfigError, match="unknown option"):
        explain(model, x, methods=("gradcam",), ig_stepz=3)
    with pytest.raises(SaliencyConfigError, match="float tensor"):
        explain(model, torch.zeros(2, 32, 32), methods=("gradcam",))
    with pytest.raises(SaliencyConfigError, match="out of range"):
        explain(model, x, targets=[0, 9], methods=("gradcam",))
