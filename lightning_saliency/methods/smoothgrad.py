"""SmoothGrad of Integrated Gradients through captum's ``NoiseTunnel``, with private noise.

The noise is drawn from a generator seeded by the ``seed`` option (default: ``explain()``'s
``seed``, which the callback sets from its own) inside a forked RNG: the global RNG is untouched
and the maps are the same from epoch to epoch for the same model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from torch import Tensor

from lightning_saliency.methods.base import MethodOptions, SaliencyMethod, register
from lightning_saliency.methods.integrated_gradients import internal_batch_size
from lightning_saliency.methods.session import ExplainSession


@dataclass(frozen=True)
class SmoothGradOptions(MethodOptions):
    """Options of ``smoothgrad``.

    Attributes:
        type: captum's ``nt_type``: ``smoothgrad_sq`` (mean of squares), ``smoothgrad``
            (mean, signed) or ``vargrad`` (variance).
        samples: noisy copies per image.
        noise: noise standard deviation as a share of the input's value range.
        ig_steps: IG steps per noisy copy.
        internal_batch_size: images per pass; ``None``: the memory of 16 images at 224 px.
        seed: the noise seed; ``None``: ``explain()``'s ``seed``.
    """

    type: Literal["smoothgrad_sq", "smoothgrad", "vargrad"] = "smoothgrad_sq"
    samples: int = 12
    noise: float = 0.1
    ig_steps: int = 8
    internal_batch_size: int | None = None
    seed: int | None = None

    def check(self) -> None:
        for name in ("samples", "ig_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


def smoothgrad(session: ExplainSession, options: SmoothGradOptions) -> Tensor:
    """IG averaged over noisy copies of the input, summed over channels ``(N, H, W)``."""
    images = session.images
    spread = float(images.max() - images.min()) or 1.0
    stdev = options.noise * spread
    chunk = max(internal_batch_size(options.internal_batch_size, images), images.shape[0])
    forward, target, extra = session.captum_forward()
    tunnel = NoiseTunnel(IntegratedGradients(forward))
    seed = session.seed if options.seed is None else options.seed
    devices = [images.device] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if images.is_cuda:
            torch.cuda.manual_seed(seed)
        attr: Tensor = tunnel.attribute(
            images,
            nt_type=options.type,
            nt_samples=options.samples,
            nt_samples_batch_size=max(1, chunk // (images.shape[0] * options.ig_steps)),
            stdevs=stdev,
            target=target,
            additional_forward_args=extra or None,
            n_steps=options.ig_steps,
            internal_batch_size=chunk,
        )
    return attr.float().sum(dim=1)


register(
    SaliencyMethod(
        "smoothgrad",
        smoothgrad,
        "SmoothGrad: IG averaged over noisy inputs (smoothgrad_sq / smoothgrad / vargrad).",
        options=SmoothGradOptions,
        sign="signed",
        cost="expensive",
        passes="samples x ig_steps x (1F + 1B)",
        needs_layer=False,
        flat_names={
            "nt_type": "type",
            "nt_samples": "samples",
            "nt_noise": "noise",
            "nt_ig_steps": "ig_steps",
            "ig_internal_batch_size": "internal_batch_size",
            "smoothgrad_seed": "seed",
        },
        aliases=("smoothgrad_sq", "noise_tunnel"),
    )
)
