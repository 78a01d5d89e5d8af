"""The noise methods, named as the literature names them, on the device.

- ``smoothgrad`` (Smilkov et al. 2017): the input gradient averaged over noisy copies of the
  image, signed (captum: ``NoiseTunnel(Saliency(abs=False), nt_type="smoothgrad")``);
- ``smoothgrad_sq``: the mean of the squared gradients (non-negative);
- ``vargrad`` (Adebayo et al. 2018): their variance (non-negative);
- ``ig_smoothgrad_sq``: Integrated Gradients squared and averaged over noisy copies (this
  package's ``smoothgrad`` in 0.1: captum's ``NoiseTunnel(IntegratedGradients)``,
  ``nt_type="smoothgrad_sq"``).

A method's sign never depends on an option. Maps are summed over channels (signed for
``smoothgrad``).

Why our own: captum's ``NoiseTunnel`` draws its noise from the global RNG for the whole
batch, so a sample's map depended on which other images shared its batch (Spearman 0.83
between the same image alone and in a batch of 8). Here one noise stack ``(samples, C, H, W)``
is drawn from a private generator seeded by ``seed`` and added to every image alike: a
sample's map depends on nothing but the sample, the model and the seed, and the global RNG is
untouched. The gradients of the noisy copies go through the same chunked, device-sized engine
as IG (:class:`~lightning_saliency.engine.methods.integrated_gradients.PathGradients`). The tests
check each against captum on the same noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_saliency.engine.methods.base import (
    RETIRED_OPTIONS,
    MethodOptions,
    register_input_method,
)
from lightning_saliency.engine.methods.integrated_gradients import (
    PathGradients,
    chunk_sizer,
    fixed_steps,
)
from lightning_saliency.engine.methods.session import ExplainSession

RENAMED = (
    "'smoothgrad' now means SmoothGrad as Smilkov et al. define it (signed vanilla gradients "
    "averaged over noisy inputs). In 0.1 it meant squared Integrated Gradients over noisy "
    "inputs: that method is now 'ig_smoothgrad_sq'. Choose 'smoothgrad_sq' or 'vargrad' for "
    "the unsigned variants. This note goes away in the next release."
)
_said_renamed: list[bool] = []


@dataclass(frozen=True)
class NoiseOptions(MethodOptions):
    """Options of ``smoothgrad``, ``smoothgrad_sq`` and ``vargrad``.

    Attributes:
        samples: noisy copies per image (Smilkov et al. use 50; 16 keeps the callback cheap).
        noise: noise standard deviation as a share of each image's value range (they advise
            0.1 to 0.2).
        internal_batch_size: noisy copies per pass; ``None``: sized to the device, as IG.
        seed: the noise seed; ``None``: ``explain()``'s ``seed``.
    """

    samples: int = 16
    noise: float = 0.15
    internal_batch_size: int | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.internal_batch_size is not None and self.internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be >= 1, got {self.internal_batch_size}")


@dataclass(frozen=True)
class IGNoiseOptions(NoiseOptions):
    """Options of ``ig_smoothgrad_sq``.

    Attributes:
        samples: noisy copies per image.
        noise: noise standard deviation as a share of each image's value range.
        internal_batch_size: (copy, step) rows per pass; ``None``: sized to the device.
        seed: the noise seed; ``None``: ``explain()``'s ``seed``.
        ig_steps: IG steps per noisy copy.
    """

    samples: int = 12
    noise: float = 0.1
    ig_steps: int = 8

    def check(self) -> None:
        super().check()
        if self.ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1, got {self.ig_steps}")


def shared_noise(shape: tuple[int, ...], samples: int, seed: int) -> Tensor:
    """``(samples, *shape)`` standard Gaussian noise from a private generator seeded by
    ``seed``: the same for every image and every call, on the CPU (move it where it is used).

    Examples:
        >>> a = shared_noise((1, 4, 4), 2, seed=0)
        >>> a.shape, torch.equal(a, shared_noise((1, 4, 4), 2, seed=0))
        (torch.Size([2, 1, 4, 4]), True)
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn((samples, *shape), generator=generator)


def noise_scale(images: Tensor, noise: float) -> Tensor:
    """Per image, the noise's standard deviation: ``noise`` x that image's value range
    (Smilkov et al.'s sigma / (x_max - x_min)), ``(N,)``; never the batch's range, so an image's
    noise does not depend on its neighbours."""
    flat = images.detach().flatten(1).float()
    spread = flat.amax(1) - flat.amin(1)
    return noise * torch.where(spread > 0, spread, torch.ones_like(spread))


def noisy_copies(images: Tensor, noise: Tensor, share: float) -> tuple[Tensor, Tensor]:
    """``images`` plus each of the ``(samples, C, H, W)`` standard ``noise`` draws, scaled by
    :func:`noise_scale` (``share`` of each image's range): ``(samples x N, C, H, W)`` copies,
    copy-major (row ``s * N + i`` is draw ``s`` of image ``i``), and the image each is of."""
    scale = noise_scale(images, share).reshape(1, -1, *([1] * (images.dim() - 1)))
    noise = noise.to(images.device)
    copies = (images[None] + (noise[:, None] * scale).to(images.dtype)).reshape(
        -1, *images.shape[1:]
    )
    origin = torch.arange(images.shape[0], device=images.device).repeat(noise.shape[0])
    return copies, origin


def _noisy_copies(session: ExplainSession, options: NoiseOptions) -> tuple[Tensor, Tensor]:
    """The noisy copies of the session's images, from the shared noise of ``options.seed``."""
    seed = session.seed if options.seed is None else options.seed
    noise = shared_noise(tuple(session.images.shape[1:]), options.samples, seed)
    return noisy_copies(session.images, noise, options.noise)


def noisy_gradient_moments(session: ExplainSession, options: NoiseOptions) -> tuple[Tensor, Tensor]:
    """Mean and mean square over the noisy copies of the input gradient, ``(N, C, H, W)``."""
    images = session.images
    copies, origin = _noisy_copies(session, options)
    path = PathGradients(session, copies, copies, chunk_sizer(options, images), origin=origin)
    total = torch.zeros(images.shape, device=images.device, dtype=torch.float32)
    squares = torch.zeros_like(total)

    def accumulate(rows: slice, grads: Tensor) -> Tensor:
        grads = grads.float()
        total.index_add_(0, origin[rows], grads)
        squares.index_add_(0, origin[rows], grads * grads)
        return grads.new_zeros(0)

    index = torch.arange(len(copies), device=images.device)
    path.evaluate_points(index, lambda rows: copies[rows], accumulate)
    return total / options.samples, squares / options.samples


def smoothgrad(session: ExplainSession, options: NoiseOptions) -> Tensor:
    """SmoothGrad: the mean input gradient over noisy copies, signed, channel sum."""
    _say_renamed()
    mean, _ = noisy_gradient_moments(session, options)
    return mean.sum(dim=1)


def smoothgrad_sq(session: ExplainSession, options: NoiseOptions) -> Tensor:
    """SmoothGrad-Squared: the mean squared input gradient over noisy copies, channel sum."""
    _, mean_square = noisy_gradient_moments(session, options)
    return mean_square.sum(dim=1)


def vargrad(session: ExplainSession, options: NoiseOptions) -> Tensor:
    """VarGrad: the variance of the input gradient over noisy copies, channel sum."""
    mean, mean_square = noisy_gradient_moments(session, options)
    return (mean_square - mean * mean).clamp(min=0).sum(dim=1)


def ig_smoothgrad_sq(session: ExplainSession, options: IGNoiseOptions) -> Tensor:
    """Integrated Gradients of each noisy copy (zero baseline, Gauss-Legendre), squared and
    averaged over the copies, channel sum."""
    images = session.images
    copies, origin = _noisy_copies(session, options)
    path = PathGradients(
        session, copies, torch.zeros_like(copies), chunk_sizer(options, images), origin=origin
    )
    attr = fixed_steps(path, options.ig_steps, "gausslegendre")
    squares = torch.zeros(images.shape, device=images.device, dtype=torch.float32)
    squares.index_add_(0, origin, attr.float().pow(2))
    return (squares / options.samples).sum(dim=1)


def _say_renamed() -> None:
    """Once per process, the first time ``smoothgrad`` runs in this release."""
    if not _said_renamed:
        _said_renamed.append(True)
        warnings.warn(RENAMED, FutureWarning, stacklevel=4)


RETIRED_OPTIONS["nt_type"] = (
    "nt_type is gone: the variant is now the method's name. Choose methods=('smoothgrad',) "
    "(mean gradient, signed), ('smoothgrad_sq',), ('vargrad',), or ('ig_smoothgrad_sq',) (what "
    "'smoothgrad' computed in 0.1)."
)
NOISE_FLAT_NAMES = {
    "nt_samples": "samples",
    "nt_noise": "noise",
    "smoothgrad_seed": "seed",
}


def _noise_method(
    name: str,
    compute: Callable[[ExplainSession, NoiseOptions], Tensor],
    description: str,
    signed: bool,
) -> None:
    register_input_method(
        name,
        compute,
        description,
        signed=signed,
        options=NoiseOptions,
        cost="moderate",
        passes="samples x (1F + 1B)",
        flat_names=NOISE_FLAT_NAMES,
    )


_noise_method(
    "smoothgrad",
    smoothgrad,
    "SmoothGrad (Smilkov et al.): input gradients averaged over noisy inputs, signed.",
    signed=True,
)
_noise_method(
    "smoothgrad_sq",
    smoothgrad_sq,
    "SmoothGrad-Squared: the mean of the squared input gradients over noisy inputs.",
    signed=False,
)
_noise_method(
    "vargrad",
    vargrad,
    "VarGrad (Adebayo et al.): the variance of the input gradients over noisy inputs.",
    signed=False,
)
register_input_method(
    "ig_smoothgrad_sq",
    ig_smoothgrad_sq,
    "Integrated Gradients squared and averaged over noisy inputs (captum's NoiseTunnel "
    "of IG, smoothgrad_sq; 'smoothgrad' in 0.1).",
    signed=False,
    options=IGNoiseOptions,
    cost="expensive",
    passes="samples x ig_steps x (1F + 1B)",
    flat_names={**NOISE_FLAT_NAMES, "nt_ig_steps": "ig_steps"},
    aliases=("noise_tunnel",),
)
