"""The shared CAM helper, Grad-CAM and Guided Grad-CAM, on the device, batched.

A CAM variant is a *weight function* on :func:`cam_method`, as in pytorch-grad-cam's
``BaseCAM.get_cam_weights``: it returns channel weights ``(N, C)`` (or element-wise weights
``(N, C, h, w)``) and the helper computes ``ReLU(sum_c w_c * A_c)`` and upsamples it.

Why our own: pytorch-grad-cam computes the CAM in numpy on the CPU, calls ``model.zero_grad()``
and ``.backward()`` (overwriting accumulated parameter gradients) and min-max normalises each
map; captum's ``GuidedGradCam`` runs two forwards and hooks ``nn.ReLU`` modules only. Both are
the references in ``tests/test_methods.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_saliency.engine.methods.base import (
    Cost,
    MethodOptions,
    NoOptions,
    SaliencyMethod,
    register,
)
from lightning_saliency.engine.methods.session import ExplainSession, upsample

CamWeights = Callable[[ExplainSession, Any], Tensor]


def cam_from_weights(weights: Tensor, activations: Tensor) -> Tensor:
    """``ReLU(sum_c w_c * A_c)`` at the layer's resolution, ``(N, h, w)``; ``weights`` are
    ``(N, C)``, ``(N, C, 1, 1)`` or element-wise ``(N, C, h, w)``."""
    if weights.dim() == 2:
        weights = weights[..., None, None]
    return (weights * activations).sum(dim=1).clamp(min=0)


def cam_method(
    name: str,
    weights: CamWeights,
    description: str,
    *,
    options: type[MethodOptions] = NoOptions,
    cost: Cost = "cheap",
    passes: str = "1F + 1B",
    flat_names: dict[str, str] | None = None,
    aliases: tuple[str, ...] = (),
) -> SaliencyMethod:
    """Register a CAM variant given by its weight function ``weights(session, options)``.

    Examples:
        >>> from lightning_saliency.engine.methods import METHODS, unregister
        >>> toy = cam_method("toycam", lambda s, o: s.layer_gradients().abs().mean((2, 3)),
        ...                  "Toy CAM: mean absolute gradient weights (an example).")
        >>> METHODS["toycam"].kind, METHODS["toycam"].needs_layer
        ('map', True)
        >>> unregister("toycam")
    """

    def compute(session: ExplainSession, opts: Any) -> Tensor:
        cam = cam_from_weights(weights(session, opts), session.layer_activations())
        return upsample(cam, session.size)

    return register(
        SaliencyMethod(
            name,
            compute,
            description,
            options=options,
            kind="map",
            sign="non_negative",
            cost=cost,
            passes=passes,
            needs_layer=True,
            flat_names=flat_names or {},
            aliases=aliases,
        )
    )


def gradcam_weights(session: ExplainSession, _options: Any = None) -> Tensor:
    """Grad-CAM: the spatial mean of the target's gradient per channel."""
    return session.layer_gradients().mean(dim=(2, 3))


def guided_gradcam(session: ExplainSession, _options: Any) -> Tensor:
    """Guided backprop x Grad-CAM, summed over colour channels as captum's
    ``visualize_image_attr`` does: signed (the guided gradient of the input can be negative)."""
    cam = cam_from_weights(gradcam_weights(session), session.layer_activations())
    cam = upsample(cam, session.size)
    return (session.guided_gradients() * cam[:, None]).sum(dim=1)


cam_method(
    "gradcam",
    gradcam_weights,
    "Grad-CAM: class evidence at the target layer, upsampled (coarse, class-specific).",
    aliases=("grad_cam", "grad-cam"),
)
register(
    SaliencyMethod(
        "guided_gradcam",
        guided_gradcam,
        "Guided Grad-CAM: guided backprop x Grad-CAM (pixel-sharp, class-specific).",
        sign="signed",
        passes="1F + 2B",
        needs_guided_backward=True,
        aliases=("guided_grad_cam", "guided-gradcam"),
    )
)
