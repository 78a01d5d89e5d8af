"""Chefer, Gur & Wolf's transformer attribution (CVPR 2021, "Transformer interpretability beyond
attention visualization"): each block's attention weighted by its relevance (from an LRP pass
through the whole network) and its gradient, positive part, mean over heads, plus the identity,
multiplied through the blocks from ``start_layer`` (without renormalising rows, as the
authors' ``ViT_LRP.compute_rollout_attention``); the map is the class token's row.

The relevance pass follows the authors' rules (``baselines/ViT/ViT_LRP.py`` and
``modules/layers_ours.py`` of hila-chefer/Transformer-Explainability) with ``alpha = 1``:

- ``nn.Linear``: the z-rule on positive contributions (positive weights with positive inputs,
  negative weights with negative inputs), biases ignored;
- the attention's two products (``A V`` and ``Q K^T``): each factor gets ``x * gradient`` of the
  relevance ratio, halved; the relevance that reaches ``A`` is the block's attention relevance;
- each residual addition: split by ``x * gradient``, then rescaled so that each branch keeps its
  share of the absolute relevance (per image: the authors sum over the batch, which explains
  one image at a time);
- layer norms, GELU, softmax, dropout and the class-token pick pass relevance unchanged.

The model is not changed: one forward with hooks records each block's inputs, and the rules run
on those tensors afterwards. It reads torchvision's ``EncoderBlock`` and timm's ``Block`` (plain
blocks: no layer scale, no q/k norm), with a linear head on the class token; other models are
an error that names the methods that work there. ``tests/test_attention_maps.py`` compares the
maps with the authors' code, run once on the same weights (the fixture).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.engine.attention import (
    AttentionPass,
    attention_pass,
    check_transformer,
    enclosing_module,
    split_heads,
    transformer_of,
)
from lightning_saliency.engine.methods.base import MethodOptions, SaliencyMethod, register
from lightning_saliency.engine.methods.session import ExplainSession, upsample
from lightning_saliency.errors import SaliencyConfigError


def safe_divide(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` as the authors divide: ``b`` shifted by ``1e-9``, zero where ``b`` is.

    Examples:
        >>> safe_divide(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0])).tolist()
        [0.5, 0.0]
    """
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).to(den.dtype) * 1e-9
    return a / den * b.ne(0).to(b.dtype)


def linear_relevance(x: Tensor, weight: Tensor, relevance: Tensor) -> Tensor:
    """LRP through ``x @ weight.T`` with alpha = 1 (positive contributions only)."""
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    px, nx = x.clamp(min=0), x.clamp(max=0)
    ratio = safe_divide(relevance, F.linear(px, pw) + F.linear(nx, nw))
    return px * (ratio @ pw) + nx * (ratio @ nw)


def product_relevance(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of the two factors of ``a @ b``, each ``x * gradient`` of the ratio, halved."""
    ratio = safe_divide(relevance, a @ b)
    return a * (ratio @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ ratio) / 2


def add_relevance(a: Tensor, b: Tensor, relevance: Tensor) -> tuple[Tensor, Tensor]:
    """Relevance of the two terms of ``a + b``, each rescaled to its share of the absolute
    relevance, per image."""
    ratio = safe_divide(relevance, a + b)
    ra, rb = a * ratio, b * ratio
    dims = tuple(range(1, a.dim()))
    sa, sb, total = ra.sum(dims), rb.sum(dims), relevance.sum(dims)
    share_a = safe_divide(sa.abs(), sa.abs() + sb.abs()) * total
    share_b = safe_divide(sb.abs(), sa.abs() + sb.abs()) * total
    shape = (-1,) + (1,) * (a.dim() - 1)
    return (
        ra * safe_divide(share_a, ra.sum(dims)).reshape(shape),
        rb * safe_divide(share_b, rb.sum(dims)).reshape(shape),
    )


def clone_relevance(x: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Relevance of a tensor used twice (the residual and the branch)."""
    return x * (safe_divide(first, x) + safe_divide(second, x))


@dataclass
class BlockParts:
    """One plain block's modules: ``attention``; its q/k/v projection (``qkv``, or ``None``
    for ``nn.MultiheadAttention``'s packed weights) and output projection; the MLP's two
    linear layers and the MLP itself."""

    attention: nn.Module
    qkv: nn.Linear | None
    proj: nn.Linear
    fc1: nn.Linear
    fc2: nn.Linear
    mlp: nn.Module


def _parts(block: nn.Module) -> BlockParts | None:
    """A plain torchvision ``EncoderBlock`` or timm ``Block``, or ``None``."""
    attention = getattr(block, "self_attention", None)
    mlp = getattr(block, "mlp", None)
    if isinstance(attention, nn.MultiheadAttention) and isinstance(mlp, nn.Sequential):
        linears = [m for m in mlp if isinstance(m, nn.Linear)]
        if len(linears) == 2:
            return BlockParts(attention, None, attention.out_proj, linears[0], linears[1], mlp)
    attention = getattr(block, "attn", None)
    parts = [getattr(attention, n, None) for n in ("qkv", "proj", "q_norm", "k_norm", "norm")]
    plain = all(
        isinstance(getattr(block, n, nn.Identity()), nn.Identity) for n in ("ls1", "ls2")
    ) and all(isinstance(p, nn.Identity) for p in parts[2:])
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    linear = (nn.Linear, nn.Linear, nn.Linear, nn.Linear)
    found = (parts[0], parts[1], fc1, fc2)
    if attention is not None and mlp is not None and plain and all(map(isinstance, found, linear)):
        return BlockParts(attention, parts[0], parts[1], fc1, fc2, mlp)  # type: ignore[arg-type]
    return None


def _head(model: nn.Module) -> nn.Linear | None:
    """The linear head on the class token: torchvision's ``heads.head``, timm's ``head``."""
    heads = getattr(model, "heads", None)
    if isinstance(heads, nn.Sequential) and len(heads) == 1 and isinstance(heads[0], nn.Linear):
        return heads[0]
    head = getattr(model, "head", None)
    pool = getattr(model, "global_pool", "token")
    fc_norm = getattr(model, "fc_norm", nn.Identity())
    distilled = getattr(model, "head_dist", None) is not None  # DeiT averages two heads
    plain = pool == "token" and isinstance(fc_norm, nn.Identity) and not distilled
    if isinstance(head, nn.Linear) and plain:
        return head
    return None


class _Inputs:
    """Hooks that record what the rules read, per block, during one forward: ``seen[block]``
    maps ``x`` (the block's input), ``attention_in``, ``attention_out``, ``qkv_out``,
    ``proj_in``, ``fc1_in``, ``fc2_in`` and ``mlp_out`` to their tensors."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Tensor]] = {}

    def watch(self, index: int, block: nn.Module, parts: BlockParts) -> list[Any]:
        seen = self.seen.setdefault(index, {})

        def entering(name: str) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                seen[name] = args[0].detach()

            return hook

        def keep(name: str, output: bool = False) -> Any:
            def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
                value = out if output else args[0]
                seen[name] = (value[0] if isinstance(value, tuple) else value).detach()

            return hook

        handles = [block.register_forward_pre_hook(entering("x"))]
        handles.append(parts.attention.register_forward_pre_hook(entering("attention_in")))
        handles.append(parts.attention.register_forward_hook(keep("attention_out", True)))
        if parts.qkv is not None:
            handles.append(parts.qkv.register_forward_hook(keep("qkv_out", True)))
        handles.append(parts.proj.register_forward_hook(keep("proj_in")))
        handles.append(parts.fc1.register_forward_hook(keep("fc1_in")))
        handles.append(parts.fc2.register_forward_hook(keep("fc2_in")))
        handles.append(parts.mlp.register_forward_hook(keep("mlp_out", True)))
        return handles


@contextlib.contextmanager
def _recorded(blocks: list[tuple[nn.Module, BlockParts]], inputs: _Inputs) -> Iterator[None]:
    handles = [h for i, (block, parts) in enumerate(blocks) for h in inputs.watch(i, block, parts)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _qkv(parts: BlockParts, seen: dict[str, Tensor], heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """The block's queries, keys and values, ``(N, heads, T, d)`` each."""
    if parts.qkv is None:
        attention = parts.attention
        assert isinstance(attention, nn.MultiheadAttention)
        packed = F.linear(seen["attention_in"], attention.in_proj_weight, attention.in_proj_bias)
    else:
        packed = seen["qkv_out"]
    q, k, v = packed.chunk(3, dim=-1)
    return split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)


def _attention_relevance(
    parts: BlockParts,
    seen: dict[str, Tensor],
    probs: Tensor,
    relevance: Tensor,
) -> tuple[Tensor, Tensor]:
    """Relevance through one attention: ``(relevance of its input tokens, of its A)``."""
    heads = probs.shape[1]
    mixed = linear_relevance(seen["proj_in"], parts.proj.weight, relevance)
    q, k, v = _qkv(parts, seen, heads)
    r_probs, r_v = product_relevance(probs, v, split_heads(mixed, heads))
    r_q, r_k = product_relevance(q, k.transpose(-2, -1), r_probs)
    r_k = r_k.transpose(-2, -1)
    packed = torch.stack([r_q, r_k, r_v]).permute(1, 3, 0, 2, 4)  # (N, T, 3, heads, d)
    packed = packed.reshape(probs.shape[0], probs.shape[-1], -1)
    weight = parts.qkv.weight if parts.qkv is not None else parts.attention.in_proj_weight
    assert isinstance(weight, Tensor)
    return linear_relevance(seen["attention_in"], weight, packed), r_probs


def block_relevances(
    blocks: list[tuple[nn.Module, BlockParts]],
    inputs: _Inputs,
    found: AttentionPass,
    relevance: Tensor,
) -> list[Tensor]:
    """Each block's attention relevance ``(N, heads, T, T)``, from the relevance of the last
    block's output tokens down."""
    out: list[Tensor] = [torch.empty(0)] * len(blocks)
    for index in reversed(range(len(blocks))):
        parts = blocks[index][1]
        seen = {name: t.float() for name, t in inputs.seen[index].items()}
        mid = seen["x"] + seen["attention_out"]
        r_mid, r_mlp = add_relevance(mid, seen["mlp_out"], relevance)
        r_mlp = linear_relevance(seen["fc2_in"], parts.fc2.weight, r_mlp)
        r_mlp = linear_relevance(seen["fc1_in"], parts.fc1.weight, r_mlp)
        relevance = clone_relevance(mid, r_mid, r_mlp)
        r_x, r_attention = add_relevance(seen["x"], seen["attention_out"], relevance)
        probs = found.probabilities[index].detach().float()
        r_attention, out[index] = _attention_relevance(parts, seen, probs, r_attention)
        relevance = clone_relevance(seen["x"], r_x, r_attention)
    return out


def _blocks(model: nn.Module, names: list[str]) -> list[tuple[nn.Module, BlockParts]]:
    blocks = []
    for name in names:
        block = enclosing_module(model, name)
        parts = _parts(block)
        if parts is None:
            raise SaliencyConfigError(
                f"transformer_attribution reads plain ViT blocks (torchvision's EncoderBlock, "
                f"timm's Block without layer scale or q/k norm); {type(block).__name__} is "
                "not one. generic_attention (the same rollout, weighted by gradients alone) "
                "and legrad read any attention."
            )
        blocks.append((block, parts))
    return blocks


@dataclass(frozen=True)
class AttributionOptions(MethodOptions):
    """Options of ``transformer_attribution``.

    Attributes:
        start_layer: the first block rolled out (the authors' ``start_layer``).
    """

    start_layer: int = 0

    def check(self) -> None:
        if self.start_layer < 0:
            raise ValueError(f"start_layer must be >= 0, got {self.start_layer}")


def transformer_attribution(session: ExplainSession, options: AttributionOptions) -> Tensor:
    """Chefer et al.'s transformer attribution: relevance x gradient of each block's attention,
    positive part, mean over heads, rolled out with the residual, the class token's row."""
    names = [name for name, _ in check_transformer(session.model)]
    blocks = _blocks(session.model, names)
    if options.start_layer >= len(blocks):
        raise SaliencyConfigError(
            f"method_options['transformer_attribution']['start_layer']={options.start_layer}, "
            f"but the model has {len(blocks)} blocks."
        )
    head = _head(transformer_of(session.model))
    inputs, captured = _Inputs(), {}

    def head_input(_m: nn.Module, args: tuple[Any, ...]) -> None:
        captured["head_in"] = args[0].detach().float()

    handle = head.register_forward_pre_hook(head_input) if head is not None else None
    try:
        with _recorded(blocks, inputs):
            found = attention_pass(session.model, session.images.detach())
    finally:
        if handle is not None:
            handle.remove()
    if head is None:  # after the pass, whose errors say more about the model
        raise SaliencyConfigError(
            "transformer_attribution propagates relevance from a linear head on the class "
            "token; this model pools or has another head. generic_attention and legrad do not "
            "need one."
        )
    if found.names != names:
        raise SaliencyConfigError(
            "transformer_attribution needs the blocks called once each, in order."
        )
    score = session.explained_scores(found.output).sum()
    grads = torch.autograd.grad(score, found.probabilities, allow_unused=True)
    weights = session.target_weights(head.out_features, "transformer_attribution")
    relevance = linear_relevance(captured["head_in"], head.weight.float(), weights)
    last = inputs.seen[len(blocks) - 1]["x"]
    tokens = torch.zeros(last.shape, device=last.device, dtype=torch.float32)
    tokens[:, 0] = relevance  # the class token's pick passes relevance unchanged
    relevances = block_relevances(blocks, inputs, found, tokens)
    eye = torch.eye(tokens.shape[1], device=tokens.device)
    joint: Tensor | None = None
    for index in range(options.start_layer, len(blocks)):
        grad = grads[index]
        weighted = relevances[index] * (0.0 if grad is None else grad.float())
        cam = weighted.clamp(min=0).mean(1) + eye  # no row normalisation, as the authors'
        joint = cam if joint is None else cam @ joint
    assert joint is not None
    return upsample(found.read_row(joint), session.size)


register(
    SaliencyMethod(
        "transformer_attribution",
        transformer_attribution,
        "Chefer et al.'s transformer attribution (CVPR 2021): attention relevance (LRP) x "
        "gradient, rolled through the blocks (plain ViTs).",
        options=AttributionOptions,
        cost="moderate",
        passes="1F + 1B + LRP",
        needs_layer=False,
        needs_attention=True,
        location_alarms=False,
    )
)
