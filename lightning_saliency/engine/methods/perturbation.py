"""Forward-only methods: Score-CAM, Ablation-CAM (per channel) and Occlusion (per window).

They need many forwards, batched here (``batch_size`` images per forward) on the device.
pytorch-grad-cam's ScoreCAM/AblationCAM (references in the tests) loop with ``.item()`` per image
on the CPU; captum's ``Occlusion`` is used as is. Score-CAM and Ablation-CAM are weight functions
on :func:`~lightning_saliency.engine.methods.cam.cam_method`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import Tensor

from lightning_saliency.engine.methods.base import MethodOptions, SaliencyMethod, register
from lightning_saliency.engine.methods.cam import cam_method
from lightning_saliency.engine.methods.session import ExplainSession

BatchMaker = Callable[[int, int, int], Tensor]
HookMaker = Callable[[int, int, int], Callable[..., Tensor]]


@dataclass(frozen=True)
class PerturbationOptions(MethodOptions):
    """Options of ``scorecam`` and ``ablationcam``.

    Attributes:
        batch_size: perturbed images per forward.
    """

    batch_size: int = 64

    def check(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class OcclusionOptions(PerturbationOptions):
    """Options of ``occlusion``.

    Attributes:
        batch_size: perturbed images per forward.
        window: side of the occluding square; ``None``: 1/8 of the shorter image side.
        stride: step between windows; ``None``: half the window.
    """

    window: int | None = None
    stride: int | None = None

    def check(self) -> None:
        super().check()
        for name in ("window", "stride"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")


def batched_scores(
    session: ExplainSession,
    batch_size: int,
    make_batch: BatchMaker,
    count: int,
    hook: HookMaker | None = None,
) -> Tensor:
    """Target logits of ``count`` perturbed forwards per image, ``(N, count)``."""
    n = session.images.shape[0]
    scores = torch.empty(n, count, device=session.images.device)
    layer = session.layer
    with torch.no_grad():
        for i in range(n):
            for start in range(0, count, batch_size):
                stop = min(count, start + batch_size)
                batch = make_batch(i, start, stop)
                handle = (
                    layer.register_forward_hook(hook(i, start, stop))
                    if hook is not None and layer is not None
                    else None
                )
                try:
                    scores[i, start:stop] = session.image_scores(batch, i).float()
                finally:
                    if handle is not None:
                        handle.remove()
    return scores


def scorecam_weights(session: ExplainSession, options: PerturbationOptions) -> Tensor:
    """Score-CAM: each channel's upsampled, normalised activation masks the input; the
    softmax of the resulting target scores weights the channels. Gradient-free."""
    acts = session.layer_activations()
    c = acts.shape[1]
    masks = F.interpolate(acts, size=session.size, mode="bilinear", align_corners=True)
    lo = masks.flatten(2).amin(2)[..., None, None]
    hi = masks.flatten(2).amax(2)[..., None, None]
    masks = (masks - lo) / (hi - lo + 1e-8)
    images = session.images

    def make_batch(i: int, start: int, stop: int) -> Tensor:
        return images[i : i + 1] * masks[i, start:stop, None].to(images.dtype)

    return batched_scores(session, options.batch_size, make_batch, c).softmax(dim=1)


def ablationcam_weights(session: ExplainSession, options: PerturbationOptions) -> Tensor:
    """Ablation-CAM: the relative drop of the target score when one channel of the layer is
    zeroed weights that channel. Gradient-free."""
    acts = session.layer_activations()
    c = acts.shape[1]
    with torch.no_grad():
        original = session.target_scores(session.images).float()[:, None]
    images = session.images

    def make_batch(i: int, start: int, stop: int) -> Tensor:
        return images[i : i + 1].expand(stop - start, *images.shape[1:])

    def hook(i: int, start: int, stop: int) -> Callable[..., Tensor]:
        channels = torch.arange(start, stop, device=images.device)

        def ablate(_module: Any, _inp: Any, out: Tensor) -> Tensor:
            keep = torch.ones(
                len(channels),
                out.shape[1 if out.dim() == 4 else -1],
                device=out.device,
                dtype=out.dtype,
            )
            keep[torch.arange(len(channels)), channels] = 0
            # Maps (B, C, h, w): zero channel c of copy c. Tokens (B, T, C): the same per token.
            return out * (keep[:, :, None, None] if out.dim() == 4 else keep[:, None, :])

        return ablate

    ablated = batched_scores(session, options.batch_size, make_batch, c, hook)
    return (original - ablated) / original.where(original.abs() > 1e-8, torch.ones_like(original))


def occlusion_window(size: tuple[int, int]) -> tuple[int, int]:
    """Default window side and stride: 1/8 of the shorter side (at least 3), half-overlapping.

    Examples:
        >>> occlusion_window((224, 224)), occlusion_window((32, 32))
        ((28, 14), (4, 2))
    """
    side = max(3, round(min(size) / 8))
    return side, max(1, side // 2)


def occlusion(session: ExplainSession, options: OcclusionOptions) -> Tensor:
    """Occlusion: the drop of the target score when a window is greyed out (zeros), summed
    over colour channels. Forward passes only, batched over window positions."""
    images = session.images
    default_window, default_stride = occlusion_window(session.size)
    window = options.window or default_window
    stride = options.stride or default_stride
    channels = images.shape[1]
    forward, target, extra = session.captum_forward()
    method = Occlusion(forward)
    with torch.no_grad():
        attr: Tensor = method.attribute(
            images,
            sliding_window_shapes=(channels, window, window),
            strides=(channels, stride, stride),
            target=target,
            additional_forward_args=extra or None,
            baselines=0.0,
            perturbations_per_eval=max(1, options.batch_size // images.shape[0]),
        )
    return attr.float().sum(dim=1)


cam_method(
    "scorecam",
    scorecam_weights,
    "Score-CAM: channels weighted by the score of "
    "the input they mask (gradient-free; C forwards per image).",
    options=PerturbationOptions,
    cost="expensive",
    passes="C F (C = layer channels)",
    flat_names={"perturbation_batch_size": "batch_size"},
    aliases=("score_cam", "score-cam"),
)
cam_method(
    "ablationcam",
    ablationcam_weights,
    "Ablation-CAM: channels weighted by the "
    "score drop when zeroed (gradient-free; C forwards per image).",
    options=PerturbationOptions,
    cost="expensive",
    passes="C F (C = layer channels)",
    flat_names={"perturbation_batch_size": "batch_size"},
    aliases=("ablation_cam", "ablation-cam"),
)
register(
    SaliencyMethod(
        "occlusion",
        occlusion,
        "Occlusion: score drop when a window is "
        "greyed out (forward only; one forward per window position).",
        options=OcclusionOptions,
        sign="signed",
        cost="expensive",
        passes="windows F",
        needs_layer=False,
        flat_names={
            "perturbation_batch_size": "batch_size",
            "occlusion_window": "window",
            "occlusion_stride": "stride",
        },
    )
)
