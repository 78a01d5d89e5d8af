"""Sub-class strategies: a stamped cue that only part of a class carries, found by grouping.

A watermark on a fifth of one class's images (Lapuschkin et al. 2019, the horse "source tag")
moves the class's *mean* score by a fifth of what it moves on the images that carry it, so the
mean-based alarms (:mod:`.shortcut_probes`) miss it. SpRAy found that tag by clustering one
class's maps. Here the grouping is by what the maps point at, not where: the images of a class
whose attended crops look alike (the correlation of :func:`.shortcut_probes.attended_consensus`)
form a group, so a mark that roams is grouped as well as one that stays in a corner.

==========================  =====  =========================================  ========
score                       range  meaning                                    alarming
==========================  =====  =========================================  ========
``sub_class_stamped_cue``   0..1   the strongest group of ``members`` images  > 0.38
                                   of one class: their mean small-cue
                                   reliance, times how much more alike their
                                   attended crops are than the class's
==========================  =====  =========================================  ========

A part of a class is a strategy of its own when it stands out from the rest of the class: the
tagged images' crops are the same tag (correlation near 1), the others' crops are varied
objects. Likeness is measured above the class's own mean likeness, not above chance: a class of
alike objects (small solid shapes, whose crops correlate at 0.86) has every triple alike, so no
triple stands out (a clean model of them reached 0.37 above chance, 0.25 above its class).

``members`` is a fifth of a class's judged (correctly classified) images, at least
:data:`MIN_MEMBERS`; a class with fewer than :data:`MIN_IMAGES` of them, or fewer than twice
``members`` (a part must be smaller than the whole), is not judged. So the score needs about
16 samples per class (``num_samples`` = 16 x the classes); with fewer it is not logged. Each
image carries the value of the group around it, and the monitor judges the score by its
largest value (:data:`~.alarms.GROUP_SCORES`), not by its mean.

A tint on part of a class has no such score: under the whole-image blur, the three images of a
class that keep the most of their decision keep 0.85-0.9 of it in clean runs of small shapes
too, against 0.97-1.0 for a tinted part (``benchmarks/README.md``).

Why our own: SpRAy (in ``corelay``) clusters heatmaps offline with spectral clustering and
leaves the judgement to a person; it needs no model and finds places, not contents. This needs
no clustering library: a nearest-neighbour group per image of a few dozen images is one sort
of a small similarity matrix, on the images' device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MIN_MEMBERS = 3
MIN_IMAGES = 10
GROUP_SHARE = 0.2


def group_size(count: int, share: float = GROUP_SHARE) -> int | None:
    """How many images of a class with ``count`` judged images make a group (``None``: too
    few to tell a part of the class from all of it).

    Examples:
        >>> group_size(12), group_size(24), group_size(8)
        (3, 5, None)
    """
    members = max(MIN_MEMBERS, round(share * count))
    return members if count >= max(2 * members, MIN_IMAGES) else None


def _judged(groups: Tensor, peers: Tensor | None) -> Tensor:
    return torch.ones_like(groups, dtype=torch.bool) if peers is None else peers.bool()


def sub_class_stamped_cue(
    similarity: Tensor,
    small_cue: Tensor,
    groups: Tensor,
    peers: Tensor | None,
    share: float = GROUP_SHARE,
) -> Tensor:
    """``(N,)``: for each judged image, the group of it and its ``members - 1`` most alike
    judged images of its class (``similarity``: the attended crops' correlation, ``(N, N)``):
    the group's mean small-cue reliance (negative counts as 0) times how much the mean
    correlation between its members exceeds the mean correlation between all the class's
    judged images, clamped to 0..1. NaN for images not judged, or whose class is too small
    (:func:`group_size`).

    Examples:
        >>> sim = torch.full((10, 10), 0.1); sim[:3, :3] = 0.9  # three images share a tag
        >>> sim[3:, 3:] = 0.3                                  # the others are objects
        >>> cue = torch.tensor([0.6, 0.5, 0.7, 0.0, 0.1, 0.0, 0.0, 0.1, 0.0, 0.0])
        >>> out = sub_class_stamped_cue(sim, cue, torch.zeros(10), None)
        >>> [round(v, 2) for v in out.tolist()[:4]]
        [0.39, 0.39, 0.39, 0.0]
        >>> alike = torch.full((10, 10), 0.9)                   # every crop alike: no part
        >>> float(sub_class_stamped_cue(alike, cue, torch.zeros(10), None).max())
        0.0
    """
    n = similarity.shape[0]
    device = similarity.device
    groups = groups.to(device)
    judged = _judged(groups, peers).to(device)
    cue = small_cue.to(device).float().clamp(min=0).nan_to_num(0.0)
    out = torch.full((n,), math.nan, device=device)
    for cls in sorted(set(groups[judged].tolist())):
        rows = torch.nonzero(judged & (groups == cls)).flatten()
        members = group_size(len(rows), share)
        if members is None:
            continue
        sim = similarity[rows][:, rows].float()
        everyone = sim[~torch.eye(len(rows), dtype=torch.bool, device=device)].mean()
        team = _teams(sim, members)  # (R, m): each image and its most alike
        pairs = sim[team[:, :, None], team[:, None, :]]  # (R, m, m)
        off = ~torch.eye(members, dtype=torch.bool, device=device)
        standing_out = (pairs[:, off].mean(1) - everyone).clamp(0, 1)
        out[rows] = (cue[rows][team].mean(1) * standing_out).clamp(0, 1)
    return out


def _teams(sim: Tensor, members: int) -> Tensor:
    """``(R, members)``: each row's image, then the ``members - 1`` other images most like it
    (an image's likeness with itself is not assumed to be the largest)."""
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    nearest = sim.masked_fill(eye, -math.inf).argsort(dim=1, descending=True, stable=True)
    own = torch.arange(sim.shape[0], device=sim.device)[:, None]
    return torch.cat([own, nearest[:, : members - 1]], 1)


__all__ = [
    "GROUP_SHARE",
    "MIN_IMAGES",
    "MIN_MEMBERS",
    "group_size",
    "sub_class_stamped_cue",
]
