"""The gradient CAM family on the device: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, EigenCAM.

Why our own: pytorch-grad-cam (the reference in the tests) computes these in numpy on the CPU
after ``model.zero_grad()`` + ``.backward()``; here they reuse the session's one forward and one
backward to the layer, so each costs a few element-wise operations beyond Grad-CAM. Each is a
weight function on :func:`~lightning_saliency.engine.methods.cam.cam_method`, except EigenCAM, which
projects on a principal component rather than weighting channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_saliency.engine.methods.base import SaliencyMethod, register
from lightning_saliency.engine.methods.cam import cam_method
from lightning_saliency.engine.methods.session import ExplainSession, upsample

_EPS = 1e-6  # as pytorch-grad-cam: with tiny gradients Grad-CAM++ depends on it


def gradcam_plus_plus_weights(session: ExplainSession, _options: Any) -> Tensor:
    """Grad-CAM++: positive gradients weighted by the second/third-order ``alpha`` terms."""
    acts, grads = session.layer_activations(), session.layer_gradients()
    g2, g3 = grads.pow(2), grads.pow(3)
    alpha = g2 / (2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3 + _EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    return (grads.clamp(min=0) * alpha).sum(dim=(2, 3))


def xgradcam_weights(session: ExplainSession, _options: Any) -> Tensor:
    """XGrad-CAM: gradients weighted by the normalised activations (axiom-based)."""
    acts, grads = session.layer_activations(), session.layer_gradients()
    return (grads * acts).sum(dim=(2, 3)) / (acts.sum(dim=(2, 3)) + _EPS)


def layercam_weights(session: ExplainSession, _options: Any) -> Tensor:
    """LayerCAM: element-wise positive gradients (finer than Grad-CAM)."""
    return session.layer_gradients().clamp(min=0)


def hirescam_weights(session: ExplainSession, _options: Any) -> Tensor:
    """HiResCAM: element-wise gradients, no spatial averaging (faithful to the model's
    computation for heads that pool)."""
    return session.layer_gradients()


def eigencam(session: ExplainSession, _options: Any) -> Tensor:
    """EigenCAM: the first principal component of the layer's activations (class-agnostic,
    gradient-free). The sign is chosen so that the map correlates with the mean activation."""
    acts = session.layer_activations()
    n, c, h, w = acts.shape
    flat = acts.reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    centred = flat - flat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = (centred @ vh[:, 0, :, None]).squeeze(-1)  # (N, hw)
    sign = torch.sign((projection * flat.mean(dim=2)).sum(dim=1, keepdim=True))
    projection = projection * torch.where(sign == 0, torch.ones_like(sign), sign)
    return upsample(projection.clamp(min=0).reshape(n, h, w), session.size)


cam_method(
    "gradcam++",
    gradcam_plus_plus_weights,
    "Grad-CAM++: higher-order gradient weights; better for several instances of a class.",
    aliases=("gradcampp",),
)
cam_method(
    "xgradcam",
    xgradcam_weights,
    "XGrad-CAM: activation-normalised gradient weights.",
)
cam_method(
    "layercam",
    layercam_weights,
    "LayerCAM: element-wise positive gradient x activation (finer).",
)
cam_method(
    "hirescam",
    hirescam_weights,
    "HiResCAM: element-wise gradient x activation, no averaging.",
)
register(
    SaliencyMethod(
        "eigencam",
        eigencam,
        "EigenCAM: first principal component of the layer (class-agnostic).",
        passes="1F",
        class_specific=False,
    )
)
