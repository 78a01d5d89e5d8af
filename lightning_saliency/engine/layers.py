"""Target-layer resolution: dotted paths, modules, and auto-detection of the last spatial map."""

from __future__ import annotations

import difflib
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_saliency.errors import SaliencyConfigError

LayerSpec = str | nn.Module | None

# Names of modules that turn an image into tokens: never a sensible CAM layer.
_PATCH_EMBED_HINTS = ("patch_embed", "conv_proj", "to_patch", "patchify", "stem.proj")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for a dotted path or a module of ``model``.

    Examples:
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
    model: nn.Module,
    images: Tensor,
    layer: LayerSpec = None,
    scores: Callable[[Any], Tensor] | None = None,
) -> tuple[str, nn.Module]:
    """The target layer: ``layer`` resolved (a dotted path or a module), or auto-detected on
    ``images`` when it is ``None`` (``scores`` turns the model's output into class scores).

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> choose_layer(net, x)[0], choose_layer(net, x, "0")[0]
        ('1', '0')
    """
    if layer is None:
        return find_target_layer(model, images, scores)
    return resolve_layer(model, layer)


Layout = Literal["auto", "nchw", "nhwc", "tokens"]
LAYOUTS: tuple[str, ...] = ("auto", "nchw", "nhwc", "tokens")
Reshape = Callable[[Tensor], Tensor]

# Modules whose output is channels-first by construction, and pooling that belongs to the head.
_CHANNELS_FIRST = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.GroupNorm)
_HEAD_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_HEAD_NAMES = ("classifier", "head", "heads", "fc", "last_linear")
_MAX_PREFIX_TOKENS = 8


@dataclass(frozen=True)
class LayerLayout:
    """How to read a layer's output as ``(N, C, h, w)``.

    Attributes:
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (``(N, T, C)``).
        grid: the spatial ``(h, w)``.
        prefix: tokens before the grid (class, distillation, register tokens).
    """

    layout: str
    grid: tuple[int, int]
    prefix: int = 0

    def to_spatial(self, output: Tensor) -> Tensor:
        """``output`` as ``(N, C, h, w)``.

        Examples:
            >>> LayerLayout("tokens", (4, 4), prefix=1).to_spatial(torch.zeros(2, 17, 8)).shape
            torch.Size([2, 8, 4, 4])
        """
        h, w = self.grid
        if self.layout == "nchw":
            return output
        if self.layout == "nhwc":
            return output.permute(0, 3, 1, 2)
        tokens = output[:, self.prefix :, :]
        return tokens.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w)


def _fits(h: int, w: int, image: tuple[int, int]) -> bool:
    """Whether an ``h x w`` grid can be a downsampled ``image``: no larger, and the same
    aspect within one cell of rounding."""
    height, width = image
    if h < 1 or w < 1 or h > height or w > width:
        return False
    return abs(h * width - w * height) <= max(width, height)


def _token_grids(tokens: int, image: tuple[int, int], prefix: int | None) -> list[LayerLayout]:
    """Every ``(prefix, grid)`` that reads ``tokens`` as prefix tokens plus an image-shaped
    grid (at least 2x2) whose stride divides the image, fewest prefix tokens first (a model
    that declares them, as timm's ``num_prefix_tokens``, is read with its own)."""
    height, width = image
    found = []
    for p in [prefix] if prefix is not None else range(_MAX_PREFIX_TOKENS + 1):
        cells = tokens - p
        if cells < 1:
            continue
        h = round(math.sqrt(cells * height / width))
        for hh in {h - 1, h, h + 1}:
            if hh >= 1 and cells % hh == 0:
                ww = cells // hh
                fits = _fits(hh, ww, image) and hh > 1 and ww > 1
                if fits and height % hh == 0 and width % ww == 0:
                    found.append(LayerLayout("tokens", (hh, ww), p))
    return found


def read_layout(
    output: object,
    batch: int,
    image: tuple[int, int],
    layout: str = "auto",
    module: nn.Module | None = None,
    prefix_tokens: int | None = None,
) -> LayerLayout:
    """How to read a layer output as a map of an ``image``-sized input, or an error that names
    the fix. ``auto`` decides from the shape where it leaves no doubt (dim 0 is the batch, the
    grid has the image's aspect and divides it), with the module's type as a tie-breaker;
    otherwise ``layout=`` (or ``reshape=``) must say it.

    Examples:
        >>> read_layout(torch.zeros(2, 96, 8, 8), 2, (64, 64)).layout
        'nchw'
        >>> read_layout(torch.zeros(2, 8, 8, 96), 2, (64, 64)).layout
        'nhwc'
        >>> read_layout(torch.zeros(2, 4 + 16, 32), 2, (64, 64))
        LayerLayout(layout='tokens', grid=(4, 4), prefix=4)
    """
    if layout not in LAYOUTS:
        raise SaliencyConfigError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}.")
    if not isinstance(output, Tensor):
        raise SaliencyConfigError(
            f"the target layer returns a {type(output).__name__}, not a tensor; choose a layer "
            "that returns one, or pass reshape= a function from its output to (N, C, h, w)."
        )
    shape = tuple(output.shape)
    if output.dim() not in (3, 4) or shape[0] != batch:
        why = "dim 0 is not the batch" if output.dim() in (3, 4) else "it is not 3-d or 4-d"
        raise SaliencyConfigError(
            f"the target layer outputs shape {shape} for {batch} images ({why}), which is no map "
            "of the image; choose another target_layer, or pass reshape= a function from its "
            "output to (N, C, h, w)."
        )
    options: list[LayerLayout] = []
    if output.dim() == 4:
        _, a, b, c = shape
        if layout in ("auto", "nchw") and (layout == "nchw" or _fits(b, c, image)):
            options.append(LayerLayout("nchw", (b, c)))
        if layout in ("auto", "nhwc") and (layout == "nhwc" or _fits(a, b, image)):
            options.append(LayerLayout("nhwc", (a, b)))
        if len(options) == 2:  # the shape fits both: the module that made it decides
            options = options[1:] if _channels_last(module, c) else options[:1]
    elif layout in ("auto", "tokens"):
        options = _token_grids(shape[1], image, prefix_tokens)[:1]
    if len(options) == 1:
        return options[0]
    if not options:
        raise SaliencyConfigError(
            f"the target layer's output {shape} cannot be read as a "
            f"{layout if layout != 'auto' else 'map'} of a {image[0]}x{image[1]} image; choose "
            "another target_layer, or pass layout= ('nchw', 'nhwc', 'tokens') or reshape= a "
            "function from its output to (N, C, h, w)."
        )
    readings = ", ".join(
        f"{o.layout} {o.grid[0]}x{o.grid[1]}" + (f" after {o.prefix} tokens" if o.prefix else "")
        for o in options
    )
    raise SaliencyConfigError(
        f"the target layer's output {shape} reads as more than one map ({readings}); say which "
        "with layout= ('nchw', 'nhwc' or 'tokens') or reshape= a function to (N, C, h, w)."
    )


def _channels_last(module: nn.Module | None, channels: int) -> bool:
    """Whether ``module`` (or the last layer inside it that says) ends channels-last: a
    ``LayerNorm`` over the last dim or a ``Linear``. Convolutions, batch norms and anything
    unknown say channels-first, PyTorch's own layout."""
    if module is None:
        return False
    for inner in reversed(list(module.modules())):
        if isinstance(inner, _CHANNELS_FIRST):
            return False
        if isinstance(inner, nn.LayerNorm):
            return tuple(inner.normalized_shape) == (channels,)
        if isinstance(inner, nn.Linear):
            return inner.out_features == channels
    return False


def prefix_tokens_of(model: nn.Module) -> int | None:
    """Prefix tokens a model declares (timm's ``num_prefix_tokens``), if any."""
    value = getattr(model, "num_prefix_tokens", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def probe_outputs(
    model: nn.Module, images: Tensor
) -> tuple[list[tuple[str, nn.Module, object]], object, dict[int, int]]:
    """Run one forward with hooks on every submodule. Returns, in completion order,
    ``(name, module, output)``; the model's output; and, for each tensor a module received as
    input, the latest completion index before that module started (to tell the main path, which
    later modules consume, from residual branches, which only an addition does). Hooks are
    removed before returning; outputs stay in the autograd graph when ``images`` requires
    grad."""
    finished: list[tuple[str, nn.Module, object]] = []
    consumed: dict[int, int] = {}
    inputs: list[object] = []  # held, so that tensor ids stay unique during the probe
    handles = []

    def before(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        for arg in args:
            if isinstance(arg, Tensor):
                inputs.append(arg)
                consumed[id(arg)] = len(finished)

    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(module.register_forward_pre_hook(before))
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
    return finished, output, consumed


_DETECTED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], str]] = (
    weakref.WeakKeyDictionary()
)


def find_target_layer(
    model: nn.Module, images: Tensor, scores: Callable[[Any], Tensor] | None = None
) -> tuple[str, nn.Module]:
    """Auto-detect the layer for CAM methods: the main path of the last stage. Candidates are
    outputs that read as a map of the image (dim 0 the batch; ``nchw``, ``nhwc`` or tokens with
    any prefix), larger than one cell; never a patch embedding, a head's pooling, or a residual
    branch (a tensor no later module consumes, unless it is the last map before the head); and
    the class score must reach its grid cells through autograd (after a ViT's last attention
    only the class token does).

    Examples:
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
    name, module = _detect(model, images[:2], scores)
    _DETECTED.setdefault(model, {})[shape] = name
    return name, module


def _candidate(
    name: str,
    module: nn.Module,
    out: object,
    batch: int,
    image: tuple[int, int],
    prefix: int | None,
) -> LayerLayout | None:
    if any(h in name for h in _PATCH_EMBED_HINTS) or isinstance(module, _HEAD_POOLS):
        return None
    if name.split(".")[0] in _HEAD_NAMES:
        return None
    try:
        reading = read_layout(out, batch, image, "auto", module, prefix)
    except SaliencyConfigError:
        return None
    return reading if reading.grid[0] * reading.grid[1] > 1 else None


def _detect(
    model: nn.Module, images: Tensor, scores: Callable[[Any], Tensor] | None
) -> tuple[str, nn.Module]:
    image = (images.shape[-2], images.shape[-1])
    prefix = prefix_tokens_of(model)
    with torch.enable_grad():
        x = images.detach().clone().requires_grad_(True)
        finished, output, consumed = probe_outputs(model, x)
        found = []
        for index, (name, module, out) in enumerate(finished):
            reading = _candidate(name, module, out, images.shape[0], image, prefix)
            if reading is not None and isinstance(out, Tensor):
                found.append((index, name, module, out, reading))
        if not found:
            raise SaliencyConfigError(
                f"{type(model).__name__} has no layer whose output reads as a map of an input of "
                f"shape {tuple(images.shape)}; CAM methods need one. Pass target_layer='...' "
                "(with layout= or reshape= if needed) or use methods that need no layer (see "
                "available_methods())."
            )
        last_index = found[-1][0]
        main = [f for f in found if consumed.get(id(f[3]), -1) > f[0] or f[0] == last_index]
        try:
            logits = scores(output) if scores is not None else output
        except SaliencyConfigError:
            logits = None
        scored = _with_gradient(logits, main) or main
    _, name, module, _, _ = scored[-1]
    return name, module


def _with_gradient(logits: object, found: list[Any]) -> list[Any]:
    """The candidates whose grid cells the top class score reaches through autograd."""
    tracked = [f for f in found if f[3].requires_grad]
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not tracked:
        return []
    grads = torch.autograd.grad(
        logits.max(dim=1).values.sum(), [f[3] for f in tracked], allow_unused=True
    )
    return [
        f
        for f, g in zip(tracked, grads)
        if g is not None and bool(f[4].to_spatial(g).abs().sum() > 0)
    ]


def find_classifier_head(model: nn.Module, channels: int) -> nn.Module | None:
    """The last ``nn.Linear`` taking ``channels`` features: DFF sends its concepts through it.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))
        >>> find_classifier_head(net, 8)
        Linear(in_features=8, out_features=2, bias=True)
    """
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.in_features == channels:
            head = module
    return head
