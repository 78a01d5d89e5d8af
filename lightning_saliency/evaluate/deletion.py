"""Does the map point at what the model uses? Deletion and insertion curves against random maps.

Petsiuk et al. 2018 (RISE): remove the pixels a map ranks highest, a growing share at a time,
and watch the explained class's probability fall (**deletion**: a faithful map makes it fall
fast, a low area under the curve); or start from a blurred image and put the top pixels back
(**insertion**: it rises fast, a high area). Each area is held against the same curves for
random maps (random pixel orders), so a map beats chance or it does not.

Removed pixels take the deletion baseline (zeros: the mean image for normalised inputs);
inserted ones start from a Gaussian blur of the image (sigma = 1/16 of its side), as RISE. The
pixel order is the map's :func:`~.scores.relevance` (the positive part of a
signed map), ties in a fixed order. Random maps come from a private generator, the same for
every image, so an image's numbers do not depend on its batch. Everything runs on the images'
device, forward passes only, in chunks, with the model in eval mode and put back as found.

Why our own: Quantus's ``RegionPerturbation`` and ``ROAD`` run on numpy on the CPU one sample
at a time; here the ``N x (steps + 1)`` perturbed images go through the model in batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.engine.batching import internal_batch_size
from lightning_saliency.engine.explanations import eager_module, explanation_context, model_dtype
from lightning_saliency.engine.methods.session import OutputTransform, as_logits
from lightning_saliency.evaluate.scores import SignedMass, relevance


@dataclass
class FaithfulnessReport:
    """Deletion and insertion areas per method, and those of random maps.

    Attributes:
        deletion: method -> ``(N,)`` area under the deletion curve (lower is better).
        insertion: method -> ``(N,)`` area under the insertion curve (higher is better).
        random_deletion, random_insertion: ``(N,)`` the same for random maps (mean of
            ``random_maps`` draws): chance.
        steps: the curves' points are 0, 1/steps, ... 1 of the pixels.
        curves: method -> ``(2, N, steps + 1)`` deletion and insertion probabilities.
    """

    deletion: dict[str, Tensor]
    insertion: dict[str, Tensor]
    random_deletion: Tensor
    random_insertion: Tensor
    steps: int
    curves: dict[str, Tensor]

    def beats_random(self, method: str) -> bool:
        """Whether the method's mean deletion area is below chance and its insertion area
        above."""
        return bool(
            self.deletion[method].mean() < self.random_deletion.mean()
            and self.insertion[method].mean() > self.random_insertion.mean()
        )

    def table(self) -> str:
        """A Markdown table of the mean areas, random maps last."""
        rows = [
            "| method | deletion AUC (lower is better) | insertion AUC (higher is better) | "
            "beats random |",
            "|---|---|---|---|",
        ]
        for m in self.deletion:
            rows.append(
                f"| `{m}` | {float(self.deletion[m].mean()):.3f} | "
                f"{float(self.insertion[m].mean()):.3f} | "
                f"{'yes' if self.beats_random(m) else '**no**'} |"
            )
        rows.append(
            f"| random maps | {float(self.random_deletion.mean()):.3f} | "
            f"{float(self.random_insertion.mean()):.3f} | |"
        )
        return "\n".join(rows)


def blurred(images: Tensor, sigma: float | None = None) -> Tensor:
    """A Gaussian blur of ``(N, C, H, W)`` images (``sigma``: 1/16 of the shorter side).

    Examples:
        >>> x = torch.zeros(1, 1, 16, 16); x[..., 8, 8] = 1
        >>> b = blurred(x); round(float(b.sum()), 3), float(b.max()) < 1
        (1.0, True)
    """
    sigma = sigma or max(1.0, min(images.shape[-2:]) / 16)
    radius = int(3 * sigma)
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(images.dtype)
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def target_probabilities(
    model: nn.Module,
    rows: Tensor,
    targets: Tensor,
    chunk: int,
    transform: OutputTransform | None = None,
) -> tuple[Tensor, int]:
    """The softmax probability of ``targets[i]`` for each of ``rows``, ``chunk`` rows per
    forward, and the number of classes.

    Examples:
        >>> net = nn.Linear(2, 4)
        >>> probs, classes = target_probabilities(net, torch.zeros(3, 2), torch.zeros(3).long(), 2)
        >>> probs.shape, classes
        (torch.Size([3]), 4)
    """
    probs = class_probabilities(model, rows, chunk, transform)
    return probs.gather(1, targets[:, None].to(probs.device)).squeeze(1), probs.shape[1]


def class_probabilities(
    model: nn.Module, rows: Tensor, chunk: int, transform: OutputTransform | None = None
) -> Tensor:
    """``(R, K)``: the softmax over the classes for each of ``rows``, ``chunk`` rows per
    forward.

    Examples:
        >>> class_probabilities(nn.Linear(2, 4), torch.zeros(3, 2), 2).shape
        torch.Size([3, 4])
    """
    out = []
    for start in range(0, len(rows), chunk):
        logits = as_logits(model(rows[start : start + chunk]), transform).float()
        out.append(logits.softmax(dim=1))
    return torch.cat(out)


def _areas(
    model: nn.Module,
    images: Tensor,
    order: Tensor,
    targets: Tensor,
    steps: int,
    starts: tuple[Tensor, Tensor],
    chunk: int,
    transform: OutputTransform | None,
) -> Tensor:
    """``(2, N, steps + 1)`` deletion and insertion curves for pixel ``order`` ``(N, HW)``."""
    n, c, h, w = images.shape
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=order.device).expand(n, -1))
    shares = torch.linspace(0, 1, steps + 1, device=images.device)
    counts = (shares * h * w).round().long()  # pixels changed at each point
    changed = ranks[:, None, :] < counts[None, :, None]  # (N, steps+1, HW)
    changed = changed.reshape(n, steps + 1, 1, h, w)
    curves = []
    for fill, keep_top in ((starts[0], False), (starts[1], True)):
        if keep_top:  # insertion: the top pixels from the image, the rest from the blur
            rows = torch.where(changed, images[:, None], fill[:, None])
        else:  # deletion: the top pixels from the baseline
            rows = torch.where(changed, fill[:, None], images[:, None])
        flat = rows.reshape(n * (steps + 1), c, h, w)
        probs, _ = target_probabilities(
            model, flat, targets.repeat_interleave(steps + 1), chunk, transform
        )
        curves.append(probs.reshape(n, steps + 1))
    return torch.stack(curves)


def faithfulness(
    model: nn.Module,
    images: Tensor,
    maps: Tensor | Mapping[str, Tensor],
    targets: Tensor | Sequence[int] | int | None = None,
    *,
    steps: int = 16,
    random_maps: int = 4,
    deletion_baseline: float | Tensor = 0.0,
    signed_mass: SignedMass = "positive",
    seed: int = 0,
    batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
) -> FaithfulnessReport:
    """Deletion and insertion areas of ``maps`` for ``model`` on ``images``, and of random maps.

    Args:
        model: the classifier (eval mode inside; put back as found).
        images: ``(N, C, H, W)`` the images the maps explain.
        maps: ``(N, H, W)`` maps, or method -> maps (an :class:`Explanations` works).
        targets: the class each map explains (``None``: the model's prediction).
        steps: points on each curve beyond the first (``1/steps`` of the pixels each).
        random_maps: random pixel orders to average for chance.
        deletion_baseline: what deleted pixels become (a number or a tensor broadcast to the
            images; 0 is the mean image for normalised inputs).
        signed_mass: how signed maps rank pixels (:func:`~.scores.relevance`).
        seed: the random maps' seed (a private generator).
        batch_size: perturbed images per forward (``None``: the memory of 16 images at 224 px).
        output_transform: as :func:`~lightning_saliency.explain`.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> x = torch.rand(2, 3, 16, 16)
        >>> report = faithfulness(net, x, {"random": torch.rand(2, 16, 16)}, steps=4)
        >>> report.deletion["random"].shape, report.curves["random"].shape
        (torch.Size([2]), torch.Size([2, 2, 5]))
    """
    model = eager_module(model)
    named = {"map": maps} if isinstance(maps, Tensor) else dict(maps.items())
    with explanation_context(model), torch.no_grad():
        x = images.detach().to(model_dtype(model))
        n, _, h, w = x.shape
        if targets is None:
            wanted = as_logits(model(x), output_transform).argmax(1)
        else:
            wanted = torch.as_tensor(targets, device=x.device).long().expand(n)
        wanted = wanted.to(x.device)
        fill = torch.as_tensor(deletion_baseline, device=x.device, dtype=x.dtype).expand_as(x)
        starts = (fill, blurred(x))
        chunk = batch_size or internal_batch_size(None, x)
        generator = torch.Generator().manual_seed(int(seed))

        def areas(order: Tensor) -> Tensor:
            return _areas(model, x, order, wanted, steps, starts, chunk, output_transform)

        curves: dict[str, Tensor] = {}
        for method, m in named.items():
            if m.shape != (n, h, w):
                raise ValueError(f"{method}: maps must be {(n, h, w)}, got {tuple(m.shape)}")
            mass = relevance(m.to(x.device), signed_mass).flatten(1)
            order = mass.argsort(dim=1, descending=True, stable=True)
            curves[method] = areas(order)
        chance = []
        for _ in range(random_maps):
            noise = torch.rand(h * w, generator=generator).to(x.device).expand(n, -1)
            chance.append(areas(noise.argsort(dim=1, descending=True)))
        random_curves = torch.stack(chance).mean(0)

    def auc(curve: Tensor) -> Tensor:
        return torch.trapezoid(curve, dx=1.0 / steps, dim=-1)

    return FaithfulnessReport(
        deletion={k: auc(v[0]) for k, v in curves.items()},
        insertion={k: auc(v[1]) for k, v in curves.items()},
        random_deletion=auc(random_curves[0]),
        random_insertion=auc(random_curves[1]),
        steps=steps,
        curves=curves,
    )


__all__ = [
    "FaithfulnessReport",
    "blurred",
    "class_probabilities",
    "faithfulness",
    "target_probabilities",
]
