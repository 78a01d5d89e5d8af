"""Integrated Gradients through captum, chunked so memory stays bounded, with a completeness check.

captum's ``IntegratedGradients`` uses ``torch.autograd.grad`` (no ``.backward()``), so it meets the
contract once it gets non-inference clones and ``internal_batch_size`` (unchunked it runs
N x steps images at once). ``ig_steps="auto"`` doubles the steps until the completeness error
``|sum(attr) - (F(x) - F(baseline))| / |F(x) - F(baseline)|`` is at most ``ig_tolerance``.
"""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import IntegratedGradients
from torch import Tensor

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.methods.base import ExplainSession, SaliencyMethod, as_logits, register

AUTO_STEPS = (8, 16, 32, 64, 128, 256)


def make_baseline(images: Tensor, baseline: Any) -> Tensor:
    """``None`` → zeros (the mean image for normalised inputs); a number → constant; a tensor
    broadcast to the images."""
    if baseline is None:
        return torch.zeros_like(images)
    if isinstance(baseline, (int, float)):
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, Tensor):
        return baseline.to(images.device, images.dtype).expand_as(images).clone()
    raise SaliencyConfigError(f"ig_baseline must be None, a number or a tensor, got {baseline!r}.")


def completeness_error(
    attributions: Tensor, logits: Tensor, baseline_logits: Tensor, targets: Tensor
) -> Tensor:
    """Per-image relative completeness error of IG attributions ``(N, C, H, W)``."""
    gap = (logits - baseline_logits).gather(1, targets[:, None]).squeeze(1)
    total = attributions.flatten(1).sum(dim=1)
    return (total - gap).abs() / gap.abs().clamp(min=1e-6)


def internal_batch_size(option: int | None, images: Tensor) -> int:
    """Images per IG pass: the option, or (``None``) as many as take the memory of 16 images
    at 224 x 224, so small inputs run in few large passes and large ones stay bounded.

    Example:
        >>> internal_batch_size(None, torch.zeros(8, 3, 224, 224))
        16
        >>> internal_batch_size(None, torch.zeros(8, 3, 32, 32))
        784
    """
    if option is not None:
        return int(option)
    pixels = images.shape[-1] * images.shape[-2]
    return max(1, (16 * 224 * 224) // pixels)


def _forward(model: torch.nn.Module) -> Any:
    return lambda x: as_logits(model(x))


def integrated_gradients(session: ExplainSession) -> Tensor:
    """Signed IG attribution summed over channels ``(N, H, W)``: its pixel sum is the total."""
    opts = session.options
    images, targets = session.images, session.targets
    baselines = make_baseline(images, opts["ig_baseline"])
    n = images.shape[0]
    chunk = max(internal_batch_size(opts["ig_internal_batch_size"], images), n)
    ig = IntegratedGradients(_forward(session.model))
    with torch.no_grad():
        logits = session.logits.detach()
        base_logits = as_logits(session.model(baselines))

    steps_option = opts["ig_steps"]
    if steps_option == "auto":
        start = int(opts["ig_steps_start"] or AUTO_STEPS[0])
        schedule = [s for s in AUTO_STEPS if s >= start] or [AUTO_STEPS[-1]]
    elif isinstance(steps_option, int) and steps_option > 0:
        schedule = [steps_option]
    else:
        raise SaliencyConfigError(
            f"ig_steps must be a positive int or 'auto', got {steps_option!r}"
        )

    for steps in schedule:
        attr = ig.attribute(
            images.detach(),
            baselines=baselines,
            target=targets,
            n_steps=steps,
            method=opts["ig_method"],
            internal_batch_size=chunk,
        ).float()
        error = completeness_error(attr, logits.float(), base_logits.float(), targets)
        if steps_option != "auto" or float(error.max()) <= float(opts["ig_tolerance"]):
            break
    session.extras["ig_steps"] = steps
    session.extras["ig_completeness_error"] = error
    return attr.sum(dim=1)


register(
    SaliencyMethod(
        "integrated_gradients",
        integrated_gradients,
        "Integrated Gradients: signed pixel attributions that sum to F(x) - F(baseline).",
        needs_layer=False,
        options={
            "ig_steps": 32,
            "ig_baseline": None,
            "ig_internal_batch_size": None,
            "ig_method": "gausslegendre",
            "ig_tolerance": 0.01,
            "ig_steps_start": None,  # "auto" starts here (the callback passes its last count)
        },
        aliases=("ig", "integrated-gradients"),
    )
)
