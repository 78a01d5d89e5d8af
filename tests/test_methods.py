"""Every method against its reference library on the same model, and the safety matrix:
each method leaves the model exactly as it found it."""

import copy

import numpy as np
import pytest
import torch
from captum.attr import GuidedGradCam, IntegratedGradients, Occlusion
from helpers import assert_same, minmax, per_image_corr, snapshot
from models import FunctionalCNN, ModuleCNN, SmallCNN, seeded, small_model_for
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lightning_saliency import SaliencyCallback, available_methods, explain
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.engine.methods.dff import nmf

TARGETS = [0, 1, 2, 3]


def test_gradcam_matches_pytorch_grad_cam(images):
    model = seeded(SmallCNN()).eval()
    ours = explain(model, images, targets=TARGETS, methods=("gradcam",), target_layer="features")
    reference_model = copy.deepcopy(model)
    with GradCAM(reference_model, [reference_model.features]) as cam:
        ref = cam(images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    corr = per_image_corr(minmax(ours["gradcam"]), torch.from_numpy(ref))
    assert corr.min() >= 0.99, corr


def test_guided_gradcam_matches_captum(images):
    model = seeded(ModuleCNN()).eval()
    ours = explain(
        model, images, targets=TARGETS, methods=("guided_gradcam",), target_layer="relu2"
    )
    reference_model = copy.deepcopy(model)
    ref = GuidedGradCam(reference_model, reference_model.relu2).attribute(
        images, target=torch.tensor(TARGETS), interpolate_mode="bilinear"
    )
    corr = per_image_corr(ours["guided_gradcam"], ref.sum(1))
    assert corr.min() >= 0.99, corr


def test_guided_backprop_sees_functional_and_inplace_relu(images):
    """captum needs nn.ReLU modules; ours gives the same maps when the model calls F.relu."""
    functional = seeded(FunctionalCNN()).eval()
    modular = ModuleCNN().eval()
    modular.load_state_dict(functional.state_dict())
    ours = explain(
        functional, images, targets=TARGETS, methods=("guided_gradcam",), target_layer="conv2"
    )
    ref = GuidedGradCam(modular, modular.conv2).attribute(
        images, target=torch.tensor(TARGETS), interpolate_mode="bilinear"
    )
    corr = per_image_corr(ours["guided_gradcam"], ref.sum(1))
    assert corr.min() >= 0.99, corr


def test_integrated_gradients_matches_captum_and_is_complete(images):
    model = seeded(SmallCNN(), scale=0.6).eval()
    ours = explain(model, images, targets=TARGETS, methods=("ig",), ig_steps=64)
    ref = IntegratedGradients(model).attribute(images, target=torch.tensor(TARGETS), n_steps=64)
    torch.testing.assert_close(ours["integrated_gradients"], ref.sum(1), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        gap = (model(images) - model(torch.zeros_like(images)))[range(4), TARGETS]
    total = ours["integrated_gradients"].flatten(1).sum(1)
    assert ((total - gap).abs() / gap.abs()).max() <= 0.01
    assert ours.extras["ig_completeness_error"].max() <= 0.01


def test_dff_reconstruction_close_to_scikit_learn():
    from sklearn.decomposition import NMF

    gen = torch.Generator().manual_seed(0)
    acts = torch.relu(
        torch.randn(4, 32, 6, 6, generator=gen) + 0.3 * torch.randn(1, 32, 1, 1, generator=gen)
    )
    v = acts.permute(1, 0, 2, 3).reshape(32, -1)
    v = v - v.min(dim=1, keepdim=True).values
    w, h = nmf(v, 4)
    ours = float((v - w @ h).norm())
    sk = NMF(n_components=4, init="random", random_state=0, max_iter=200)
    sk_w = sk.fit_transform(v.numpy())
    theirs = float(np.linalg.norm(v.numpy() - sk_w @ sk.components_))
    assert ours <= 1.10 * theirs, (ours, theirs)


def test_dff_maps_and_concept_scores(images):
    model = seeded(SmallCNN()).eval()
    out = explain(model, images, methods=("dff",), dff_components=3)
    assert out["dff"].shape == (4, 3, 32, 32)
    assert out["dff"].min() >= 0
    assert out.extras["dff_concept_scores"].shape == (3, 4)
    again = explain(model, images, methods=("dff",), dff_components=3)
    torch.testing.assert_close(out["dff"], again["dff"])  # deterministic, stable concept order


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam", "dff", "integrated_gradients"])
def test_maps_live_on_the_input_device_at_input_resolution(images, method):
    model = seeded(SmallCNN()).eval()
    out = explain(model, images[:, :, :, :24], methods=(method,), ig_steps=8)
    assert out[method].device == images.device
    assert out[method].shape[-2:] == (32, 24)
    assert out[method].dtype == torch.float32


def _reference_cam(cls, model, images):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    reference = copy.deepcopy(model)
    with cls(reference, [reference.features]) as cam:
        cam.batch_size = 64  # ScoreCAM's chunk
        return torch.from_numpy(cam(images, targets=[ClassifierOutputTarget(t) for t in TARGETS]))


@pytest.mark.parametrize(
    "method, reference",
    [
        ("gradcam++", "GradCAMPlusPlus"),
        ("xgradcam", "XGradCAM"),
        ("layercam", "LayerCAM"),
        ("hirescam", "HiResCAM"),
        ("eigencam", "EigenCAM"),
        ("scorecam", "ScoreCAM"),
        ("ablationcam", "AblationCAM"),
    ],
)
def test_cam_family_matches_pytorch_grad_cam(images, method, reference):
    import pytorch_grad_cam

    model = seeded(SmallCNN()).eval()
    ours = explain(model, images, targets=TARGETS, methods=(method,), target_layer="features")
    ref = _reference_cam(getattr(pytorch_grad_cam, reference), model, images)
    corr = per_image_corr(minmax(ours[method]), ref)
    flat = (ours[method].flatten(1).amax(1) == 0) & (ref.flatten(1).amax(1) == 0)
    corr = torch.where(flat, torch.ones_like(corr), corr)  # both all-zero: they agree
    assert corr.min() >= 0.99, corr
    assert ours[method].device == images.device and ours[method].shape == (4, 32, 32)


def test_occlusion_matches_captum(images):
    model = seeded(SmallCNN()).eval()
    ours = explain(model, images, targets=TARGETS, methods=("occlusion",))
    ref = Occlusion(model).attribute(
        images,
        sliding_window_shapes=(3, 4, 4),
        strides=(3, 2, 2),
        target=torch.tensor(TARGETS),
        baselines=0.0,
    )
    torch.testing.assert_close(ours["occlusion"], ref.sum(1), rtol=1e-4, atol=1e-5)


@pytest.fixture
def model_mid_training(images):
    def mid_training(method: str) -> torch.nn.Module:
        model = seeded(small_model_for(method)).train()
        model(images).sum().backward()
        list(model.parameters())[-1].requires_grad_(False)  # the head's bias
        return model

    return mid_training


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_leaves_the_model_as_found(model_mid_training, images, method):
    model_mid_training = model_mid_training(method)
    before = snapshot(model_mid_training)
    with torch.inference_mode():
        inputs = images * 1.0
    noisy = METHODS[method].options.__dataclass_fields__.get("samples") is not None
    fewer = {method: {"samples": 2}} if noisy else None
    out = explain(model_mid_training, inputs, methods=(method,), ig_steps=8, method_options=fewer)
    assert_same(before, snapshot(model_mid_training))
    assert torch.isfinite(out[method]).all()
    assert out[method].shape[-2:] == (32, 32)


def test_every_method_is_selectable_in_the_callback():
    callback = SaliencyCallback(methods=sorted(available_methods()))
    assert set(callback.methods) == set(available_methods())
    descriptions = available_methods()
    assert all(len(text) > 20 for text in descriptions.values())


def test_dff_concepts_keep_their_place_from_one_call_to_the_next(monkeypatch):
    """The second epoch's factorisation comes out with another concept dominant (its mass
    order changed on purpose): matched to the first epoch's concepts, each keeps its index,
    so its colour."""
    import importlib

    dff_module = importlib.import_module("lightning_saliency.engine.methods.dff")
    real, calls = dff_module.nmf, {"n": 0}

    def reweighted(v, k, *args, **kwargs):
        w, h = real(v, k, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # the weakest concept becomes by far the strongest
            weakest = int((h.sum(1) * w.norm(dim=0)).argmin())
            h = h.clone()
            h[weakest] *= 1000
        return w, h

    monkeypatch.setattr(dff_module, "nmf", reweighted)
    model = seeded(SmallCNN()).eval()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    memory: dict = {}
    first = explain(model, images, methods=("dff",), warm_start=memory)["dff"]
    second = explain(model, images, methods=("dff",), warm_start=memory)["dff"]

    def winners(maps):
        return (maps / maps.flatten(2).amax(2)[..., None, None].clamp(min=1e-12)).argmax(1)

    assert torch.equal(winners(first), winners(second))
