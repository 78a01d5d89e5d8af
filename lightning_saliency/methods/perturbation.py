"""Forward-only methods: Score-CAM, Ablation-CAM (per channel) and Occlusion (per window).

They need many forwards, batched here (``perturbation_batch_size`` images per forward) on the
device. pytorch-grad-cam's ScoreCAM/AblationCAM (references in the tests) loop with ``.item()``
per image on the CPU; captum's ``Occlusion`` is used as is.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from captum.attr import Occlusion
from torch import Tensor

from lightning_saliency.methods.base import (
    ExplainSession,
    SaliencyMethod,
    as_logits,
    register,
    upsample,
)

_OPTIONS = {"perturbation_batch_size": 64}


def _batched_scores(
    session: ExplainSession, make_batch: Any, count: int, hook: Any = None
) -> Tensor:
    """Target logits of ``count`` perturbed forwards per image, ``(N, count)``."""
    size = int(session.options["perturbation_batch_size"])
    n = session.images.shape[0]
    scores = torch.empty(n, count, device=session.images.device)
    with torch.no_grad():
        for i in range(n):
            target = int(session.targets[i])
            for start in range(0, count, size):
                stop = min(count, start + size)
                batch = make_batch(i, start, stop)
                handle = session.layer.register_forward_hook(hook(i, start, stop)) if hook else None
                try:
                    logits = as_logits(session.model(batch))
                finally:
                    if handle is not None:
                        handle.remove()
                scores[i, start:stop] = logits[:, target].float()
    return scores


def scorecam(session: ExplainSession) -> Tensor:
    """Score-CAM: each channel's upsampled, normalised activation masks the input; the
    softmax of the resulting target scores weights the channels. Gradient-free."""
    acts = session.layer_activations()
    n, c = acts.shape[:2]
    masks = F.interpolate(acts, size=session.size, mode="bilinear", align_corners=True)
    lo = masks.flatten(2).amin(2)[..., None, None]
    hi = masks.flatten(2).amax(2)[..., None, None]
    masks = (masks - lo) / (hi - lo + 1e-8)
    images = session.images

    def make_batch(i: int, start: int, stop: int) -> Tensor:
        return images[i : i + 1] * masks[i, start:stop, None].to(images.dtype)

    weights = _batched_scores(session, make_batch, c).softmax(dim=1)
    cam = (weights[..., None, None] * acts).sum(dim=1).clamp(min=0)
    return upsample(cam, session.size)


def ablationcam(session: ExplainSession) -> Tensor:
    """Ablation-CAM: the relative drop of the target score when one channel of the layer is
    zeroed weights that channel. Gradient-free."""
    acts = session.layer_activations()
    n, c = acts.shape[:2]
    original = session.logits.detach().gather(1, session.targets[:, None]).float()
    images = session.images

    def make_batch(i: int, start: int, stop: int) -> Tensor:
        return images[i : i + 1].expand(stop - start, *images.shape[1:])

    def hook(i: int, start: int, stop: int) -> Any:
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

    ablated = _batched_scores(session, make_batch, c, hook)
    weights = (original - ablated) / original.where(
        original.abs() > 1e-8, torch.ones_like(original)
    )
    cam = (weights[..., None, None] * acts).sum(dim=1).clamp(min=0)
    return upsample(cam, session.size)


def occlusion_window(size: tuple[int, int]) -> tuple[int, int]:
    """Default window side and stride: 1/8 of the shorter side (at least 3), half-overlapping.

    Example:
        >>> occlusion_window((224, 224)), occlusion_window((32, 32))
        ((28, 14), (4, 2))
    """
    side = max(3, round(min(size) / 8))
    return side, max(1, side // 2)


def occlusion(session: ExplainSession) -> Tensor:
    """Occlusion: the drop of the target score when a window is greyed out (zeros), summed
    over colour channels. Forward passes only, batched over window positions."""
    images = session.images
    default_window, default_stride = occlusion_window(session.size)
    window = int(session.options.get("occlusion_window") or default_window)
    stride = int(session.options.get("occlusion_stride") or default_stride)
    channels = images.shape[1]
    method = Occlusion(lambda x: as_logits(session.model(x)))
    with torch.no_grad():
        attr = method.attribute(
            images,
            sliding_window_shapes=(channels, window, window),
            strides=(channels, stride, stride),
            target=session.targets,
            baselines=0.0,
            perturbations_per_eval=max(
                1, int(session.options["perturbation_batch_size"]) // images.shape[0]
            ),
        )
    return attr.float().sum(dim=1)


register(
    SaliencyMethod(
        "scorecam",
        scorecam,
        "Score-CAM: channels weighted by the score of "
        "the input they mask (gradient-free; C forwards per image).",
        options=_OPTIONS,
        aliases=("score_cam", "score-cam"),
    )
)
register(
    SaliencyMethod(
        "ablationcam",
        ablationcam,
        "Ablation-CAM: channels weighted by the "
        "score drop when zeroed (gradient-free; C forwards per image).",
        options=_OPTIONS,
        aliases=("ablation_cam", "ablation-cam"),
    )
)
register(
    SaliencyMethod(
        "occlusion",
        occlusion,
        "Occlusion: score drop when a window is "
        "greyed out (forward only; one forward per window position).",
        needs_layer=False,
        options={**_OPTIONS, "occlusion_window": None, "occlusion_stride": None},
    )
)
