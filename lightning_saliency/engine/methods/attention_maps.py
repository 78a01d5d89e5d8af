"""Transformers explained as transformers: attention rollout, gradient-weighted attention and
LeGrad, from every block's attention probabilities (read by
:mod:`lightning_saliency.engine.attention`, which states which models they apply to).

- ``attention_rollout`` (Abnar & Zuidema 2020, with jacobgil's ``vit-explain`` options): per
  block the heads are fused (``mean``, ``max`` or ``min``), the lowest ``discard_ratio`` of the
  fused entries are set to zero (never the readout token's attention to itself), the residual is
  added (``(A + I) / 2``), rows are renormalised, and the blocks are multiplied through; the map
  is the readout row. It is **class-agnostic**: the same map for every target, so it never
  drives an alarm. ``vit-explain`` divides by ``a.sum(dim=-1)`` without ``keepdim``, which
  divides each *column* by a row's sum; here rows are normalised, as the paper says. The two
  agree where rows already sum to one (``mean`` without discarding), which is where
  ``tests/test_attention_maps.py`` compares them with ``vit-explain``'s maps.
- ``generic_attention`` (Chefer, Gur & Wolf, ICCV 2021, "Generic attention-model
  explainability"): ``R = I``; per block ``R += mean_heads((dA * A)^+) @ R``, where ``dA`` is
  the explained score's gradient with respect to the attention; the map is the readout row of
  ``R - I`` (the identity is each token's own start: zero over the grid in a class token's row,
  a constant in a pooled model's mean row).
- ``legrad`` (Bousselham et al. 2024, as torchcam 0.5.0): per block, the gradient of the class
  score its tokens would give (their mean through the final norm and head) with respect to its
  attention, ReLU, mean over heads and queries, averaged over the blocks.

Why our own: ``vit-explain`` and the Chefer code are no packages, explain one image at a time,
leave their hooks on the model and read timm's attention only with fused attention turned off
by hand; torchcam's LeGrad reads torchvision's ViT only. Here one forward serves the three, on
the device, batched, for torchvision's and timm's ViTs and any registered attention.

Chefer et al.'s CVPR 2021 transformer attribution (attention relevance from an LRP pass) is
``transformer_attribution`` and relevance propagation by Ali et al.'s conservative rules is
``transformer_lrp``, each in its own module; the latter says why AttnLRP is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_saliency.engine.attention import AttentionPass, attention_pass
from lightning_saliency.engine.methods.base import MethodOptions, SaliencyMethod, register
from lightning_saliency.engine.methods.session import ExplainSession, upsample
from lightning_saliency.engine.token_heads import token_head
from lightning_saliency.errors import SaliencyConfigError


def read_attention(session: ExplainSession) -> AttentionPass:
    """The attention pass of this ``explain()`` call (one forward, shared by the methods)."""
    found: AttentionPass = session.shared(
        "attention", lambda: attention_pass(session.model, session.images.detach())
    )
    return found


def attention_gradients(session: ExplainSession) -> list[Tensor]:
    """The explained score's gradient with respect to each block's attention (one backward,
    shared; the graph is kept for methods that differentiate other scores)."""

    def compute() -> list[Tensor]:
        found = read_attention(session)
        score = session.explained_scores(found.output).sum()
        grads = torch.autograd.grad(
            score, found.probabilities, retain_graph=True, allow_unused=True
        )
        return [
            torch.zeros_like(p) if g is None else g.detach()
            for p, g in zip(found.probabilities, grads)
        ]

    grads: list[Tensor] = session.shared("attention_gradients", compute)
    return grads


# -- attention rollout -------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutOptions(MethodOptions):
    """Options of ``attention_rollout`` (``vit-explain``'s, with its defaults).

    Attributes:
        head_fusion: how a block's heads become one attention: ``"mean"``, ``"max"`` or
            ``"min"``.
        discard_ratio: the fraction of the lowest fused attention entries set to zero in each
            block (the readout token's attention to itself is kept).
    """

    head_fusion: Literal["mean", "max", "min"] = "mean"
    discard_ratio: float = 0.9

    def check(self) -> None:
        if not 0.0 <= self.discard_ratio < 1.0:
            raise ValueError(f"discard_ratio must be in [0, 1), got {self.discard_ratio}")


def fuse_heads(probs: Tensor, fusion: str) -> Tensor:
    """``(N, heads, T, T)`` -> ``(N, T, T)`` by the mean, max or min over heads."""
    if fusion == "mean":
        return probs.mean(1)
    return probs.amax(1) if fusion == "max" else probs.amin(1)


def discard_lowest(fused: Tensor, ratio: float) -> Tensor:
    """Zero the lowest ``ratio`` of each image's ``T x T`` entries, keeping entry ``(0, 0)``
    (``vit-explain``'s rule, per image).

    Examples:
        >>> discard_lowest(torch.tensor([[[1.0, 4.0], [2.0, 3.0]]]), 0.5).tolist()
        [[[1.0, 4.0], [0.0, 3.0]]]
    """
    flat = fused.reshape(fused.shape[0], -1).clone()
    count = int(flat.shape[1] * ratio)
    if count:
        lowest = flat.topk(count, dim=1, largest=False).indices
        drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
        drop[:, 0] = False
        flat = flat.masked_fill(drop, 0.0)
    return flat.reshape(fused.shape)


def rollout(probabilities: list[Tensor], fusion: str, ratio: float) -> Tensor:
    """Attention multiplied through the blocks with the residual, ``(N, T, T)``."""
    first = probabilities[0]
    eye = torch.eye(first.shape[-1], device=first.device)
    result = eye.expand(first.shape[0], -1, -1)
    for probs in probabilities:
        fused = discard_lowest(fuse_heads(probs.detach().float(), fusion), ratio)
        mixed = (fused + eye) / 2
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed @ result
    return result


def attention_rollout(session: ExplainSession, options: RolloutOptions) -> Tensor:
    """Attention rollout: attention of every block multiplied through, the readout row."""
    found = read_attention(session)
    relevance = rollout(found.probabilities, options.head_fusion, options.discard_ratio)
    return upsample(found.read_row(relevance), session.size)


# -- gradient-weighted attention (Chefer et al., ICCV 2021) ------------------------------------
def generic_relevance(probabilities: list[Tensor], gradients: list[Tensor]) -> Tensor:
    """``R = I; R += mean_heads((dA * A)^+) @ R`` over the blocks, ``(N, T, T)``."""
    first = probabilities[0]
    relevance = torch.eye(first.shape[-1], device=first.device).repeat(first.shape[0], 1, 1)
    for probs, grad in zip(probabilities, gradients):
        weighted = (grad.float() * probs.detach().float()).clamp(min=0).mean(1)
        relevance = relevance + weighted @ relevance
    return relevance


def generic_attention(session: ExplainSession, _options: MethodOptions) -> Tensor:
    """Chefer et al.'s gradient-weighted attention, rolled through the blocks."""
    found = read_attention(session)
    relevance = generic_relevance(found.probabilities, attention_gradients(session))
    eye = torch.eye(relevance.shape[-1], device=relevance.device)
    # R - I: the identity is each token's own start, no relevance (for a class token's row it
    # is zero over the grid anyway; for a pooled model's mean row it is a constant 1 / cells)
    return upsample(found.read_row(relevance - eye), session.size)


# -- LeGrad ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LeGradOptions(MethodOptions):
    """Options of ``legrad``.

    Attributes:
        blocks: how many of the last blocks to average (``None``: every block).
    """

    blocks: int | None = None

    def check(self) -> None:
        if self.blocks is not None and self.blocks < 1:
            raise ValueError(f"blocks must be >= 1 or None, got {self.blocks}")


def legrad(session: ExplainSession, options: LeGradOptions) -> Tensor:
    """LeGrad: per block, the positive gradient of its tokens' class score with respect to its
    attention, averaged over heads, queries and blocks."""
    found = read_attention(session)
    if len(found.blocks) != len(found.probabilities):
        raise SaliencyConfigError(
            "legrad scores each block's tokens: the module around each attention must "
            "return (N, T, C) tokens."
        )
    head = token_head(session.model)
    chosen = range(len(found.blocks))[-(options.blocks or len(found.blocks)) :]
    maps = []
    for index in chosen:
        score = session.class_score(head(found.blocks[index]), "legrad").sum()
        probs = found.probabilities[index]
        (grad,) = torch.autograd.grad(score, probs, retain_graph=True, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(probs)
        keys = grad.detach().float().clamp(min=0).mean(dim=(1, 2))
        maps.append(found.grid_of_keys(keys))
    return upsample(torch.stack(maps).mean(0), session.size)


register(
    SaliencyMethod(
        "attention_rollout",
        attention_rollout,
        "Attention rollout (Abnar & Zuidema): every block's attention multiplied through, "
        "with the residual (transformers; class-agnostic).",
        options=RolloutOptions,
        passes="1F",
        needs_layer=False,
        needs_attention=True,
        location_alarms=False,
        class_specific=False,
        aliases=("rollout",),
    )
)
register(
    SaliencyMethod(
        "generic_attention",
        generic_attention,
        "Gradient-weighted attention rolled through the blocks (Chefer et al., ICCV 2021; "
        "transformers).",
        passes="1F + 1B",
        needs_layer=False,
        needs_attention=True,
        location_alarms=False,
        aliases=("chefer", "gradient_weighted_attention"),
    )
)
register(
    SaliencyMethod(
        "legrad",
        legrad,
        "LeGrad: each block's positive attention gradient of its tokens' class score, "
        "averaged (transformers).",
        options=LeGradOptions,
        cost="moderate",
        passes="1F + L B (L = blocks)",
        needs_layer=False,
        needs_attention=True,
        location_alarms=False,
    )
)
