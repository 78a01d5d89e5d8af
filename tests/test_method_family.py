"""Every method behind explain(): against its reference library, and under the safety tests."""

import copy

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion
from models import SmallCNN, seeded
from test_reference_methods import _minmax, _per_image_corr
from test_safety import _assert_same, _snapshot
from torch import nn

from lightning_saliency import SaliencyCallback, available_methods, explain

TARGETS = [0, 1, 2, 3]


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
    corr = _per_image_corr(_minmax(ours[method]), ref)
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


def test_smoothgrad_matches_captum_with_private_noise(images):
    model = seeded(SmallCNN()).eval()
    rng = torch.get_rng_state()
    ours = explain(model, images, targets=TARGETS, methods=("smoothgrad",), nt_samples=4)
    assert torch.equal(rng, torch.get_rng_state())  # the global RNG is untouched
    again = explain(model, images, targets=TARGETS, methods=("smoothgrad",), nt_samples=4)
    torch.testing.assert_close(ours["smoothgrad"], again["smoothgrad"])  # same noise each time
    torch.manual_seed(0)
    spread = float(images.max() - images.min())
    ref = NoiseTunnel(IntegratedGradients(model)).attribute(
        images,
        nt_type="smoothgrad_sq",
        nt_samples=4,
        stdevs=0.1 * spread,
        target=torch.tensor(TARGETS),
        n_steps=8,
        nt_samples_batch_size=4,
    )
    corr = _per_image_corr(ours["smoothgrad"], ref.sum(1))
    assert corr.min() >= 0.99, corr
    var = explain(
        model, images, targets=TARGETS, methods=("smoothgrad",), nt_samples=4, nt_type="vargrad"
    )
    assert not torch.allclose(var["smoothgrad"], ours["smoothgrad"])


@pytest.fixture
def model_mid_training(images):
    model = seeded(SmallCNN()).train()
    model(images).sum().backward()
    model.fc.bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_method_leaves_the_model_as_found(model_mid_training, images, method):
    before = _snapshot(model_mid_training)
    with torch.inference_mode():
        inputs = images * 1.0
    out = explain(model_mid_training, inputs, methods=(method,), ig_steps=8, nt_samples=2)
    _assert_same(before, _snapshot(model_mid_training))
    assert torch.isfinite(out[method]).all()
    assert out[method].shape[-2:] == (32, 32)


def test_every_method_is_selectable_in_the_callback():
    callback = SaliencyCallback(methods=sorted(available_methods()))
    assert set(callback.methods) == set(available_methods())
    descriptions = available_methods()
    assert all(len(text) > 20 for text in descriptions.values())


class TinyViT(nn.Module):
    """Patch embedding, a class token, two transformer blocks, a head on the class token."""

    def __init__(self, size: int = 32, patch: int = 8, dim: int = 32, classes: int = 4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (size // patch) ** 2, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0, batch_first=True) for _ in range(2)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1) + self.pos
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def test_vision_transformers_work_through_token_reshape():
    import torchvision

    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(image_size=64, num_classes=4).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision initialises the head to zero
    out = explain(vit, torch.randn(2, 3, 64, 64), methods=("gradcam", "layercam", "eigencam"))
    assert out.layer_name == "encoder.layers.encoder_layer_11.ln_1"  # not conv_proj
    assert out["gradcam"].shape == (2, 64, 64) and out["gradcam"].abs().sum() > 0

    tiny = TinyViT().eval()
    out = explain(tiny, torch.randn(2, 3, 32, 32), methods=("gradcam", "ablationcam"))
    assert out.layer_name == "blocks.0"  # post-norm: after block 1's attention only cls counts
    assert "patch_embed" not in out.layer_name
    assert out["gradcam"].shape == (2, 32, 32) and torch.isfinite(out["ablationcam"]).all()
