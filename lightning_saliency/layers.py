"""Target-layer resolution: dotted paths, modules, and auto-detection of the last spatial map."""

from __future__ import annotations

import difflib
import math
import weakref

import torch
from torch import Tensor, nn

from lightning_saliency.errors import SaliencyConfigError

LayerSpec = str | nn.Module | None

# Names of modules that turn an image into tokens: never a sensible CAM layer.
_PATCH_EMBED_HINTS = ("patch_embed", "conv_proj", "to_patch", "patchify", "stem.proj")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for a dotted path or a module of ``model``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> resolve_layer(net, "0")[0]
        '0'
    """
    names = {name: module for name, module in model.named_modules() if name}
    if isinstance(layer, nn.Module):
        for name, module in names.items():
            if module is layer:
                return name, module
        raise SaliencyConfigError(
            f"target_layer {type(layer).__name__} is not a submodule of the model; "
            "pass a module of this model or its dotted name (e.g. 'backbone.layer4')."
        )
    if not isinstance(layer, str):
        raise SaliencyConfigError(
            f"target_layer must be a dotted module path, an nn.Module or None, got {type(layer)!r}."
        )
    if layer in names:
        return layer, names[layer]
    close = difflib.get_close_matches(layer, list(names), n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise SaliencyConfigError(
        f"target_layer {layer!r} is not a module of {type(model).__name__}.{hint} "
        "List them with `[n for n, _ in model.named_modules()]`."
    )


def choose_layer(
    model: nn.Module, images: Tensor, layer: LayerSpec = None
) -> tuple[str, nn.Module]:
    """The target layer: ``layer`` resolved (a dotted path or a module), or auto-detected on
    ``images`` when it is ``None``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> choose_layer(net, x)[0], choose_layer(net, x, "0")[0]
        ('1', '0')
    """
    if layer is None:
        return find_target_layer(model, images)
    return resolve_layer(model, layer)


def token_grid(num_tokens: int) -> tuple[int, int] | None:
    """The ``(prefix_tokens, side)`` of a square token grid, allowing a class token or two.

    Example:
        >>> token_grid(197)
        (1, 14)
        >>> token_grid(50) is None
        False
        >>> token_grid(7) is None
        True
    """
    for prefix in (0, 1, 2):
        side = math.isqrt(num_tokens - prefix) if num_tokens > prefix else 0
        if side > 1 and side * side == num_tokens - prefix:
            return prefix, side
    return None


def to_spatial(output: Tensor) -> Tensor:
    """View a layer output as ``(N, C, h, w)``: maps pass through, ``(N, T, C)`` tokens are
    reshaped onto their square grid (class tokens dropped).

    Example:
        >>> to_spatial(torch.zeros(2, 1 + 16, 8)).shape
        torch.Size([2, 8, 4, 4])
    """
    if output.dim() == 4:
        return output
    if output.dim() == 3:
        grid = token_grid(output.shape[1])
        if grid is not None:
            prefix, side = grid
            tokens = output[:, prefix:, :]
            return tokens.transpose(1, 2).reshape(output.shape[0], output.shape[2], side, side)
    raise SaliencyConfigError(
        f"the target layer outputs shape {tuple(output.shape)}, which is not a spatial map "
        "(N, C, H, W) nor square tokens (N, T, C); choose a convolutional block with target_layer=."
    )


def _is_spatial(output: object) -> bool:
    return (
        isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1
    )


def _is_tokens(output: object) -> bool:
    return (
        isinstance(output, Tensor) and output.dim() == 3 and token_grid(output.shape[1]) is not None
    )


def probe_outputs(
    model: nn.Module, images: Tensor
) -> tuple[list[tuple[str, nn.Module, object]], object]:
    """Run one forward with hooks on every submodule and return, in completion order,
    ``(name, module, output)``. Hooks are removed before returning. The outputs stay in the
    autograd graph when ``images`` requires grad."""
    finished: list[tuple[str, nn.Module, object]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(
            module.register_forward_hook(
                lambda mod, _inp, out, _name=name: finished.append((_name, mod, out))
            )
        )
    try:
        output = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return finished, output


_DETECTED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def find_target_layer(model: nn.Module, images: Tensor) -> tuple[str, nn.Module]:
    """Auto-detect the layer for CAM methods: the last module whose output is still a
    spatial map (``h * w > 1``); for transformers the last square token sequence. Patch
    embeddings are never chosen.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                     nn.Flatten(), nn.Linear(8, 2))
        >>> find_target_layer(net, torch.zeros(1, 3, 16, 16))[0]
        '1'
    """
    shape = tuple(images.shape[1:])
    known = _DETECTED.get(model, {}).get(shape)
    modules = dict(model.named_modules())
    if known is not None and known in modules:  # the probe ran for this model and shape before
        return known, modules[known]
    name, module = _detect(model, images[:1])
    _DETECTED.setdefault(model, {})[shape] = name
    return name, module


def _detect(model: nn.Module, images: Tensor) -> tuple[str, nn.Module]:
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        finished, output = probe_outputs(model, x)
        tokens = [
            (n, m, out) for n, m, out in finished if isinstance(out, Tensor) and _is_tokens(out)
        ]
        if tokens:
            return _last_token_layer_with_gradient(output, tokens)
    spatial = [(n, m) for n, m, out in finished if _is_spatial(out)]
    spatial = [(n, m) for n, m in spatial if not any(h in n for h in _PATCH_EMBED_HINTS)]
    if not spatial:
        raise SaliencyConfigError(
            f"{type(model).__name__} has no layer with a spatial output (N, C, H, W) for an input "
            f"of shape {tuple(images.shape)}; CAM methods need one. Pass target_layer='...' or use "
            "methods that need no layer (see available_methods())."
        )
    return spatial[-1]


def _last_token_layer_with_gradient(
    logits: object, tokens: list[tuple[str, nn.Module, Tensor]]
) -> tuple[str, nn.Module]:
    """A transformer: its spatial maps are the patch embedding. After the last attention only
    the class token reaches the head, so later token outputs get no gradient on the patch
    tokens. Pick the last token output whose patch tokens do get one (for pre-norm ViTs the
    last block's first norm, as pytorch-grad-cam recommends)."""
    tracked = [t for t in tokens if t[2].requires_grad]
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not tracked:
        return tokens[-1][0], tokens[-1][1]
    outputs = [out for _, _, out in tracked]
    grads = torch.autograd.grad(logits.max(dim=1).values.sum(), outputs, allow_unused=True)
    with_grad = [
        (n, m)
        for (n, m, _), g in zip(tracked, grads)
        if g is not None and bool(to_spatial(g).abs().sum() > 0)
    ]
    name, module = (with_grad or [(tokens[-1][0], tokens[-1][1])])[-1]
    return name, module


def find_classifier_head(model: nn.Module, channels: int) -> nn.Module | None:
    """The last ``nn.Linear`` taking ``channels`` features: DFF sends its concepts through it.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> find_classifier_head(net, 8)
        Linear(in_features=8, out_features=2, bias=True)
    """
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == channels:
            head = module
    return head
