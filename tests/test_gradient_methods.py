"""captum's gradient family, each equal to captum on the same model (and the same draws)."""

import copy

import numpy as np
import pytest
import torch
from captum.attr import (
    Deconvolution,
    DeepLift,
    GradientShap,
    GuidedBackprop,
    InputXGradient,
    Saliency,
)
from models import FunctionalCNN, ModuleCNN, seeded

from lightning_saliency import SaliencyConfigError, explain
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.engine.methods.gradients import gradient_shap_draws

TARGETS = [0, 1, 2, 3]
CAPTUM = {
    "saliency": Saliency,
    "input_x_gradient": InputXGradient,
    "guided_backprop": GuidedBackprop,
    "deconvolution": Deconvolution,
    "deeplift": DeepLift,
}


@pytest.mark.parametrize("name", sorted(CAPTUM))
def test_each_equals_captum_on_a_model_of_relu_modules(images, name):
    model = seeded(ModuleCNN()).eval()
    ours = explain(model, images, TARGETS, methods=(name,))[name]
    reference = copy.deepcopy(model)
    ref = CAPTUM[name](reference).attribute(
        images.clone().requires_grad_(True), target=torch.tensor(TARGETS)
    )
    torch.testing.assert_close(ours, ref.detach().sum(1), rtol=1e-4, atol=1e-6)
    assert ((ours < 0).any()).item() == (METHODS[name].sign == "signed")


@pytest.mark.parametrize("name", ["guided_backprop", "deconvolution"])
def test_relu_rules_see_functional_relus_that_captum_misses(images, name):
    functional = seeded(FunctionalCNN()).eval()
    modular = ModuleCNN().eval()
    modular.load_state_dict(functional.state_dict())
    ours = explain(functional, images, TARGETS, methods=(name,))[name]
    on_modules = explain(modular, images, TARGETS, methods=(name,))[name]
    torch.testing.assert_close(ours, on_modules, rtol=1e-5, atol=1e-7)
    missed = CAPTUM[name](functional).attribute(images.clone(), target=torch.tensor(TARGETS))
    assert not torch.allclose(missed.sum(1), ours, atol=1e-5)  # captum's map is the plain one


def test_deeplift_refuses_a_model_with_functional_relus(images):
    """captum's DeepLift applies its rule to nn.ReLU modules only: on F.relu it would give a
    wrong map without a word."""
    model = seeded(FunctionalCNN()).eval()
    with pytest.raises(SaliencyConfigError, match=r"F\.relu.*nn\.ReLU modules"):
        explain(model, images, TARGETS, methods=("deeplift",))


def test_gradient_shap_equals_captum_on_the_same_draws(images, monkeypatch):
    model = seeded(ModuleCNN()).eval()
    ours = explain(
        model,
        images,
        TARGETS,
        methods=("gradient_shap",),
        method_options={"gradient_shap": {"samples": 6}},
    )["gradient_shap"]
    alphas, _, _ = gradient_shap_draws(6, 1, seed=0)
    # captum repeats each image n_samples times (image-major) and draws one alpha a row
    monkeypatch.setattr(np.random, "uniform", lambda lo, hi, n: alphas.repeat(4).numpy())
    ref = GradientShap(model).attribute(
        images, baselines=torch.zeros(1, 3, 32, 32), n_samples=6, target=torch.tensor(TARGETS)
    )
    torch.testing.assert_close(ours, ref.sum(1), rtol=1e-4, atol=1e-6)


def test_gradient_shap_draws_from_given_baselines(images):
    model = seeded(ModuleCNN()).eval()
    pool = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    options = {"gradient_shap": {"samples": 8, "baselines": pool}}
    two = explain(model, images, TARGETS, methods=("gradient_shap",), method_options=options)
    one = explain(model, images, TARGETS, methods=("gradient_shap",))
    assert not torch.allclose(two["gradient_shap"], one["gradient_shap"])
