"""Grad-CAM and Guided Grad-CAM on the device, batched.

Why our own: pytorch-grad-cam computes the CAM in numpy on the CPU, calls ``model.zero_grad()``
and ``.backward()`` (overwriting accumulated parameter gradients) and min-max normalises each
map; captum's ``GuidedGradCam`` runs two forwards and hooks ``nn.ReLU`` modules only. Both are
the references in ``tests/test_reference_methods.py``.
"""

from __future__ import annotations

from torch import Tensor

from lightning_saliency.methods.base import ExplainSession, SaliencyMethod, register, upsample


def gradcam_at_layer(session: ExplainSession) -> Tensor:
    """``ReLU(sum_c mean(dS/dA_c) * A_c)`` at the layer's resolution, ``(N, h, w)``."""
    acts = session.layer_activations()
    grads = session.layer_gradients()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1).clamp(min=0)


def gradcam(session: ExplainSession) -> Tensor:
    """Grad-CAM upsampled to the input: where the evidence for the target class sits."""
    return upsample(gradcam_at_layer(session), session.size)


def guided_gradcam(session: ExplainSession) -> Tensor:
    """Guided backprop x Grad-CAM, reduced over colour channels by summing magnitudes."""
    cam = upsample(gradcam_at_layer(session), session.size)
    return (session.guided_gradients() * cam[:, None]).abs().sum(dim=1)


register(
    SaliencyMethod(
        "gradcam",
        gradcam,
        "Grad-CAM: class evidence at the target layer, upsampled (coarse, class-specific).",
        aliases=("grad_cam", "grad-cam"),
    )
)
register(
    SaliencyMethod(
        "guided_gradcam",
        guided_gradcam,
        "Guided Grad-CAM: guided backprop x Grad-CAM (pixel-sharp, class-specific).",
        aliases=("guided_grad_cam", "guided-gradcam"),
    )
)
