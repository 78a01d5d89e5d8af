"""SmoothGrad of Integrated Gradients through captum's ``NoiseTunnel``, with private noise.

The noise is drawn from a generator seeded by ``smoothgrad_seed`` inside a forked RNG: the
global RNG is untouched and the maps are the same from epoch to epoch for the same model.
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from torch import Tensor

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.methods.base import ExplainSession, SaliencyMethod, as_logits, register
from lightning_saliency.methods.integrated_gradients import internal_batch_size

NT_TYPES = ("smoothgrad_sq", "smoothgrad", "vargrad")


def smoothgrad(session: ExplainSession) -> Tensor:
    """IG averaged over noisy copies of the input, summed over channels ``(N, H, W)``."""
    opts = session.options
    nt_type = opts["nt_type"]
    if nt_type not in NT_TYPES:
        raise SaliencyConfigError(f"nt_type must be one of {NT_TYPES}, got {nt_type!r}.")
    images = session.images
    spread = float(images.max() - images.min()) or 1.0
    stdev = float(opts["nt_noise"]) * spread
    samples = int(opts["nt_samples"])
    chunk = max(internal_batch_size(opts["ig_internal_batch_size"], images), images.shape[0])
    tunnel = NoiseTunnel(IntegratedGradients(lambda x: as_logits(session.model(x))))
    devices = [images.device] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(int(opts["smoothgrad_seed"]))
        if images.is_cuda:
            torch.cuda.manual_seed(int(opts["smoothgrad_seed"]))
        attr = tunnel.attribute(
            images,
            nt_type=nt_type,
            nt_samples=samples,
            nt_samples_batch_size=max(1, chunk // (images.shape[0] * int(opts["nt_ig_steps"]))),
            stdevs=stdev,
            target=session.targets,
            n_steps=int(opts["nt_ig_steps"]),
            internal_batch_size=chunk,
        )
    return attr.float().sum(dim=1)


register(
    SaliencyMethod(
        "smoothgrad",
        smoothgrad,
        "SmoothGrad: IG averaged over noisy inputs (smoothgrad_sq / smoothgrad / vargrad).",
        needs_layer=False,
        options={
            "nt_type": "smoothgrad_sq",
            "nt_samples": 12,
            "nt_noise": 0.1,
            "nt_ig_steps": 8,
            "smoothgrad_seed": 0,
            "ig_internal_batch_size": None,
        },
        aliases=("smoothgrad_sq", "noise_tunnel"),
    )
)
