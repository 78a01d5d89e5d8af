"""The gradient CAM family on the device: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, EigenCAM.

Why our own: pytorch-grad-cam (the reference in the tests) computes these in numpy on the CPU
after ``model.zero_grad()`` + ``.backward()``; here they reuse the session's one forward and one
backward to the layer, so each costs a few element-wise operations beyond Grad-CAM.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_saliency.methods.base import ExplainSession, SaliencyMethod, register, upsample

_EPS = 1e-6  # as pytorch-grad-cam: with tiny gradients Grad-CAM++ depends on it


def _cam(weights: Tensor, acts: Tensor) -> Tensor:
    return (weights * acts).sum(dim=1).clamp(min=0)


def gradcam_plus_plus(session: ExplainSession) -> Tensor:
    """Grad-CAM++: positive gradients weighted by the second/third-order ``alpha`` terms."""
    acts, grads = session.layer_activations(), session.layer_gradients()
    g2, g3 = grads.pow(2), grads.pow(3)
    alpha = g2 / (2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3 + _EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (grads.clamp(min=0) * alpha).sum(dim=(2, 3), keepdim=True)
    return upsample(_cam(weights, acts), session.size)


def xgradcam(session: ExplainSession) -> Tensor:
    """XGrad-CAM: gradients weighted by the normalised activations (axiom-based)."""
    acts, grads = session.layer_activations(), session.layer_gradients()
    weights = (grads * acts).sum(dim=(2, 3), keepdim=True) / (
        acts.sum(dim=(2, 3), keepdim=True) + _EPS
    )
    return upsample(_cam(weights, acts), session.size)


def layercam(session: ExplainSession) -> Tensor:
    """LayerCAM: element-wise positive gradient x activation (finer than Grad-CAM)."""
    acts, grads = session.layer_activations(), session.layer_gradients()
    return upsample(_cam(grads.clamp(min=0), acts), session.size)


def hirescam(session: ExplainSession) -> Tensor:
    """HiResCAM: element-wise gradient x activation, no spatial averaging (faithful to the
    model's computation for heads that pool)."""
    acts, grads = session.layer_activations(), session.layer_gradients()
    return upsample(_cam(grads, acts), session.size)


def eigencam(session: ExplainSession) -> Tensor:
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


for _name, _fn, _text in [
    (
        "gradcam++",
        gradcam_plus_plus,
        "Grad-CAM++: higher-order gradient weights; better for several instances of a class.",
    ),
    ("xgradcam", xgradcam, "XGrad-CAM: activation-normalised gradient weights."),
    ("layercam", layercam, "LayerCAM: element-wise positive gradient x activation (finer)."),
    ("hirescam", hirescam, "HiResCAM: element-wise gradient x activation, no averaging."),
    ("eigencam", eigencam, "EigenCAM: first principal component of the layer (class-agnostic)."),
]:
    register(SaliencyMethod(_name, _fn, _text, aliases=(_name.replace("++", "pp"),)))
