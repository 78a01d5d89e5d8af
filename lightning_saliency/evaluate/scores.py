"""Numbers about maps, computed in torch on the maps' device (a few milliseconds per epoch).

Every score is per sample ``(N,)``; the callback logs the mean and a per-class breakdown.

=========================  ======  =================================================  ==========
score                      range   meaning                                            alarming
=========================  ======  =================================================  ==========
``drift_prev``             -1..1   Spearman rank correlation of a map with the same   (info)
                                   sample's map at the previous logged epoch
``drift_first``            -1..1   ... with its map at the first logged epoch         (info)
``object_energy``          0..1    share of the map's mass inside the object mask     --
``object_enrichment``      0..     object_energy / object area: 1 = no preference,    < 1
                                   above 1 = the map prefers the object
``rank_accuracy``          0..1    share of the k hottest pixels inside the object     --
                                   (k = object area)
``pointing_game``          0..1    hottest pixel (the centre of ties) inside the       --
                                   object, within one target-layer cell (hit rate)
``corner_enrichment``      0..     mass in the hottest image corner / its area        > 4.8
``border_enrichment``      0..     mass on the outer border band / its area           --
``consensus``              -1..1   mean correlation between maps of *different*       > 0.82
                                   images: objects move, a planted patch does not
``dead_maps``              0..1    share of all-zero maps (Grad-CAM found nothing)     > 0.5
``ig_completeness_error``  0..     |sum(IG) - (F(x) - F(baseline))| / |F(x)-F(b)|     > 0.05
=========================  ======  =================================================  ==========

Signed maps (IG, SmoothGrad, Guided Grad-CAM) are scored by their positive part, the evidence
for the explained class; ``signed_mass="absolute"`` counts magnitude instead
(:func:`relevance`). ``object_energy``, ``rank_accuracy`` and ``pointing_game`` (tolerance 0)
equal Quantus's ``RelevanceMassAccuracy``, ``RelevanceRankAccuracy`` and ``PointingGame`` on the
same maps (``tests/test_quantus.py``). The alarm thresholds in the last column are the
defaults of :func:`lightning_saliency.evaluate.alarms.default_thresholds`.

Spearman (not Pearson) for drift because display scaling and overall strength change while a
net trains; the ordering of where it looks is what drift is about.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-12


SHORTCUT_SCORES: tuple[str, ...] = (
    "small_cue_reliance",
    "attended_consensus",
    "stamped_cue_reliance",
    "background_reliance",
    "colour_reliance",
    "texture_reliance",
    "sub_class_stamped_cue",
)
"""The mask-free probes' scores (:mod:`lightning_saliency.shortcut_scores`): they need the
model, so they are computed there and handed to the monitor."""

SignedMass = Literal["positive", "absolute"]
"""How a signed map's mass is counted: its positive part (default) or its magnitude."""


def relevance(maps: Tensor, signed_mass: SignedMass = "positive") -> Tensor:
    """The non-negative mass the localisation scores count, float32 ``(N, H, W)``.

    A signed map (IG, SmoothGrad, Guided Grad-CAM) holds evidence *for* the explained class
    (positive) and *against* it (negative). By default only the evidence for the class counts,
    as Quantus does with ``abs=False`` on a positive map; ``"absolute"`` counts both by
    magnitude (Quantus ``abs=True``). Non-negative maps are the same under either rule.

    Examples:
        >>> m = torch.tensor([[[-3.0, 1.0]]])
        >>> relevance(m).tolist(), relevance(m, "absolute").tolist()
        ([[[0.0, 1.0]]], [[[3.0, 1.0]]])
    """
    if signed_mass not in ("positive", "absolute"):
        raise ValueError(f"signed_mass must be 'positive' or 'absolute', got {signed_mass!r}")
    maps = maps.float()
    return maps.abs() if signed_mass == "absolute" else maps.clamp(min=0)


def downsample_for_drift(maps: Tensor, side: int = 32) -> Tensor:
    """Maps at most ``side`` pixels a side (area average): what drift compares."""
    h, w = maps.shape[-2:]
    if h <= side and w <= side:
        return maps.float()
    return F.adaptive_avg_pool2d(maps[:, None].float(), (min(h, side), min(w, side)))[:, 0]


def _ranks(x: Tensor) -> Tensor:
    """Average ranks along the last dim (ties share their mean rank)."""
    sorted_x, _ = x.sort(dim=-1)
    lower = torch.searchsorted(sorted_x, x, right=False)
    upper = torch.searchsorted(sorted_x, x, right=True)
    return (lower + upper - 1).float() / 2


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(
        denom > _EPS, (a * b).sum(-1) / denom.clamp(min=_EPS), torch.zeros_like(denom)
    )


def rank_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-row Spearman rank correlation of two ``(N, D)`` stacks at full resolution, ties
    at their mean rank as scipy's ``spearmanr`` (0 where a row is constant). One sort per
    stack: torchmetrics' ``spearman_corrcoef`` loops over the ties in Python.

    Examples:
        >>> rank_correlation(torch.tensor([[1.0, 2, 2, 5]]), torch.tensor([[0.0, 1, 1, 9]]))
        tensor([1.])
    """
    return _pearson(_ranks(a).double(), _ranks(b).double()).float()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample Spearman rank correlation of two ``(N, H, W)`` map stacks (0 if constant),
    at most 32 pixels a side (what drift compares).

    Examples:
        >>> m = torch.rand(2, 8, 8)
        >>> spearman(m, m * 3 + 1).round(decimals=4).tolist()
        [1.0, 1.0]
    """
    a, b = (
        downsample_for_drift(a).flatten(1).contiguous(),
        downsample_for_drift(b).flatten(1).contiguous(),
    )
    return _pearson(_ranks(a), _ranks(b))


def object_energy(maps: Tensor, masks: Tensor, signed_mass: SignedMass = "positive") -> Tensor:
    """Share of each map's mass inside its object mask (Quantus ``RelevanceMassAccuracy``).

    Examples:
        >>> maps = torch.tensor([[[3.0, 1.0]]]); masks = torch.tensor([[[True, False]]])
        >>> object_energy(maps, masks).item()
        0.75
    """
    mass = relevance(maps, signed_mass)
    inside = (mass * masks.float()).flatten(1).sum(1)
    return inside / mass.flatten(1).sum(1).clamp(min=_EPS)


def enrichment(maps: Tensor, region: Tensor, signed_mass: SignedMass = "positive") -> Tensor:
    """Mass share in ``region`` divided by the region's area share (1 = indifferent).

    Examples:
        >>> maps = torch.zeros(1, 4, 4); maps[0, 0, 0] = 1
        >>> region = torch.zeros(4, 4, dtype=torch.bool); region[:2, :2] = True
        >>> enrichment(maps, region).item()
        4.0
    """
    region = region.float().expand_as(maps)
    area = region.flatten(1).mean(1).clamp(min=_EPS)
    return object_energy(maps, region, signed_mass) / area


def rank_accuracy(maps: Tensor, masks: Tensor, signed_mass: SignedMass = "positive") -> Tensor:
    """Share of the ``k`` hottest pixels inside the object, ``k`` = object area (Quantus
    ``RelevanceRankAccuracy``)."""
    flat, inside = relevance(maps, signed_mass).flatten(1), masks.flatten(1).float()
    k = inside.sum(1).long().clamp(min=1)
    order = flat.argsort(dim=1, descending=True)
    top = torch.arange(flat.shape[1], device=flat.device)[None] < k[:, None]
    hits = inside.gather(1, order) * top
    return hits.sum(1) / k.float()


def pointing_game(
    maps: Tensor, masks: Tensor, tolerance: int = 1, signed_mass: SignedMass = "positive"
) -> Tensor:
    """1 where the hottest pixel falls in the object mask grown by ``tolerance`` pixels.

    When several pixels share the maximum (a flat-topped blob, an upsampled CAM cell), the
    point is the centre of mass of those maxima, never the first in raster order (which
    favours the top-left corner). With ``tolerance=0`` and a single maximum this is Quantus
    ``PointingGame``.

    Examples:
        >>> maps = torch.zeros(1, 5, 5); maps[0, 1:4, 1:4] = 1  # a flat 3x3 top
        >>> masks = torch.zeros(1, 5, 5, dtype=torch.bool); masks[0, 2, 2] = True
        >>> pointing_game(maps, masks, tolerance=0).item()  # its centre, not (1, 1)
        1.0
    """
    grown = masks.float()[:, None]
    if tolerance > 0:
        grown = F.max_pool2d(grown, 2 * tolerance + 1, stride=1, padding=tolerance)
    mass = relevance(maps, signed_mass)
    row, col = hottest_points(mass).unbind(1)
    hottest = row * mass.shape[-1] + col
    return grown.flatten(1).gather(1, hottest[:, None]).squeeze(1)


def hottest_points(mass: Tensor, tie: float = 0.0) -> Tensor:
    """``(N, 2)`` row and column of each ``(N, H, W)`` map's maximum; where several pixels
    are within ``tie`` of it, the centre of those maxima (never the first in raster order).

    Examples:
        >>> m = torch.zeros(1, 5, 5); m[0, 1:4, 1:4] = 1
        >>> hottest_points(m).tolist()
        [[2, 2]]
    """
    h, w = mass.shape[-2:]
    flat = mass.flatten(1)
    peak = flat.amax(dim=1, keepdim=True)
    top = (flat >= peak - tie if tie > 0 else flat == peak).float()
    count = top.sum(1).clamp(min=1)
    index = torch.arange(h * w, device=flat.device)
    row = ((top * (index // w)).sum(1) / count).round().long()
    col = ((top * (index % w)).sum(1) / count).round().long()
    return torch.stack([row, col], dim=1)


def pointing_tolerance(size: tuple[int, int], cells: tuple[int, int] | None) -> int:
    """The pointing game's tolerance in input pixels: one cell of the target layer, the
    resolution a layer map has (``ceil(side / cells)``, the larger of height and width);
    0 (pixel-exact) when no target layer was used.

    Examples:
        >>> pointing_tolerance((48, 48), (12, 12)), pointing_tolerance((224, 224), (7, 7))
        (4, 32)
        >>> pointing_tolerance((48, 48), None)
        0
    """
    if cells is None:
        return 0
    return max(-(-size[0] // max(1, cells[0])), -(-size[1] // max(1, cells[1])))


def corner_regions(size: tuple[int, int], fraction: float = 1 / 6) -> Tensor:
    """Four boolean ``(H, W)`` corner squares of side ``fraction`` of the image."""
    h, w = size
    side_h, side_w = max(1, round(h * fraction)), max(1, round(w * fraction))
    regions = torch.zeros(4, h, w, dtype=torch.bool)
    regions[0, :side_h, :side_w] = True
    regions[1, :side_h, -side_w:] = True
    regions[2, -side_h:, :side_w] = True
    regions[3, -side_h:, -side_w:] = True
    return regions


def corner_enrichment(
    maps: Tensor, fraction: float = 1 / 6, signed_mass: SignedMass = "positive"
) -> Tensor:
    """The largest corner enrichment per map: a planted corner patch drives it up."""
    regions = corner_regions((maps.shape[-2], maps.shape[-1]), fraction).to(maps.device)
    return torch.stack([enrichment(maps, r, signed_mass) for r in regions], dim=1).amax(dim=1)


def border_enrichment(
    maps: Tensor, fraction: float = 1 / 8, signed_mass: SignedMass = "positive"
) -> Tensor:
    """Enrichment of the outer band (width ``fraction`` of the side): frames, watermarks."""
    h, w = maps.shape[-2:]
    band = torch.ones(h, w, dtype=torch.bool, device=maps.device)
    bh, bw = max(1, round(h * fraction)), max(1, round(w * fraction))
    band[bh:-bh, bw:-bw] = False
    return enrichment(maps, band, signed_mass)


def consensus(maps: Tensor, signed_mass: SignedMass = "positive") -> Tensor:
    """Per sample, its mean correlation with the maps of the other samples (16×16 grid)."""
    n = maps.shape[0]
    if n < 2:
        return torch.zeros(n, device=maps.device)
    small = downsample_for_drift(relevance(maps, signed_mass), 16).flatten(1)
    small = small - small.mean(1, keepdim=True)
    small = small / small.norm(dim=1, keepdim=True).clamp(min=_EPS)
    corr = small @ small.T
    corr = corr - torch.diag_embed(torch.diagonal(corr))
    result: Tensor = corr.sum(1) / (n - 1)
    return result


def dead_maps(maps: Tensor) -> Tensor:
    """1 for a map that is zero everywhere (e.g. Grad-CAM of an untrained or saturated net)."""
    return (maps.float().abs().flatten(1).amax(1) <= _EPS).float()


def map_scores(
    maps: Tensor,
    masks: Tensor | None = None,
    previous: Tensor | None = None,
    first: Tensor | None = None,
    tolerance: int = 1,
    signed_mass: SignedMass = "positive",
) -> dict[str, Tensor]:
    """All per-sample scores that apply to ``(N, H, W)`` maps.

    Drift compares the maps as they are (signed maps with their sign); every other score
    counts :func:`relevance` (``signed_mass``). A map that is zero everywhere is dead; a map
    with no mass under ``signed_mass`` (a signed map with no evidence for its class) points
    nowhere: both leave the localisation and enrichment scores NaN for that sample.

    Examples:
        >>> maps = torch.rand(3, 16, 16); masks = torch.zeros(3, 16, 16, dtype=torch.bool)
        >>> sorted(map_scores(maps, masks))[:3]
        ['border_enrichment', 'consensus', 'corner_enrichment']
    """
    mass = relevance(maps, signed_mass)
    out: dict[str, Tensor] = {
        "corner_enrichment": corner_enrichment(mass),
        "border_enrichment": border_enrichment(mass),
        "consensus": consensus(mass),
        "dead_maps": dead_maps(maps),
    }
    if previous is not None:
        out["drift_prev"] = spearman(maps, previous)
    if first is not None:
        out["drift_first"] = spearman(maps, first)
    if masks is not None:
        masks = masks.to(maps.device).bool()
        out["object_energy"] = object_energy(mass, masks)
        out["object_enrichment"] = enrichment(mass, masks)
        out["rank_accuracy"] = rank_accuracy(mass, masks)
        out["pointing_game"] = pointing_game(mass, masks, tolerance)
    # A map without mass points nowhere: dead maps count in dead_maps, not as a miss.
    empty = mass.flatten(1).amax(1) <= _EPS
    for name in (
        "corner_enrichment",
        "border_enrichment",
        "object_energy",
        "object_enrichment",
        "rank_accuracy",
        "pointing_game",
    ):
        if name in out:
            out[name] = out[name].masked_fill(empty, float("nan"))
    return out


def chance_levels(masks: Tensor | None, n: int, device: torch.device) -> dict[str, Tensor]:
    """What a map that points nowhere (zero everywhere) is logged as, per sample: the scores of
    a uniform map, i.e. chance. Enrichments are 1; with masks, the energy inside the object,
    the rank accuracy and the pointing game are the object's share of the image. Alarms never
    judge these values; they keep a logged key present and finite when every map is dead.

    Examples:
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool); masks[:, :2] = True
        >>> levels = chance_levels(masks, 2, torch.device("cpu"))
        >>> levels["corner_enrichment"].tolist(), levels["pointing_game"].tolist()
        ([1.0, 1.0], [0.5, 0.5])
    """
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
    levels = {"corner_enrichment": ones, "border_enrichment": ones}
    levels.update({name: zeros for name in SHORTCUT_SCORES})  # the probes judged nothing
    if masks is not None:
        area = masks.to(device).float().flatten(1).mean(1)
        levels.update(
            object_enrichment=ones,
            object_energy=area,
            rank_accuracy=area,
            pointing_game=area,
        )
    return levels
