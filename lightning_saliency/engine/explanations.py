"""``explain()``: every method inside one safety context, sharing work, on the images' device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_saliency.engine.layers import LayerSpec, Layout, Reshape, choose_layer
from lightning_saliency.engine.methods import (
    DEFAULT_METHODS,
    METHODS,
    ExplainSession,
    as_logits,
    canonical_name,
)
from lightning_saliency.engine.methods.session import OutputTransform, TargetFunction
from lightning_saliency.engine.module_state import buffers_kept
from lightning_saliency.engine.options import MethodOptionsArg, resolve_options
from lightning_saliency.engine.sharded import reshard
from lightning_saliency.errors import SaliencyConfigError


@dataclass(frozen=True)
class Explanations(Mapping[str, Tensor]):
    """Method name -> maps, plus what the pass learnt on the way. Read it like a dict
    (``out["gradcam"]``, ``out.items()``, ``"dff" in out``).

    Attributes:
        maps: method -> ``(N, H, W)`` float32 maps (``(N, K, H, W)`` for concept methods), on
            the images' device, at input resolution.
        logits: ``(N, num_classes)`` float32 scores of the images.
        targets: ``(N,)`` the class each map explains.
        layer_name: the target layer used by layer methods (``None`` if none was needed).
        layer_cells: the target layer's spatial grid ``(h, w)``, the resolution of a layer
            method's map (``None`` if no method read the layer).
        extras: what methods report besides maps, e.g. ``dff_concept_scores``
            ``(K, num_classes)``, ``ig_steps``, ``ig_completeness_error`` ``(N,)``, and with a
            target function ``target_scores`` ``(N,)`` (its value per image); each method
            lists its keys in ``METHODS[name].extras``.
        errors: method -> exception, only with ``on_error="collect"``.
    """

    maps: dict[str, Tensor]
    logits: Tensor
    targets: Tensor
    layer_name: str | None = None
    layer_cells: tuple[int, int] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def __getitem__(self, method: str) -> Tensor:
        return self.maps[method]

    def __iter__(self) -> Iterator[str]:
        return iter(self.maps)

    def __len__(self) -> int:
        return len(self.maps)


def normalize_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """Canonical, de-duplicated method names; raises listing the known ones.

    Examples:
        >>> normalize_methods("gradcam,ig")
        ('gradcam', 'integrated_gradients')
    """
    if isinstance(methods, str):
        methods = [m for m in methods.split(",") if m.strip()]
    elif not isinstance(methods, Sequence):
        raise SaliencyConfigError(
            f"methods must be a list of names (or 'a,b'), got {type(methods).__name__}."
        )
    names = tuple(dict.fromkeys(canonical_name(m) for m in methods))
    if not names:
        raise SaliencyConfigError(
            f"methods is empty; pass at least one, e.g. {DEFAULT_METHODS[:1]!r}."
        )
    return names


@contextlib.contextmanager
def explanation_context(model: nn.Module) -> Iterator[None]:
    """Make a model safe to explain, and put everything back afterwards.

    Inside: eval mode, parameters frozen (no weight gradients, ``.grad`` untouched), gradients
    enabled even under ``no_grad``/``inference_mode``, autocast off (maps in float32), and the
    global RNG isolated. On exit, also after an error: train/eval flags, ``requires_grad``,
    every buffer (running statistics, quantization observers, the model's own;
    :func:`~lightning_saliency.engine.module_state.buffers_kept`) and RNG states are exactly as
    found.

    Examples:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with torch.no_grad(), explanation_context(net):
        ...     print(net.training, torch.is_grad_enabled(), net[0].weight.requires_grad)
        False True False
        >>> net.training, net[0].weight.requires_grad
        (True, True)
    """
    training = [(module, module.training) for module in model.modules()]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    include_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    with contextlib.ExitStack() as stack:
        stack.enter_context(isolate_rng(include_cuda=include_cuda))
        stack.enter_context(buffers_kept(model))
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        with contextlib.suppress(RuntimeError):  # device types without autocast
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        try:
            model.eval()
            for param, _ in frozen:
                param.requires_grad_(False)
            yield
        finally:
            reshard(model)  # FSDP2: the next training forward gathers the current shards
            for module, flag in training:
                module.training = flag
            for param, flag in frozen:
                param.requires_grad_(flag)


def eager_module(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (hooks belong on it, and it is explained eagerly),
    or ``model`` itself.

    Examples:
        >>> net = nn.Linear(2, 2)
        >>> eager_module(torch.compile(net, backend="eager")) is net
        True
    """
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
        return inner
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (float32 if it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def explain(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | Sequence[int] | int | TargetFunction | None = None,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    target_layer: LayerSpec = None,
    on_error: Literal["raise", "collect"] = "raise",
    *,
    method_options: MethodOptionsArg | None = None,
    ig_steps: int | Literal["auto"] | None = None,
    ig_internal_batch_size: int | None = None,
    dff_components: int | None = None,
    seed: int = 0,
    warm_start: MutableMapping[str, dict[str, Any]] | None = None,
    layout: Layout = "auto",
    reshape: Reshape | None = None,
    output_transform: OutputTransform | None = None,
    **deprecated_options: Any,
) -> Explanations:
    """Saliency maps of ``images`` under ``model``, on ``images.device``, at input resolution.

    Args:
        model: an image classifier returning ``(N, num_classes)`` scores.
        images: ``(N, C, H, W)`` model inputs (normalised as the model expects).
        targets: what each map explains: a class per image (tensor, list or int); a multi-hot
            ``(N, classes)`` tensor (multi-label: the sum of each image's labels' scores); a
            function ``(outputs) -> (N,)`` score, given the model's raw output (a region of a
            segmentation map, a regression value; it is called on batches of perturbed or
            interpolated copies too, so it must score each row of the output alone); ``None``
            explains the prediction.
        methods: names from :func:`lightning_saliency.available_methods` (``ig`` is an alias).
        target_layer: dotted path or module for layer methods; ``None`` auto-detects.
        on_error: ``"collect"`` puts a failing method's exception in ``.errors`` (configuration
            errors and a target layer that cannot be used included: those fail only the
            methods that need the layer) and goes on with the others.
        method_options: per-method options, ``{"smoothgrad": {"samples": 16}}``; every
            method's options and defaults are listed by
            :func:`lightning_saliency.available_options`.
        ig_steps: IG's steps, as the callback takes them (``None``: the method's default).
        ig_internal_batch_size: images per IG pass (``None``: the method's default).
        dff_components: DFF's concepts (``None``: the method's default).
        seed: the noise seed of methods that draw noise (the global RNG is never used).
        warm_start: a dict the methods keep state in from one call to the next (the callback
            passes one so that ``ig_steps="auto"`` starts near last epoch's count).
        layout: how to read the target layer's output: ``"auto"`` (from its shape, where that
            leaves no doubt), ``"nchw"``, ``"nhwc"`` (channels last, e.g. Swin) or
            ``"tokens"`` (``(N, T, C)`` with any prefix tokens).
        reshape: a function from the layer's output to ``(N, C, h, w)`` (as pytorch-grad-cam's
            ``reshape_transform``), for layouts no rule reads.
        output_transform: a function from the model's output to its ``(N, classes)`` class
            scores, when the output is not a tensor, a ``logits`` key or attribute.
        **deprecated_options: the flat options of 0.1 (``nt_samples``, ``occlusion_window``,
            ``ig_baseline``, ...): they still work, with a ``FutureWarning`` naming the
            ``method_options`` spelling.

    Returns:
        :class:`Explanations`: ``(N, H, W)`` float32 maps (concept methods: ``(N, K, H, W)``).

    Raises:
        SaliencyConfigError: an unknown method or option, an option of the wrong type, images
            that are not ``(N, C, H, W)`` floats, targets out of range, or no usable layer.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> maps = explain(net, torch.rand(2, 3, 16, 16), methods=("gradcam", "ig"), ig_steps=8)
        >>> maps["gradcam"].shape, maps["integrated_gradients"].dtype
        (torch.Size([2, 16, 16]), torch.float32)
    """
    model = eager_module(model)
    names = normalize_methods(methods)
    common = {
        "ig_steps": ig_steps,
        "ig_internal_batch_size": ig_internal_batch_size,
        "dff_components": dff_components,
    }
    options = resolve_options(
        names,
        method_options,
        {k: v for k, v in common.items() if v is not None},
        deprecated_options,
    )
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise SaliencyConfigError(
            f"images must be a float tensor (N, C, H, W); got {shape}. Saliency maps need "
            "image inputs."
        )
    requested: Tensor | TargetFunction | None = None
    if callable(targets) and not isinstance(targets, Tensor):
        requested = targets
    elif targets is not None:
        requested = targets if isinstance(targets, Tensor) else torch.as_tensor(targets)
    maps: dict[str, Tensor] = {}
    errors: dict[str, BaseException] = {}

    def scores_for_detection(output: Any) -> Tensor:
        if callable(requested) and not isinstance(requested, Tensor):
            return requested(output)[:, None]
        return as_logits(output, output_transform)

    with explanation_context(model):
        # Clones made here are normal tensors even if the inputs are inference tensors.
        x = images.detach().clone().to(model_dtype(model))
        if isinstance(requested, Tensor):
            requested = requested.detach().clone()
        layer_name, layer = None, None
        layer_error: Exception | None = None
        if any(METHODS[n].needs_layer for n in names):
            try:
                layer_name, layer = choose_layer(model, x, target_layer, scores_for_detection)
            except Exception as err:  # only the methods that need the layer fail
                if on_error == "raise":
                    raise
                layer_error = err
        session = ExplainSession(
            model,
            x,
            requested,
            layer,
            any(METHODS[m].needs_guided_backward for m in names),
            seed,
            warm_start,
            layout=layout,
            reshape=reshape,
            output_transform=output_transform,
        )
        for name in names:
            if layer_error is not None and METHODS[name].needs_layer:
                errors[name] = layer_error
                continue
            try:
                out = METHODS[name].compute(session, options[name])
                maps[name] = torch.nan_to_num(out.detach().float(), nan=0.0, posinf=0.0)
            except Exception as err:  # a monitor reports, the caller decides
                if on_error == "raise":
                    raise
                errors[name] = err
        if callable(requested) and not isinstance(requested, Tensor):
            with torch.no_grad():  # what each map explains, for captions and the record
                session.extras["target_scores"] = session.target_scores(x).detach().float()
        return Explanations(
            maps=maps,
            logits=session.logits.detach().float(),
            targets=session.targets,
            layer_name=layer_name,
            layer_cells=session.layer_cells,
            extras=session.extras,
            errors=errors,
        )


def layer_activations(
    model: nn.Module,
    images: Tensor,
    target_layer: LayerSpec = None,
    *,
    layout: Layout = "auto",
    reshape: Reshape | None = None,
    output_transform: OutputTransform | None = None,
) -> tuple[Tensor, str]:
    """The target layer's output for ``images``, read as :func:`explain` reads it: float32
    ``(N, C, h, w)`` whatever the layout, and the layer's name. One forward, in the same
    safety context.

    Examples:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
        >>> acts, name = layer_activations(net, torch.rand(2, 3, 16, 16))
        >>> acts.shape, name
        (torch.Size([2, 8, 16, 16]), '1')
    """
    model = eager_module(model)
    with explanation_context(model):
        x = images.detach().clone().to(model_dtype(model))

        def scores(output: Any) -> Tensor:
            return as_logits(output, output_transform)

        name, layer = choose_layer(model, x, target_layer, scores)
        session = ExplainSession(
            model,
            x,
            None,
            layer,
            False,
            0,
            None,
            layout=layout,
            reshape=reshape,
            output_transform=output_transform,
        )
        return session.layer_activations(), name
