"""torchcam's CAMs that the others lack: CAM, IS-CAM, SS-CAM and SmoothGrad-CAM++, batched on
the device.

- ``cam`` (Zhou et al. 2016): the classifier's weights of the explained class weight the
  channels, with no ReLU (signed, as the paper and torchcam). It needs a head that is global
  pooling and one ``nn.Linear`` over the target layer's channels; any other head is refused
  (Grad-CAM, which works for any head, is CAM's positive part there).
- ``iscam`` (IS-CAM) and ``sscam`` (SS-CAM): Score-CAM's channel scores, integrated over
  growing masks or averaged over noisy masks, as torchcam computes them: each channel's
  activation, min-max normalised at the layer's resolution and upsampled (bilinear), masks the
  input; the target score's rise over the image's own score, averaged, is soft-maxed over the
  channels.
- ``smoothgradcam++`` (Omeiza et al. 2019): Grad-CAM++'s weights from gradients averaged over
  noisy copies of the input.

Why our own: torchcam hooks the model, draws its noise from the global RNG for the whole batch
(a sample's map depended on its neighbours, and the training RNG moved) and, for
SmoothGrad-CAM++, weights the last noisy copy's gradient and activations. Here the noise is one
private draw shared by every image, SmoothGrad-CAM++ follows the paper (mean gradients, the
clean image's activations), and the forwards run in batches. ``tests/test_torchcam_family.py``
compares each with torchcam on the same model and noise (correlation >= 0.99).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.engine.methods.base import MethodOptions, SaliencyMethod, register
from lightning_saliency.engine.methods.cam import cam_method
from lightning_saliency.engine.methods.perturbation import PerturbationOptions, batched_scores
from lightning_saliency.engine.methods.session import ExplainSession, upsample
from lightning_saliency.engine.methods.smoothgrad import shared_noise
from lightning_saliency.errors import SaliencyConfigError

_EPS = 1e-8  # torchcam's


def classifier_weights(session: ExplainSession) -> Tensor:
    """CAM's channel weights ``(N, C)``: the rows of the last ``nn.Linear`` whose inputs are
    the target layer's channels and whose outputs are the classes."""
    acts = session.layer_activations()
    channels, classes = acts.shape[1], session.logits.shape[1]
    heads = [
        m
        for m in session.model.modules()
        if isinstance(m, nn.Linear) and m.in_features == channels and m.out_features == classes
    ]
    if not heads:
        raise SaliencyConfigError(
            f"cam needs a head of global pooling and one nn.Linear({channels}, {classes}) over "
            f"the target layer's {channels} channels; {type(session.model).__name__} has none. "
            "Choose gradcam (the same map for such heads, and any head otherwise), or a "
            "target_layer= whose channels feed the classifier."
        )
    if session._score_fn is not None:
        raise SaliencyConfigError(
            "cam weights channels by one class's classifier row: it needs class targets, not "
            "a target function. Choose gradcam."
        )
    weight = heads[-1].weight.detach().float()
    labels = session._weights
    rows: Tensor = weight[session.targets] if labels is None else labels.float() @ weight
    return rows  # multi-hot targets: the sum of the labels' rows


def cam(session: ExplainSession, _options: Any) -> Tensor:
    """CAM: the channels weighted by the explained class's classifier weights, without a
    ReLU (as the paper and torchcam): signed, negative where a region speaks against the
    class."""
    weights = classifier_weights(session)[..., None, None]
    return upsample((weights * session.layer_activations()).sum(dim=1), session.size)


def _normalised_masks(session: ExplainSession) -> Tensor:
    """Each channel min-max normalised at the layer's resolution, then upsampled bilinearly
    to the input, ``(N, C, H, W)`` (torchcam's masks)."""
    acts = session.layer_activations().clone()
    acts -= acts.flatten(2).amin(2)[..., None, None]
    acts /= acts.flatten(2).amax(2)[..., None, None] + _EPS
    return F.interpolate(acts, size=session.size, mode="bilinear", align_corners=False)


@dataclass(frozen=True)
class ISCAMOptions(PerturbationOptions):
    """Options of ``iscam``.

    Attributes:
        batch_size: masked images per forward.
        samples: integration steps (torchcam's ``num_samples``).
    """

    samples: int = 10

    def check(self) -> None:
        super().check()
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")


@dataclass(frozen=True)
class SSCAMOptions(PerturbationOptions):
    """Options of ``sscam``.

    Attributes:
        batch_size: masked images per forward.
        samples: noisy masks per channel (torchcam's ``num_samples``).
        std: the noise's standard deviation on the normalised masks (torchcam's ``std``).
        seed: the noise seed; ``None``: ``explain()``'s ``seed``.
    """

    samples: int = 35
    std: float = 2.0
    seed: int | None = None

    def check(self) -> None:
        super().check()
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.std < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")


def _rise_over_image(session: ExplainSession, batch_size: int, masked: Any) -> Tensor:
    """``(N, C)``: target score of ``masked(i, start, stop)`` minus the image's own."""
    with torch.no_grad():
        own = session.target_scores(session.images).float()
    channels = session.layer_activations().shape[1]
    return batched_scores(session, batch_size, masked, channels) - own[:, None]


def iscam_weights(session: ExplainSession, options: ISCAMOptions) -> Tensor:
    """IS-CAM: the rise of the target score under the channel's mask, scaled by torchcam's
    growing coefficients (1/k, then + 2/k, ...), averaged over ``samples``, soft-maxed."""
    masks, images = _normalised_masks(session), session.images
    total = torch.zeros(images.shape[0], masks.shape[1], device=images.device)
    coefficient = 0.0
    for step in range(options.samples):
        coefficient += (step + 1) / options.samples
        scale = coefficient

        def masked(i: int, start: int, stop: int, scale: float = scale) -> Tensor:
            return scale * (images[i : i + 1] * masks[i, start:stop, None].to(images.dtype))

        total += _rise_over_image(session, options.batch_size, masked)
    return (total / options.samples).softmax(dim=1)


def sscam_noise(shape: tuple[int, ...], options: SSCAMOptions, seed: int) -> Tensor:
    """``(samples, C, H, W)`` noise for the masks, one private draw shared by every image."""
    return shared_noise(shape, options.samples, seed) * options.std


def sscam_weights(session: ExplainSession, options: SSCAMOptions) -> Tensor:
    """SS-CAM: the rise of the target score under noisy channel masks, averaged, soft-maxed."""
    masks, images = _normalised_masks(session), session.images
    seed = session.seed if options.seed is None else options.seed
    noise = sscam_noise(tuple(masks.shape[1:]), options, seed).to(masks.device)
    total = torch.zeros(images.shape[0], masks.shape[1], device=images.device)
    for sample in range(options.samples):
        noisy = masks + noise[sample][None]

        def masked(i: int, start: int, stop: int, noisy: Tensor = noisy) -> Tensor:
            return images[i : i + 1] * noisy[i, start:stop, None].to(images.dtype)

        total += _rise_over_image(session, options.batch_size, masked)
    return (total / options.samples).softmax(dim=1)


@dataclass(frozen=True)
class SmoothGradCAMppOptions(MethodOptions):
    """Options of ``smoothgradcam++``.

    Attributes:
        samples: noisy copies of the input (torchcam's ``num_samples``).
        std: the noise's standard deviation, in input units (torchcam's ``std``).
        seed: the noise seed; ``None``: ``explain()``'s ``seed``.
    """

    samples: int = 4
    std: float = 0.3
    seed: int | None = None

    def check(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.std < 0:
            raise ValueError(f"std must be >= 0, got {self.std}")


def layer_gradients_at(session: ExplainSession, x: Tensor) -> Tensor:
    """d(explained score)/d(target layer output) for inputs ``x`` (one row per image),
    ``(N, C, h, w)``."""
    captured: dict[str, Tensor] = {}

    def keep(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
        if "out" in captured:
            return out
        out = out if out.requires_grad else out.detach().requires_grad_()
        captured["out"] = out
        return out.clone()

    assert session.layer is not None  # a layer method
    handle = session.layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            score = session._target_of_output(session.model(x.detach())).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(score, captured["out"])
    return session.spatial(grad).detach().float()


def smoothgradcampp_weights(session: ExplainSession, options: SmoothGradCAMppOptions) -> Tensor:
    """SmoothGrad-CAM++: Grad-CAM++'s alpha from the mean squared and cubed gradients over
    noisy copies, times the positive mean gradient, summed over space."""
    acts, images = session.layer_activations(), session.images
    seed = session.seed if options.seed is None else options.seed
    noise = shared_noise(tuple(images.shape[1:]), options.samples, seed) * options.std
    noise = noise.to(images.device, images.dtype)
    g1 = g2 = g3 = torch.zeros_like(acts)
    for sample in range(options.samples):
        grads = layer_gradients_at(session, images + noise[sample][None])
        g1, g2, g3 = g1 + grads, g2 + grads**2, g3 + grads**3
    g1, g2, g3 = g1 / options.samples, g2 / options.samples, g3 / options.samples
    alpha = g2 / (2 * g2 + (g3 * acts).flatten(2).sum(-1)[..., None, None] + _EPS)
    return (alpha * g1.clamp(min=0)).flatten(2).sum(-1)


register(
    SaliencyMethod(
        "cam",
        cam,
        "CAM (Zhou et al.): the classifier's weights of the class weight the channels, "
        "signed (global-pooling + linear heads only).",
        sign="signed",
        passes="1F",
        aliases=("class_activation_map",),
    )
)
cam_method(
    "iscam",
    iscam_weights,
    "IS-CAM: Score-CAM's channel scores integrated over growing masks (torchcam).",
    options=ISCAMOptions,
    cost="expensive",
    passes="samples x C F (C = layer channels)",
    aliases=("is-cam", "is_cam"),
)
cam_method(
    "sscam",
    sscam_weights,
    "SS-CAM: Score-CAM's channel scores averaged over noisy masks (torchcam).",
    options=SSCAMOptions,
    cost="expensive",
    passes="samples x C F (C = layer channels)",
    aliases=("ss-cam", "ss_cam"),
)
cam_method(
    "smoothgradcam++",
    smoothgradcampp_weights,
    "SmoothGrad-CAM++: Grad-CAM++ weights from gradients averaged over noisy inputs.",
    options=SmoothGradCAMppOptions,
    cost="moderate",
    passes="(1 + samples) x (1F + 1B)",
    aliases=("smoothgradcampp", "smooth_gradcam++"),
)
