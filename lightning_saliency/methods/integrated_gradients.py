"""Integrated Gradients through captum, chunked so memory stays bounded, with a completeness check.

captum's ``IntegratedGradients`` uses ``torch.autograd.grad`` (no ``.backward()``), so it meets the
contract once it gets non-inference clones and ``internal_batch_size`` (unchunked it runs
N x steps images at once). ``ig_steps="auto"`` doubles the steps until the completeness error
``|sum(attr) - (F(x) - F(baseline))| / |F(x) - F(baseline)|`` is at most ``tolerance``; inside
the callback it starts from half the count the previous epoch needed (its warm start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from captum.attr import IntegratedGradients
from torch import Tensor

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.methods.base import MethodOptions, MethodScore, SaliencyMethod, register
from lightning_saliency.methods.session import ExplainSession

AUTO_STEPS = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class IntegratedGradientsOptions(MethodOptions):
    """Options of ``integrated_gradients``.

    Attributes:
        steps: integration steps, or ``"auto"``: the fewest of 8, 16, ... 256 whose
            completeness error is at most ``tolerance``.
        baseline: ``None`` (zeros: the mean image for normalised inputs), a number, or a tensor.
        internal_batch_size: images per pass (bounds memory); ``None``: the memory of 16
            images at 224 px.
        method: captum's quadrature (``gausslegendre``, ``riemann_trapezoid``, ...).
        tolerance: the completeness error ``"auto"`` aims for.
    """

    steps: int | Literal["auto"] = 32
    baseline: float | Tensor | None = None
    internal_batch_size: int | None = None
    method: str = "gausslegendre"
    tolerance: float = 0.01

    def check(self) -> None:
        if self.steps != "auto" and int(self.steps) < 1:
            raise ValueError(f"steps must be a positive int or 'auto', got {self.steps!r}")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be >= 1, got {self.internal_batch_size}")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")


def make_baseline(images: Tensor, baseline: float | Tensor | None) -> Tensor:
    """``None`` → zeros (the mean image for normalised inputs); a number → constant; a tensor
    broadcast to the images."""
    if baseline is None:
        return torch.zeros_like(images)
    if isinstance(baseline, (int, float)):
        return torch.full_like(images, float(baseline))
    if isinstance(baseline, Tensor):
        return baseline.to(images.device, images.dtype).expand_as(images).clone()
    raise SaliencyConfigError(f"baseline must be None, a number or a tensor, got {baseline!r}.")


def completeness_error(attributions: Tensor, scores: Tensor, baseline_scores: Tensor) -> Tensor:
    """Per-image relative completeness error of IG attributions ``(N, C, H, W)`` for the
    explained scores ``(N,)`` at the images and at the baselines."""
    gap = scores - baseline_scores
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


def integrated_gradients(session: ExplainSession, options: IntegratedGradientsOptions) -> Tensor:
    """Signed IG attribution summed over channels ``(N, H, W)``: its pixel sum is the total."""
    images = session.images
    baselines = make_baseline(images, options.baseline)
    n = images.shape[0]
    chunk = max(internal_batch_size(options.internal_batch_size, images), n)
    forward, target, extra = session.captum_forward()
    ig = IntegratedGradients(forward)
    with torch.no_grad():
        scores = session.target_scores(images).float()
        base_scores = session.target_scores(baselines).float()

    memory = session.warm_start("integrated_gradients")
    if options.steps == "auto":
        start = max(AUTO_STEPS[0], int(memory.get("steps", AUTO_STEPS[0])) // 2)
        schedule = [s for s in AUTO_STEPS if s >= start] or [AUTO_STEPS[-1]]
    else:
        schedule = [int(options.steps)]

    for steps in schedule:
        attr: Tensor = ig.attribute(
            images.detach(),
            baselines=baselines,
            target=target,
            additional_forward_args=extra or None,
            n_steps=steps,
            method=options.method,
            internal_batch_size=chunk,
        ).float()
        error = completeness_error(attr, scores, base_scores)
        if options.steps != "auto" or float(error.max()) <= options.tolerance:
            break
    memory["steps"] = steps
    session.extras["ig_steps"] = steps
    session.extras["ig_completeness_error"] = error
    return attr.sum(dim=1)


register(
    SaliencyMethod(
        "integrated_gradients",
        integrated_gradients,
        "Integrated Gradients: signed pixel attributions that sum to F(x) - F(baseline).",
        options=IntegratedGradientsOptions,
        sign="signed",
        cost="expensive",
        passes="steps x (1F + 1B)",
        needs_layer=False,
        flat_names={
            "ig_steps": "steps",
            "ig_baseline": "baseline",
            "ig_internal_batch_size": "internal_batch_size",
            "ig_method": "method",
            "ig_tolerance": "tolerance",
        },
        scores=(
            MethodScore(
                "ig_completeness_error",
                "ig_completeness_error",
                threshold=0.05,
                meaning="Integrated Gradients does not add up to the score change: raise "
                "ig_steps (or use ig_steps='auto')",
            ),
            MethodScore("ig_steps", "steps"),
        ),
        extras={
            "ig_steps": "the step count used",
            "ig_completeness_error": "(N,) |sum(IG) - (F(x) - F(baseline))| / |F(x) - F(b)|",
        },
        aliases=("ig", "integrated-gradients"),
    )
)
