"""Mask-free shortcut scores: the map proposes a cue, the model (or the images) confirm it.

Most users have no object masks. ``corner_enrichment`` and ``consensus``
(:mod:`lightning_saliency.evaluate.scores`) see a cue only where it sits at one fixed place. These
read cues that move, or that are everywhere (the thresholds, :mod:`.alarms`, are set by
``benchmarks/detection.py``):

========================  =====  ============================================  ========
score                     range  meaning                                       alarming
========================  =====  ============================================  ========
``small_cue_reliance``    -1..1  the class's probability lost when the         > 0.28
                                 hottest 2 % of the pixels are blurred away,
                                 beyond the loss when the next-hottest 2 %
                                 (the same area around them) go, in units of
                                 the range above chance
``attended_consensus``    -1..1  how alike the hottest regions' contents are   opt-in
                                 across images of one class (correlation),
                                 above the chance level of crops at random
                                 places
``stamped_cue_reliance``  0..1   small-cue reliance where the hottest          > 0.12
                                 region's content repeats across the class:
                                 their product, per sample
``background_reliance``   0..1   the decision kept (:func:`kept_decision`)     opt-in
                                 when the hottest 30 % of the image (the
                                 attended region) is blurred away
``colour_reliance``       0..1   the decision kept when the whole image is     > 0.72
                                 blurred away (sigma a quarter of the side):
                                 colours and coarse layout stay; shapes,
                                 marks and textures go
``texture_reliance``      0..1   the decision kept when the image's tiles (a   > 0.84
                                 tenth of the side) are shuffled, beyond what
                                 the blur keeps: textures and colours stay,
                                 shapes larger than a tile go
========================  =====  ============================================  ========

- **Small-cue reliance** is a counterfactual: the map proposes, the model confirms. A model
  that reads an object spreads its evidence over the object, so blurring the hottest 2 % costs
  about what blurring the next 2 % around them costs. A model that reads a mark loses its
  decision with the mark, and nothing with the ring around it. The control is that ring, not a
  region at a random place: a random place let clean models score up to 0.36 against 0.15 for
  a learnt mark, as the hottest 2 % of an object is also its most telling part.
- **Stamped-cue reliance** separates a stamped cue from a *small object*: to the model both
  are a small region that carries the class, and an object of 2-4 % of the image is removed
  by the hottest 2 % as a mark is. What differs is the content: a watermark, a tag or a patch
  is the same crop in every image of the class, objects vary in colour, size and pose, so
  small-cue reliance counts here as far as the attended content repeats
  (``attended_consensus``, clamped to 0..1).
- **Attended-content consensus** crops each image around its map's hottest point and
  correlates the crop with those of the other images of its class (zero-mean colour patterns,
  best over shifts of a third of the crop). Crops at random places give the chance level. It
  reads where the maps point, not what the model uses, so alone it alarms only when given a
  threshold: clean controls whose maps rest on a stamped but uninformative mark score as high
  as learnt marks.
- **Background reliance** blurs away the hottest 30 % of the image and asks how much of the
  decision survives. An object-reading model loses it with the object; one that reads a
  tinted or textured background keeps it. On objects that fill the frame (faces) a clean
  model keeps it too, which is why it alarms only on request.
- **Colour and texture reliance** read the model without the map: a decision that survives a
  blur of everything reads colours (a tint, a colour cast); one that survives a scramble of
  small tiles but not the blur reads a texture. A shape larger than a tile survives neither.

"The decision kept" (:func:`kept_decision`) is measured against the other classes' perturbed
images, not against chance: a model that answers one class for every blurred image keeps no
decision, however sure it is (face against non-face: every blurred image looks like one of
them, and half of them stay "right").

The model must have a decision to probe: when it is right on fewer than half of the compared
images (``peers``), or right only on images of one class (a model that answers one class for
everything is right on half of a balanced binary set), every score is NaN (not judged; a model
right by chance loses and keeps evidence at random; :func:`has_decision`). Removed pixels
take a Gaussian blur of the image (sigma 1/8 of the side for the small cue, 1/4 for the
background and the colour): colours and context stay, shapes and marks go.
Maps are smoothed (box filter, 1/10 of the side) before regions are picked, so a speckled
gradient map proposes blobs, not scattered pixels. Random crops and the tile order come from a
private generator, the same for every image index. Forwards only, on the images' device, under
the same safety context as :func:`~lightning_saliency.explain`: three extra images per sample
and method and two per sample, in one chunked pass.

Why our own: no library scores these. Quantus's ``RegionPerturbation``/``ROAD`` are deletion
curves on numpy (see :mod:`lightning_saliency.faithfulness`), not cue detectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.engine.batching import internal_batch_size
from lightning_saliency.engine.explanations import eager_module, explanation_context, model_dtype
from lightning_saliency.engine.methods.session import OutputTransform
from lightning_saliency.evaluate.deletion import blurred, class_probabilities
from lightning_saliency.evaluate.scores import (
    SHORTCUT_SCORES,
    SignedMass,
    hottest_points,
    relevance,
)
from lightning_saliency.evaluate.strategies import sub_class_stamped_cue

_EPS = 1e-12
CHANCE_PLACES = 8  # random crops per image for attended consensus's chance level


@dataclass(frozen=True)
class ProbeSettings:
    """How the probes cut regions; the defaults are those the thresholds were set with.

    Attributes:
        cue_fraction: share of the pixels removed for small-cue reliance (the hottest ones,
            against the next-hottest as many).
        background_fraction: share of the pixels the background probe removes.
        crop_fraction: side of the attended-content crop, as a share of the image side.
        smooth_fraction: the box filter's side, as a share of the image side.
        cue_blur, background_blur: the blurs' sigma, as a share of the image side.
        tile_fraction: the side of the tiles texture reliance shuffles, as a share of the
            image side.
        min_peers: the share of correctly classified images below which nothing is judged.
        seed: the random crops' seed.
    """

    cue_fraction: float = 0.02
    background_fraction: float = 0.3
    crop_fraction: float = 1 / 6
    smooth_fraction: float = 1 / 10
    cue_blur: float = 1 / 8
    background_blur: float = 1 / 4
    tile_fraction: float = 1 / 10
    min_peers: float = 0.5
    seed: int = 0


def has_decision(groups: Tensor, peers: Tensor | None, min_peers: float = 0.5) -> bool:
    """Whether the model has a decision to probe: right on at least ``min_peers`` of the
    images, and, where they hold several classes (``groups``), right on more than one.

    Examples:
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> has_decision(labels, labels == 0)  # one answer for all: half right, one class
        False
        >>> has_decision(labels, torch.tensor([True, False, True, True]))
        True
    """
    if peers is None:
        return True
    right = peers.to(groups.device).bool()
    if float(right.float().mean()) < min_peers:
        return False
    return len(set(groups.tolist())) < 2 or len(set(groups[right].tolist())) >= 2


def kept_decision(probs: Tensor, targets: Tensor) -> Tensor:
    """``(N,)``: how much of its decision each perturbed image keeps, from the class
    probabilities ``probs`` ``(N, K)`` of the perturbed images: its target's probability above
    the level the perturbed images *of the other targets* give that class, in units of the
    range above that level (0: no more than the others, 1: certain). A model that answers one
    class for every perturbed image keeps nothing, however sure it is; without images of
    another target, the level is chance (``1/K``).

    Examples:
        >>> same = torch.tensor([[0.9, 0.1], [0.9, 0.1]])    # one answer for both images
        >>> kept_decision(same, torch.tensor([0, 1])).tolist()
        [0.0, 0.0]
        >>> kept_decision(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), torch.tensor([0, 1]))
        tensor([0.8889, 0.8889])
    """
    targets = targets.to(probs.device).long()
    own = probs.gather(1, targets[:, None]).squeeze(1)
    others = (targets[:, None] != targets[None, :]).float()  # (i, j): j is of another target
    given = probs[:, targets].T  # (i, j): image j's probability of image i's target
    count = others.sum(1)
    level = torch.where(
        count > 0,
        (given * others).sum(1) / count.clamp(min=1),
        torch.full_like(own, 1.0 / probs.shape[1]),
    )
    return ((own - level) / (1 - level).clamp(min=_EPS)).clamp(0, 1)


def smoothed_mass(maps: Tensor, fraction: float, signed_mass: SignedMass = "positive") -> Tensor:
    """:func:`~.scores.relevance` under a box filter of ``fraction`` of the
    side (odd, at least 3 pixels): the blobs regions are cut from.

    Examples:
        >>> m = torch.zeros(1, 10, 10); m[0, 5, 5] = 9.0
        >>> smoothed_mass(m, 0.3)[0, 4:7, 4:7].tolist() == [[1.0] * 3] * 3
        True
    """
    side = max(3, int(min(maps.shape[-2:]) * fraction) | 1)
    mass = relevance(maps, signed_mass)[:, None]
    return F.avg_pool2d(mass, side, 1, side // 2, count_include_pad=False)[:, 0]


def pixel_ranks(mass: Tensor) -> Tensor:
    """``(N, H, W)``: each pixel's place in its map's descending order (0 = the hottest; ties
    in raster order).

    Examples:
        >>> pixel_ranks(torch.tensor([[[1.0, 3.0], [2.0, 3.0]]])).tolist()
        [[[3, 0], [2, 1]]]
    """
    n, h, w = mass.shape
    order = mass.flatten(1).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(h * w, device=mass.device).expand(n, -1))
    return ranks.reshape(n, h, w)


def top_region(mass: Tensor, counts: Tensor) -> Tensor:
    """Boolean ``(N, H, W)``: each map's ``counts[i]`` hottest pixels (ties in raster order).

    Examples:
        >>> m = torch.arange(6.0).reshape(1, 2, 3)
        >>> top_region(m, torch.tensor([2])).int().tolist()
        [[[0, 0, 0], [0, 1, 1]]]
    """
    return pixel_ranks(mass) < counts.to(mass.device)[:, None, None]


def shuffled_tiles(images: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """``images`` cut into square tiles of ``fraction`` of the side, put back in an order
    drawn from a private generator (the same for every image; pixels past the last whole tile
    stay): shapes larger than a tile go, colours and textures stay.

    Examples:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> y = shuffled_tiles(x, 0.5)
        >>> sorted(y.flatten().tolist()) == x.flatten().tolist(), y.equal(x)
        (True, False)
    """
    n, c, h, w = images.shape
    side = max(1, int(min(h, w) * fraction))
    rows, cols = h // side, w // side
    if rows * cols < 2:
        return images.clone()
    body = images[:, :, : rows * side, : cols * side]
    tiles = body.reshape(n, c, rows, side, cols, side).permute(0, 1, 2, 4, 3, 5)
    tiles = tiles.reshape(n, c, rows * cols, side, side)
    generator = torch.Generator().manual_seed(seed + 2)
    order = torch.randperm(rows * cols, generator=generator)
    if bool((order == torch.arange(rows * cols)).all()):  # never the identity
        order = order.roll(1)
    tiles = tiles[:, :, order.to(images.device)].reshape(n, c, rows, cols, side, side)
    out = images.clone()
    out[:, :, : rows * side, : cols * side] = tiles.permute(0, 1, 2, 4, 3, 5).reshape(
        n, c, rows * side, cols * side
    )
    return out


def _normalised_windows(images: Tensor, centres: Tensor, side: int, shift: int) -> Tensor:
    """``(N, (2*shift+1)**2, C*side*side)`` zero-mean unit-norm crops of ``side`` pixels
    around ``centres`` ``(N, 2)`` (row, col), at every offset up to ``shift``."""
    n, c, h, w = images.shape
    big = side + 2 * shift
    pad = big
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    top = (centres[:, 0] - big // 2 + pad).clamp(0, h + 2 * pad - big)
    left = (centres[:, 1] - big // 2 + pad).clamp(0, w + 2 * pad - big)
    rows = top[:, None] + torch.arange(big, device=images.device)[None]
    cols = left[:, None] + torch.arange(big, device=images.device)[None]
    index = torch.arange(n, device=images.device)
    crops = padded[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # N,big,big,C
    crops = crops.permute(0, 3, 1, 2)
    windows = F.unfold(crops, side)  # (N, C*side*side, offsets)
    windows = windows.reshape(n, c, side * side, -1)
    windows = windows - windows.mean(2, keepdim=True)  # each channel's pattern, not its colour
    windows = windows.reshape(n, c * side * side, -1).transpose(1, 2)
    normalised: Tensor = windows / windows.norm(dim=2, keepdim=True).clamp(min=_EPS)
    return normalised


def _crop_similarity(images: Tensor, centres: Tensor, side: int, shift: int) -> Tensor:
    """``(N, N)``: the best correlation of image i's crop with image j's crop over shifts."""
    windows = _normalised_windows(images, centres, side, shift)  # (N, S, D)
    middle = windows[:, windows.shape[1] // 2]  # the unshifted crop (N, D)
    similarity = torch.einsum("id,jsd->ijs", middle, windows).amax(dim=2)
    return (similarity + similarity.T) / 2


def attended_consensus(
    images: Tensor,
    maps: Tensor,
    groups: Tensor,
    peers: Tensor | None = None,
    settings: ProbeSettings | None = None,
    signed_mass: SignedMass = "positive",
) -> Tensor:
    """Per sample ``(N,)``: the mean similarity of its attended crop with those of the other
    ``peers`` of its group, minus the same for crops at random places (NaN without a peer).

    Examples:
        >>> images = torch.rand(4, 3, 32, 32)
        >>> images[:, :, 10:15, 10:15] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
        >>> images[:, :, 11:14, 11:14] = 0.0                        # the same mark everywhere
        >>> maps = torch.zeros(4, 32, 32); maps[:, 10:15, 10:15] = 1
        >>> bool((attended_consensus(images, maps, torch.zeros(4)) > 0.5).all())
        True
    """
    settings = settings or ProbeSettings()
    x = images.float()
    mass = smoothed_mass(maps.to(x.device), settings.smooth_fraction, signed_mass)
    attended = _attended_similarity(x, mass, settings)
    return _consensus_of(attended, groups, peers, _chance_similarity(x, settings))


def _crop_geometry(images: Tensor, settings: ProbeSettings) -> tuple[int, int]:
    """The crop's side and the largest shift tried, in pixels."""
    side = max(3, round(min(images.shape[-2:]) * settings.crop_fraction))
    return side, max(1, side // 3)


def _chance_similarity(images: Tensor, settings: ProbeSettings) -> Tensor:
    """Attended consensus's chance level: the mean similarity of crops at random places (the
    same places for every index) over all pairs of different images."""
    n, _, h, w = images.shape
    side, shift = _crop_geometry(images, settings)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    limits = torch.tensor([h - 1, w - 1], dtype=torch.float32)
    levels = []
    for _ in range(CHANCE_PLACES):
        places = (torch.rand(n, 2, generator=generator) * limits).round().long()
        levels.append(_crop_similarity(images, places.to(images.device), side, shift))
    others = ~torch.eye(n, dtype=torch.bool, device=images.device)
    return torch.stack(levels)[:, others].mean() if n > 1 else images.new_zeros(())


def _attended_similarity(images: Tensor, mass: Tensor, settings: ProbeSettings) -> Tensor:
    """``(N, N)``: how alike the crops around each map's hottest point are."""
    side, shift = _crop_geometry(images, settings)
    return _crop_similarity(images, hottest_points(mass, tie=_EPS), side, shift)


def _consensus_of(attended: Tensor, groups: Tensor, peers: Tensor | None, chance: Tensor) -> Tensor:
    """Attended consensus from the crops' similarity ``attended`` ``(N, N)``."""
    n = attended.shape[0]
    device = attended.device
    groups = groups.to(device)
    same = groups[:, None] == groups[None, :]
    if peers is not None:
        same &= peers.to(device)[None, :].bool()
    same &= ~torch.eye(n, dtype=torch.bool, device=device)
    count = same.sum(1)
    excess = (attended * same).sum(1) / count.clamp(min=1) - chance
    return torch.where(count > 0, excess, torch.full_like(excess, math.nan))


def shortcut_scores(
    model: nn.Module,
    images: Tensor,
    maps: Mapping[str, Tensor],
    targets: Tensor,
    groups: Tensor | None = None,
    peers: Tensor | None = None,
    *,
    settings: ProbeSettings | None = None,
    signed_mass: SignedMass = "positive",
    batch_size: int | None = None,
    output_transform: OutputTransform | None = None,
) -> dict[str, dict[str, Tensor]]:
    """The mask-free shortcut scores of each method's maps, ``{method: {score: (N,)}}``.

    Args:
        model: the classifier the maps explain (eval mode and frozen inside, put back as
            found; the global RNG is untouched).
        images: ``(N, C, H, W)`` model inputs.
        maps: method -> ``(N, H, W)`` maps (an :class:`~lightning_saliency.Explanations`).
        targets: ``(N,)`` the class each map explains.
        groups: ``(N,)`` what makes images comparable for attended consensus (labels; the
            targets when ``None``).
        peers: ``(N,)`` bool, the images attended consensus compares with (the correctly
            classified ones; all when ``None``).
        settings: region sizes and the seed (:class:`ProbeSettings`).
        signed_mass: how a signed map's mass counts (:func:`~.scores.relevance`).
        batch_size: perturbed images per forward (``None``: the memory of 16 images at 224 px).
        output_transform: as :func:`~lightning_saliency.explain`.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> out = shortcut_scores(net, torch.rand(2, 3, 16, 16), {"m": torch.rand(2, 16, 16)},
        ...                       torch.tensor([0, 1]))
        >>> sorted(out["m"])[:3], out["m"]["small_cue_reliance"].shape
        (['attended_consensus', 'background_reliance', 'colour_reliance'], torch.Size([2]))
    """
    settings = settings or ProbeSettings()
    model = eager_module(model)
    named = {k: v for k, v in maps.items() if v.dim() == 3}
    if not named:
        return {}
    with explanation_context(model), torch.no_grad():
        x = images.detach().to(model_dtype(model))
        n, _, h, w = x.shape
        wanted = targets.to(x.device).long().reshape(n)
        side = min(h, w)
        fills = torch.stack(
            [blurred(x, max(1.0, side * b)) for b in (settings.cue_blur, settings.background_blur)]
        )  # (2, N, C, H, W): what removed pixels become, per probe
        which_fill = torch.tensor([0, 0, 1], device=x.device)  # hot, ring: cue; region: background
        cue = max(1, round(settings.cue_fraction * h * w))
        region_count = max(1, round(settings.background_fraction * h * w))
        regions, masses = [], []
        for method, m in named.items():
            if m.shape != (n, h, w):
                raise ValueError(f"{method}: maps must be {(n, h, w)}, got {tuple(m.shape)}")
            mass = smoothed_mass(m.to(x.device), settings.smooth_fraction, signed_mass)
            ranks = pixel_ranks(mass)  # one sort cuts all three regions
            hot, ring = ranks < cue, (ranks >= cue) & (ranks < 2 * cue)
            regions.append(torch.stack([hot, ring, ranks < region_count], dim=1))  # (N,3,H,W)
            masses.append(mass)
        removed = torch.stack(regions)  # (M, N, 3, H, W)
        fill = fills[which_fill].transpose(0, 1)  # (N, 3, C, H, W)
        rows = torch.where(removed[:, :, :, None], fill[None], x[None, :, None])
        scrambled = shuffled_tiles(x, settings.tile_fraction, settings.seed)
        rows = torch.cat([rows.reshape(-1, *x.shape[1:]), fills[1], scrambled])
        chunk = batch_size or internal_batch_size(None, x)
        probs = class_probabilities(model, rows, chunk, output_transform)
        classes = probs.shape[1]
        chance = 1.0 / max(classes, 1)
        per_method = probs[: len(named) * n * 3].reshape(len(named), n, 3, classes)
        on_target = per_method.gather(3, wanted[None, :, None, None].expand(len(named), n, 3, 1))
        perturbed = on_target.squeeze(3)  # (M, N, 3): the target's probability
        blur_all, scramble = probs[len(named) * n * 3 :].reshape(2, n, classes)
        colour = kept_decision(blur_all, wanted)
        texture = (kept_decision(scramble, wanted) - colour).clamp(0, 1)
        out: dict[str, dict[str, Tensor]] = {}
        group_of = wanted if groups is None else groups.to(x.device)
        judged = has_decision(group_of, peers, settings.min_peers)
        images = x.float()
        crops_by_chance = _chance_similarity(images, settings)  # the same for every method
        for i, method in enumerate(named):
            hot, ring, _ = perturbed[i].unbind(1)
            small_cue = ((ring - hot) / (1 - chance)).clamp(-1, 1)
            attended = _attended_similarity(images, masses[i], settings)
            consensus = _consensus_of(attended, group_of, peers, crops_by_chance)
            scores = {
                "small_cue_reliance": small_cue,
                "attended_consensus": consensus,
                "stamped_cue_reliance": small_cue.clamp(min=0) * consensus.clamp(0, 1),
                "background_reliance": kept_decision(per_method[i, :, 2], wanted),
                "colour_reliance": colour,
                "texture_reliance": texture,
                "sub_class_stamped_cue": sub_class_stamped_cue(
                    attended, small_cue, group_of, peers
                ),
            }
            if not judged:  # no decision to probe: nothing is judged
                scores = {k: torch.full_like(v, math.nan) for k, v in scores.items()}
            out[method] = scores
        return out


__all__ = [
    "SHORTCUT_SCORES",
    "ProbeSettings",
    "attended_consensus",
    "has_decision",
    "kept_decision",
    "pixel_ranks",
    "shortcut_scores",
    "shuffled_tiles",
    "smoothed_mass",
    "top_region",
]
