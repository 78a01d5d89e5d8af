"""A vision transformer's attention, read during one explanation and put back as it was.

The attention methods need each block's post-softmax attention probabilities ``(N, heads, T, T)``
*as the tensor the forward goes on with*, so that the explained score has a gradient with
respect to them. No implementation hands that over by itself:

- torchvision's ViT calls ``nn.MultiheadAttention`` with ``need_weights=False``. A pre-hook asks
  for per-head weights, and a forward hook replays ``out_proj(weights @ v)`` from them (as
  torchcam's LeGrad does); the replayed output must equal the module's own, else it is an error.
- timm's ``Attention`` runs fused scaled-dot-product attention, which never forms the weights.
  Its ``fused_attn`` switch is turned off for the pass, so timm's own explicit path computes them,
  and a hook on ``attn_drop`` (which receives them) keeps them. The switch is restored after.
- A user's own attention module: :func:`register_attention` names the submodule its forward
  calls on the probabilities (and any switch to set while explaining).

Nothing is patched: hooks and switches live only inside :func:`attention_pass`, also on error.

The rules (the methods and ``docs/models.md`` state them):

- The blocks are the recognised attention modules, in the order the forward calls them. Every one
  must attend over the same ``T`` tokens of each image: ``T`` = prefix tokens (class,
  distillation, registers; read as the layout code reads them) + an image-shaped grid.
- Windowed attention (Swin, MaxViT's grid attention) and patch merging change which tokens
  exist between blocks: a token of one block is no token of the next, so attention cannot be
  multiplied through. There is no sound definition there, and it is an error at setup that
  names Grad-CAM on the last stage. So is attention over unfolded patches (MobileViT), whose
  batch is not the images', and any module named like an attention that no rule reads.
- The readout: a model that classifies from its class token reads that token's row; a pooled
  model (``global_pool="avg"``, register models without a class token) the mean of the grid's
  rows.

Examples:
    >>> from torchvision.models import VisionTransformer
    >>> vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)
    >>> found = attention_pass(vit.eval(), torch.rand(2, 3, 32, 32))
    >>> len(found.probabilities), tuple(found.probabilities[0].shape), found.reading.grid
    (2, (2, 2, 17, 17), (4, 4))
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.engine.layers import LayerLayout, prefix_tokens_of, read_layout
from lightning_saliency.errors import SaliencyConfigError

Readout = Literal["class_token", "mean"]


@dataclass(frozen=True)
class AttentionAdapter:
    """How to read one attention implementation.

    Attributes:
        probabilities: the submodule the attention's forward calls on its post-softmax
            probabilities ``(N, heads, T, T)`` (timm: ``"attn_drop"``); its output is kept.
        switches: attributes set while explaining and restored after (timm:
            ``{"fused_attn": False}``, so that the weights are formed at all).
    """

    probabilities: str
    switches: Mapping[str, Any] = field(default_factory=dict)


ADAPTERS: dict[str, AttentionAdapter] = {
    "timm.layers.attention.Attention": AttentionAdapter("attn_drop", {"fused_attn": False}),
}
"""Attention implementations by qualified class name (``module.Class``)."""


def register_attention(
    implementation: type[nn.Module] | str,
    probabilities: str,
    switches: Mapping[str, Any] | None = None,
) -> None:
    """Teach the attention methods a user's own attention module.

    Args:
        implementation: the attention module's class (or its ``"module.Class"`` name).
        probabilities: the name of the submodule its forward calls on the post-softmax
            attention probabilities ``(N, heads, T, T)``, e.g. an ``nn.Dropout`` or an
            ``nn.Identity()`` placed there for the purpose.
        switches: attributes to set while explaining (restored after), e.g. to turn off a
            fused kernel that never forms the probabilities.

    Examples:
        >>> class MyAttention(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.probs = nn.Identity()
        >>> register_attention(MyAttention, "probs")
        >>> ADAPTERS[f"{MyAttention.__module__}.MyAttention"].probabilities
        'probs'
    """
    if not isinstance(probabilities, str) or not probabilities:
        raise SaliencyConfigError(
            f"probabilities must name the submodule fed the attention probabilities, got "
            f"{probabilities!r}."
        )
    name = implementation if isinstance(implementation, str) else qualified_name(implementation)
    ADAPTERS[name] = AttentionAdapter(probabilities, dict(switches or {}))


def qualified_name(cls: type) -> str:
    """``module.Class``: how adapters and token heads name an implementation.

    Examples:
        >>> qualified_name(nn.MultiheadAttention)
        'torch.nn.modules.activation.MultiheadAttention'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


KNOWN_TRANSFORMERS = frozenset(
    {
        "torchvision.models.vision_transformer.VisionTransformer",
        "timm.models.vision_transformer.VisionTransformer",
    }
)
"""Transformers whose token reading (prefix, readout) and head are known."""


def adapter_of(module: nn.Module) -> AttentionAdapter | None:
    """The adapter that reads ``module``: its class's, or the nearest base class's."""
    for cls in type(module).__mro__:
        found = ADAPTERS.get(qualified_name(cls))
        if found is not None:
            return found
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether a rule reads ``module``'s attention: ``nn.MultiheadAttention`` or a registered
    implementation."""
    return isinstance(module, nn.MultiheadAttention) or adapter_of(module) is not None


@dataclass
class AttentionPass:
    """What one forward with the attention read gives.

    Attributes:
        probabilities: per block, ``(N, heads, T, T)`` in the autograd graph of ``output``.
        blocks: per block, the tokens ``(N, T, C)`` its enclosing block outputs.
        output: the model's output.
        reading: the token grid and the prefix tokens.
        readout: ``"class_token"`` or ``"mean"`` (a pooled model: the mean of the grid's rows).
        names: the attention modules' names, in call order.
    """

    probabilities: list[Tensor]
    blocks: list[Tensor]
    output: Any
    reading: LayerLayout
    readout: Readout
    names: list[str]

    def read_row(self, relevance: Tensor) -> Tensor:
        """The readout row of a ``(N, T, T)`` token-to-token relevance, over the grid's
        tokens, as ``(N, h, w)``."""
        prefix, (h, w) = self.reading.prefix, self.reading.grid
        grid = relevance[:, :, prefix:]
        row = grid[:, 0] if self.readout == "class_token" else grid[:, prefix:].mean(1)
        return row.reshape(relevance.shape[0], h, w)

    def grid_of_keys(self, keys: Tensor) -> Tensor:
        """A per-key value ``(N, T)`` over the grid's tokens, as ``(N, h, w)``."""
        prefix, (h, w) = self.reading.prefix, self.reading.grid
        return keys[:, prefix:].reshape(keys.shape[0], h, w)


_HEAD_POOLS = ("attn_pool", "head")  # an attention that pools for the head is no block
_WINDOWED = ("window", "partition")  # Swin's windows, MaxViT's window and grid partitions


def _unreadable(model: nn.Module, readable: list[str]) -> list[tuple[str, nn.Module]]:
    """Modules named like an attention that no rule reads, outside the ``readable`` ones."""
    found = []
    for name, module in model.named_modules():
        if not name or "attention" not in type(module).__name__.lower() or is_attention(module):
            continue
        inside = any(name.startswith(r + ".") or r.startswith(name + ".") for r in readable)
        pooling = name.split(".")[0] in _HEAD_POOLS or name.endswith(_HEAD_POOLS)
        if not inside and not pooling:
            found.append((name, module))
    return found


def check_transformer(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules a rule reads, by name, or the setup error that says why the
    model has none that can be multiplied through.

    Examples:
        >>> check_transformer(nn.Sequential(nn.Conv2d(3, 4, 3)))
        Traceback (most recent call last):
        ...
        lightning_saliency.errors.SaliencyConfigError: Sequential has no attention ...
    """
    readable = [(n, m) for n, m in model.named_modules() if n and is_attention(m)]
    unread = _unreadable(model, [name for name, _ in readable])
    windowed = [n for n, m in unread if any(w in type(m).__name__.lower() for w in _WINDOWED)]
    kind = type(model).__name__
    if windowed:
        raise SaliencyConfigError(
            f"{kind} attends within windows ({windowed[0]}: "
            f"{type(dict(unread)[windowed[0]]).__name__}) and merges patches between stages: a "
            "token of one block is no token of the next, so attention cannot be multiplied "
            "through to the image and the attention methods have no sound definition here. Use "
            "a CAM method (Grad-CAM's family) on the last stage, e.g. "
            "target_layer='norm' or the last block's norm1 with layout='nhwc'."
        )
    if unread:
        name, module = unread[0]
        raise SaliencyConfigError(
            f"{kind}'s {name} ({qualified_name(type(module))}) looks like an attention module that "
            "no rule reads: the attention methods read nn.MultiheadAttention and timm's "
            "Attention. Teach them yours with lightning_saliency.register_attention("
            f"{type(module).__name__}, probabilities='<the submodule fed the post-softmax "
            "probabilities>'), or use a CAM method on a block's tokens."
        )
    if not readable:
        raise SaliencyConfigError(
            f"{kind} has no attention module (nn.MultiheadAttention, timm's Attention, or one "
            "registered with lightning_saliency.register_attention); the attention methods "
            "explain vision transformers. Choose methods that need no attention (a CAM method, "
            "or the input-gradient family)."
        )
    return readable


@contextlib.contextmanager
def _switched(module: nn.Module, switches: Mapping[str, Any]) -> Iterator[None]:
    """Set attributes for the pass; put each back exactly (or remove it) after."""
    missing = object()
    saved = {key: module.__dict__.get(key, missing) for key in switches}
    try:
        for key, value in switches.items():
            setattr(module, key, value)
        yield
    finally:
        for key, value in saved.items():
            if value is missing:
                delattr(module, key)
            else:
                setattr(module, key, value)


def _tracked(probs: Tensor) -> Tensor:
    """The probabilities as a tensor the score has a gradient for (the graph may start here:
    the parameters are frozen and the input needs no gradient)."""
    return probs if probs.requires_grad else probs.detach().requires_grad_()


class _Recorder:
    """Hooks that keep each block's probabilities and tokens, in call order; ``constant``: the
    forward goes on with the probabilities detached (no gradient flows through the softmax)."""

    def __init__(self, constant: bool = False) -> None:
        self.constant = constant
        self.probabilities: list[Tensor] = []
        self.names: list[str] = []
        self.blocks: dict[int, Tensor] = {}
        self.handles: list[Any] = []

    def keep(self, name: str, probs: Any) -> Tensor:
        if not isinstance(probs, Tensor) or probs.dim() != 4:
            shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
            raise SaliencyConfigError(
                f"the attention of {name} gave probabilities of shape {shape}, not (N, heads, "
                "T, T); check the submodule given to register_attention."
            )
        kept = probs.detach() if self.constant else _tracked(probs)
        self.probabilities.append(kept)
        self.names.append(name)
        return kept

    def watch_multihead(self, name: str, module: nn.MultiheadAttention) -> None:
        asked: dict[str, tuple[bool, bool]] = {}

        def before(
            _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            _check_multihead(name, module, args, kwargs)
            asked["options"] = (
                bool(kwargs.get("need_weights", True)),
                bool(kwargs.get("average_attn_weights", True)),
            )
            return args[:3], {**kwargs, "need_weights": True, "average_attn_weights": False}

        def after(
            _m: nn.Module, args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any
        ) -> tuple[Tensor, Tensor | None]:
            probs = self.keep(name, output[1])
            replayed = _replay(module, probs, args[2])
            if not torch.allclose(replayed, output[0], rtol=1e-3, atol=1e-5):
                raise SaliencyConfigError(
                    f"the attention of {name} could not be replayed from its weights (a mask, "
                    "added key/value biases or another variant); the attention methods cannot "
                    "read it. Use a CAM method on a block's tokens."
                )
            requested, averaged = asked["options"]
            weights = (probs.mean(1) if averaged else probs) if requested else None
            return replayed, weights

        self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(module.register_forward_hook(after, with_kwargs=True))

    def watch_adapter(self, name: str, module: nn.Module, adapter: AttentionAdapter) -> None:
        inner = dict(module.named_modules()).get(adapter.probabilities)
        if inner is None:
            raise SaliencyConfigError(
                f"{name} ({type(module).__name__}) has no submodule "
                f"{adapter.probabilities!r}, which its attention adapter names."
            )

        def after(_m: nn.Module, _inp: Any, out: Any) -> Tensor:
            return self.keep(name, out)

        self.handles.append(inner.register_forward_hook(after))

    def watch_block(self, index: int, block: nn.Module) -> None:
        def after(_m: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                self.blocks[index] = out

        self.handles.append(block.register_forward_hook(after))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _check_multihead(
    name: str, module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    query = args[0] if args else None
    plain = (
        module.batch_first
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
    )
    masked = kwargs.get("attn_mask") is not None or kwargs.get("key_padding_mask") is not None
    if len(args) != 3 or not plain or masked or not (args[0] is args[1] is args[2]):
        raise SaliencyConfigError(
            f"{name}: the attention methods read batch-first self-attention with packed "
            "projections, called as attn(x, x, x) without masks (torchvision's ViT); this "
            f"call {'has a mask' if masked else 'is another variant'}. Use a CAM method on a "
            "block's tokens."
        )
    if not isinstance(query, Tensor) or query.dim() != 3:
        raise SaliencyConfigError(f"{name}: attention inputs must be (N, T, C) tokens.")


def split_heads(tokens: Tensor, heads: int) -> Tensor:
    """``(N, T, heads * d)`` -> ``(N, heads, T, d)``, as attention splits its projections.

    Examples:
        >>> split_heads(torch.zeros(2, 5, 8), 2).shape
        torch.Size([2, 2, 5, 4])
    """
    n, count, width = tokens.shape
    return tokens.reshape(n, count, heads, width // heads).transpose(1, 2)


def _replay(module: nn.MultiheadAttention, probs: Tensor, value: Tensor) -> Tensor:
    """``out_proj(probs @ v)``: the attention's output from the kept probabilities."""
    batch, _, dim = value.shape
    bias = module.in_proj_bias
    v = F.linear(value, module.in_proj_weight[2 * dim :], None if bias is None else bias[2 * dim :])
    v = split_heads(v, module.num_heads)
    mixed = (probs @ v).transpose(1, 2).reshape(batch, probs.shape[-2], dim)
    out: Tensor = module.out_proj(mixed)
    return out


def enclosing_module(model: nn.Module, name: str) -> nn.Module:
    """The module that holds submodule ``name`` of ``model`` (an attention's block).

    Examples:
        >>> net = nn.Sequential(nn.Sequential(nn.ReLU()))
        >>> enclosing_module(net, "0.0") is net[0]
        True
    """
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


def readout_of(model: nn.Module, prefix: int) -> Readout:
    """``"class_token"`` for a model that classifies from its class token (torchvision's ViT,
    timm's ``global_pool="token"``), ``"mean"`` for a pooled one."""
    pool = getattr(model, "global_pool", "token")
    if prefix == 0 or (isinstance(pool, str) and pool not in ("token", "")):
        return "mean"
    return "class_token"


def transformer_of(model: nn.Module) -> nn.Module:
    """The module that says how the tokens are read: ``model`` itself or the outermost module
    in it (a ViT inside a ``LightningModule``) that is a known transformer or declares prefix
    tokens (timm's ``num_prefix_tokens``, torchvision's ``class_token``)."""
    for module in model.modules():
        known = any(qualified_name(cls) in KNOWN_TRANSFORMERS for cls in type(module).__mro__)
        declares = prefix_tokens_of(module) is not None or isinstance(
            getattr(module, "class_token", None), Tensor
        )
        if known or declares:
            return module
    return model


def _prefix(model: nn.Module) -> int | None:
    declared = prefix_tokens_of(model)
    if declared is not None:
        return declared
    return 1 if isinstance(getattr(model, "class_token", None), Tensor) else None


def attention_pass(
    model: nn.Module, images: Tensor, constant_attention: bool = False
) -> AttentionPass:
    """One forward of ``images`` that keeps every block's attention probabilities and tokens.

    Call it inside the explanation's safety context (eval mode, frozen parameters, gradients
    on); the hooks and switches are gone when it returns, also after an error. With
    ``constant_attention`` the forward goes on with the probabilities detached: the same
    values, and gradients that treat each block's attention as fixed weights.
    """
    attention = check_transformer(model)
    recorder = _Recorder(constant_attention)
    with contextlib.ExitStack() as stack:
        stack.callback(recorder.remove)
        for index, (name, module) in enumerate(attention):
            adapter = adapter_of(module)
            if isinstance(module, nn.MultiheadAttention):
                recorder.watch_multihead(name, module)
            elif adapter is not None:
                stack.enter_context(_switched(module, adapter.switches))
                recorder.watch_adapter(name, module, adapter)
            recorder.watch_block(index, enclosing_module(model, name))
        output = model(images)
    order = {name: i for i, (name, _) in enumerate(attention)}
    return _checked(model, images, recorder, output, order)


def _checked(
    model: nn.Module,
    images: Tensor,
    recorder: _Recorder,
    output: Any,
    order: Mapping[str, int],
) -> AttentionPass:
    kind = type(model).__name__
    if not recorder.probabilities:
        raise SaliencyConfigError(f"{kind}'s forward called none of its attention modules.")
    batch, size = images.shape[0], (images.shape[-2], images.shape[-1])
    first = recorder.probabilities[0]
    for name, probs in zip(recorder.names, recorder.probabilities):
        if probs.shape[0] != batch or probs.shape[-1] != probs.shape[-2]:
            raise SaliencyConfigError(
                f"{kind}'s {name} attends over {tuple(probs.shape)} for {batch} images: its "
                "batch is not the images' (attention within unfolded patches or windows, as "
                "MobileViT's), so it cannot be multiplied through to the image. Use a CAM method "
                "on a layer."
            )
        if probs.shape[-1] != first.shape[-1]:
            raise SaliencyConfigError(
                f"{kind}'s blocks attend over {first.shape[-1]} and then {probs.shape[-1]} "
                "tokens (patch merging or token pooling): a token of one block is no token of "
                "the next, so attention cannot be multiplied through. Use a CAM method on the last "
                "stage."
            )
    transformer = transformer_of(model)
    reading = read_layout(first[:, 0], batch, size, "tokens", None, _prefix(transformer))
    blocks = [recorder.blocks.get(order[name]) for name in recorder.names]
    return AttentionPass(
        recorder.probabilities,
        [b for b in blocks if b is not None],
        output,
        reading,
        readout_of(transformer, reading.prefix),
        recorder.names,
    )
