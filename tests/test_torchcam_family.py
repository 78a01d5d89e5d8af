"""torchcam's CAMs, each against torchcam on the same model (and the same noise)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import per_image_corr
from models import MLP, SmallCNN, seeded

from lightning_saliency import SaliencyConfigError, explain
from lightning_saliency.engine.methods import smoothgrad as noise_methods
from lightning_saliency.engine.methods.torchcam_family import SSCAMOptions, sscam_noise

torchcam = pytest.importorskip("torchcam.methods")  # Python >= 3.11 (its own requirement)

TARGETS = [0, 1, 2, 3]


def reference(extractor_class, model, images, draws=None, monkeypatch=None, **kwargs):
    """torchcam's maps at input size; ``draws``: what its noise distribution returns, in turn
    (torchcam draws with ``torch.distributions.Normal.sample``)."""
    model = copy.deepcopy(model)
    if draws is not None:
        supply = iter(draws)
        monkeypatch.setattr(
            torch.distributions.Normal, "sample", lambda self, size: next(supply).expand(size)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with extractor_class(
            model, target_layer="features", input_shape=(3, 32, 32), **kwargs
        ) as cam:
            scores = model(images)
            maps = cam(class_idx=TARGETS, scores=scores)[0]
    if monkeypatch is not None:
        monkeypatch.undo()
    return F.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear")[:, 0]


def ours(model, images, name, options=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = explain(
            model, images, TARGETS, (name,), "features", method_options={name: options or {}}
        )
    return out[name]


@pytest.fixture
def model():
    return seeded(SmallCNN()).eval()


def test_cam_equals_torchcam(model, images):
    ref = reference(torchcam.CAM, model, images, fc_layer="fc")
    corr = per_image_corr(ours(model, images, "cam"), ref)
    assert corr.min() >= 0.99, corr
    assert (ours(model, images, "cam") < 0).any()  # signed, as the paper: no ReLU


def test_cam_refuses_a_head_it_cannot_read(images):
    class TwoLayerHead(SmallCNN):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Sequential(
                torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)
            )

    model = seeded(TwoLayerHead()).eval()
    with pytest.raises(SaliencyConfigError, match=r"nn.Linear\(16, 4\).*Choose gradcam"):
        explain(model, images, TARGETS, ("cam",), "features")
    with pytest.raises(SaliencyConfigError):
        explain(MLP().eval(), torch.rand(2, 3, 8, 8), methods=("cam",))


def test_iscam_equals_torchcam(model, images):
    ref = reference(torchcam.ISCAM, model, images, num_samples=3)
    corr = per_image_corr(ours(model, images, "iscam", {"samples": 3}), ref)
    assert corr.min() >= 0.99, corr


def test_sscam_equals_torchcam_on_the_same_noise(model, images, monkeypatch):
    options = SSCAMOptions(samples=3)
    noise = sscam_noise((16, 32, 32), options, seed=0)  # the layer's 16 channels at input size
    draws = [d.clone() for d in noise]
    ref = reference(torchcam.SSCAM, model, images, draws, monkeypatch, num_samples=3)
    corr = per_image_corr(ours(model, images, "sscam", {"samples": 3}), ref)
    assert corr.min() >= 0.99, corr


def test_smoothgradcampp_equals_torchcam_with_one_noisy_copy(model, images, monkeypatch):
    """torchcam combines the last noisy copy's gradient and activations; we follow the paper
    (mean gradients, the clean image's activations). With one copy and the same noise they
    differ only in the activations the weights multiply: equal for small noise, close at
    torchcam's default 0.3."""
    for std, least in ((0.05, 0.99), (0.3, 0.9)):
        noise = noise_methods.shared_noise((3, 32, 32), 1, seed=0) * std
        ref = reference(
            torchcam.SmoothGradCAMpp, model, images, [noise[0]], monkeypatch, num_samples=1, std=std
        )
        options = {"samples": 1, "std": std}
        corr = per_image_corr(ours(model, images, "smoothgradcam++", options), ref)
        assert corr.min() >= least, (std, corr)
