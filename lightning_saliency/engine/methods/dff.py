"""Deep Feature Factorization: non-negative matrix factorisation of the layer's activations.

Why our own: pytorch-grad-cam's ``DeepFeatureFactorization`` copies the activations to the CPU
and runs scikit-learn's NMF there. Here the multiplicative-update NMF runs on the device from a
deterministic NNDSVDa start, and concepts are ordered by their total mass so that concept 0 is
the dominant one. Given a warm start (the callback keeps one across epochs), each concept is
matched to the most similar one of the previous call, so it keeps its place and colour. The
activations are scaled to a unit peak first, so the
concepts are the same for activations x 1e-6 and x 1e6 (the updates' epsilon is then relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_saliency.engine.layers import find_classifier_head
from lightning_saliency.engine.methods.base import MethodOptions, SaliencyMethod, register
from lightning_saliency.engine.methods.session import ExplainSession, upsample
from lightning_saliency.engine.sharded import call_with_full_weights

_EPS = 1e-8
_TINY = 1e-30


def _top_singular(v: Tensor, k: int, iterations: int = 6) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` SVD by subspace iteration from a fixed cosine basis: deterministic (no RNG)
    and a few matmuls instead of a full SVD."""
    cols = v.shape[1]
    grid = torch.arange(cols, device=v.device, dtype=v.dtype)[:, None] + 0.5
    basis = torch.cos(torch.pi * grid * torch.arange(k + 2, device=v.device, dtype=v.dtype) / cols)
    q = torch.linalg.qr(v @ basis).Q
    for _ in range(iterations):
        q = torch.linalg.qr(v @ (v.T @ q)).Q
    u_small, s, vh = torch.linalg.svd(q.T @ v, full_matrices=False)
    return (q @ u_small)[:, :k], s[:k], vh[:k]


def _nndsvda(v: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Boutsidis & Gallopoulos' NNDSVD start, zeros filled with the mean (``a`` variant)."""
    if min(v.shape) > 4 * (k + 2):
        u, s, vh = _top_singular(v, k)
    else:
        u, s, vh = torch.linalg.svd(v, full_matrices=False)
    rows, cols = v.shape
    w = torch.zeros(rows, k, device=v.device, dtype=v.dtype)
    h = torch.zeros(k, cols, device=v.device, dtype=v.dtype)
    for j in range(min(k, s.numel())):
        x, y = u[:, j], vh[j]
        xp, xn, yp, yn = x.clamp(min=0), (-x).clamp(min=0), y.clamp(min=0), (-y).clamp(min=0)
        pos = xp.norm() * yp.norm()
        neg = xn.norm() * yn.norm()
        if j == 0 or pos >= neg:
            a, b, m = xp, yp, pos
        else:
            a, b, m = xn, yn, neg
        scale = torch.sqrt(s[j] * m)
        w[:, j] = scale * a / (a.norm() + _EPS)
        h[j] = scale * b / (b.norm() + _EPS)
    fill = v.mean()
    w = torch.where(w < _EPS, fill, w)
    h = torch.where(h < _EPS, fill, h)
    return w, h


def nmf(v: Tensor, k: int, iterations: int = 100, tol: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Factor a non-negative ``(C, M)`` matrix as ``W (C, K) @ H (K, M)`` on ``v.device``
    (multiplicative updates, Frobenius loss; stops early once the error stalls).

    Examples:
        >>> v = torch.rand(6, 2) @ torch.rand(2, 10)
        >>> w, h = nmf(v, 2)
        >>> bool(((w @ h - v).norm() / v.norm()) < 0.05)
        True
    """
    w, h = _nndsvda(v, k)
    previous = float("inf")
    for step in range(1, iterations + 1):
        # Floors keep values out of the denormal range, where CPU arithmetic slows 100-fold.
        h = (h * (w.T @ v) / (w.T @ w @ h + _EPS)).clamp_(min=_TINY)
        w = (w * (v @ h.T) / (w @ (h @ h.T) + _EPS)).clamp_(min=_TINY)
        if step % 25 == 0:  # stop when the error stalls (one host sync per 25 steps)
            error = float((v - w @ h).norm())
            if previous - error < tol * previous:
                break
            previous = error
    return w, h


def match_concepts(previous: Tensor, current: Tensor) -> Tensor:
    """The order of ``current`` ``(K, C)`` concepts that puts each next to the most similar
    ``previous`` one (cosine similarity, most similar pairs first), so a concept keeps its
    colour from one epoch to the next.

    Examples:
        >>> old = torch.eye(3)
        >>> match_concepts(old, old[[2, 0, 1]]).tolist()
        [1, 2, 0]
    """
    a = torch.nn.functional.normalize(previous.float(), dim=1)
    b = torch.nn.functional.normalize(current.float(), dim=1)
    similarity = a @ b.T
    k = similarity.shape[0]
    order = [-1] * k
    taken: set[int] = set()
    for flat in similarity.flatten().argsort(descending=True).tolist():
        row, col = divmod(flat, k)
        if order[row] < 0 and col not in taken:
            order[row] = col
            taken.add(col)
    return torch.tensor(order, device=current.device)


@dataclass(frozen=True)
class DFFOptions(MethodOptions):
    """Options of ``dff``.

    Attributes:
        components: how many concepts (K) to factorise the layer into.
    """

    components: int = 4

    def check(self) -> None:
        if self.components < 1:
            raise ValueError(f"components must be >= 1, got {self.components}")


def dff(session: ExplainSession, options: DFFOptions) -> Tensor:
    """``(N, K, H, W)`` concept maps; concept class scores go to ``session.extras``."""
    acts = session.layer_activations()
    maps, extras = factorise(acts, session.model, session.size, options, session.warm_start("dff"))
    session.extras.update(extras)
    return maps


def factorise(
    activations: Tensor,
    model: nn.Module,
    size: tuple[int, int],
    options: DFFOptions,
    memory: dict[str, Any],
) -> tuple[Tensor, dict[str, Any]]:
    """DFF from the layer's ``(N, C, h, w)`` activations of all samples: ``(N, K, H, W)``
    concept maps at ``size`` and the extras (concept class scores through ``model``'s head).
    Under DDP each rank gathers the activations of every rank's share and factorises them
    alike (:mod:`lightning_saliency.callback.sharing`): the concepts are those of all samples."""
    k = options.components
    acts = torch.nan_to_num(activations.float())
    n, c, hh, ww = acts.shape
    v = acts.permute(1, 0, 2, 3).reshape(c, -1)
    offset = v.min(dim=1, keepdim=True).values
    shifted = v - offset
    # Scale-invariant: the factorisation sees activations of unit peak, whatever their scale
    # (MobileNets and EfficientNets give 1e-13..1e-8; a fixed epsilon would swamp them).
    scale = shifted.max().clamp(min=torch.finfo(v.dtype).tiny)
    w, h = nmf(shifted / scale, k)
    w = w * scale
    order = (h.sum(dim=1) * w.norm(dim=0)).argsort(descending=True)
    previous = memory.get("concepts")
    if isinstance(previous, list) and len(previous) == k and len(previous[0]) == c:
        order = order[match_concepts(torch.tensor(previous, device=w.device), w[:, order].T)]
    w, h = w[:, order], h[order]
    memory["concepts"] = w.T.detach().float().cpu().tolist()  # plain numbers: checkpointable
    concepts = (w + offset).T  # (K, C): each concept as a feature vector, as pytorch-grad-cam
    extras: dict[str, Any] = {}
    head = find_classifier_head(model, c)
    if head is not None:
        weight = next(head.parameters())
        with torch.no_grad():  # FSDP2: the head's shards are gathered (all ranks, in order)
            scores = call_with_full_weights(head, concepts.to(weight.dtype))
            extras["dff_concept_scores"] = scores.float()
    maps = h.reshape(k, n, hh, ww).permute(1, 0, 2, 3)
    return upsample(maps, size), extras


register(
    SaliencyMethod(
        "dff",
        dff,
        "Deep Feature Factorization: the K concepts the layer sees, and where (class-agnostic).",
        options=DFFOptions,
        kind="concepts",
        passes="1F (+ NMF)",
        flat_names={"dff_components": "components"},
        extras={"dff_concept_scores": "(K, num_classes) scores of each concept through the head"},
        concept_scores="dff_concept_scores",
        aliases=("deep_feature_factorization",),
        joint=factorise,
    )
)
