"""The setup dry run: every configured method on two of the fixed samples, before training.

Lightning calls ``Callback.setup`` before the strategy places (or even builds) the model, so
the callback runs this from ``on_fit_start`` / ``on_validation_start``, on every rank. What can
only be known from the model and the data is checked here, and each failure is a
:class:`~lightning_saliency.errors.SaliencyConfigError` that names the argument to fix:
``mean``/``std`` against the input channels, ``labels`` and ``target`` against the classes,
finite outputs, the target layer, each method with its options, and the scores of its maps.
A run that passes it does not meet those mistakes after epoch 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_saliency.callback import arguments
from lightning_saliency.engine.attention import check_transformer
from lightning_saliency.engine.explanations import (
    Explanations,
    explain,
    explanation_context,
    model_dtype,
)
from lightning_saliency.engine.layers import LayerSpec, Layout, Reshape
from lightning_saliency.engine.methods import (
    METHODS,
    MethodOptions,
    as_logits,
    available_attention_methods,
)
from lightning_saliency.engine.methods.session import OutputTransform, TargetFunction
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.evaluate.monitor import ScoreMonitor


def check_outputs(
    model: nn.Module, images: Tensor, output_transform: OutputTransform | None = None
) -> Tensor:
    """The model's float32 class scores for ``images``; an error if they are not finite or not
    ``(N, classes)``."""
    with explanation_context(model), torch.no_grad():
        output = model(images.detach().clone().to(model_dtype(model)))
        logits = as_logits(output, output_transform).float()
    if logits.dim() != 2 or logits.shape[0] != images.shape[0]:
        raise SaliencyConfigError(
            f"the model returns scores of shape {tuple(logits.shape)} for {images.shape[0]} "
            "images; SaliencyCallback needs (N, num_classes) class scores (a tensor, a tuple "
            "whose first item is one, or a dict with 'logits')."
        )
    if not bool(torch.isfinite(logits).all()):
        raise SaliencyConfigError(
            "the model's outputs on the fixed samples are not finite (NaN or inf) before "
            "training; check the model's initialisation and the inputs' normalisation."
        )
    return logits


def dry_run(
    model: nn.Module,
    images: Tensor,
    labels: Tensor | None,
    target: str | int | TargetFunction,
    methods: Sequence[str],
    target_layer: LayerSpec,
    method_options: Mapping[str, MethodOptions],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    seed: int = 0,
    masks: Tensor | None = None,
    layout: Layout = "auto",
    reshape: Reshape | None = None,
    output_transform: OutputTransform | None = None,
) -> str | None:
    """Check the model and the data against the configuration; returns the target layer's name
    (``None`` when no method needs one).

    Args:
        model: the placed model.
        images: the fixed samples, on the model's device.
        labels: their labels (``None`` if unknown).
        target: the callback's ``target``.
        methods, target_layer, method_options, seed: as the callback runs them.
        mean, std: the normalisation to undo for display (``None``: not known).
        masks: the samples' object masks, if any (their scores are computed too).
        layout, reshape, output_transform: as :func:`~lightning_saliency.explain`.

    Raises:
        SaliencyConfigError: naming the argument to fix.
    """
    arguments.normalisation(mean, std, channels=images.shape[1])
    few = images[:2]
    targets: Tensor | int | TargetFunction | None = None
    if callable(target):
        targets = target
    else:
        logits = check_outputs(model, images, output_transform)
        classes = logits.shape[1]
        if isinstance(target, int) and target >= classes:
            raise SaliencyConfigError(f"target={target} but the model has {classes} classes.")
        if labels is not None and labels.numel() and int(labels.max()) >= classes:
            raise SaliencyConfigError(
                f"labels hold class {int(labels.max())} but the model has {classes} classes "
                f"(0..{classes - 1}); check labels= (or the batches' labels)."
            )
        if target == "label" and labels is not None:
            targets = labels[:2]
        elif isinstance(target, int):
            targets = target
    out = explain(
        model,
        few,
        targets,
        methods,
        target_layer,
        on_error="collect",
        method_options=dict(method_options),
        seed=seed,
        warm_start={},
        layout=layout,
        reshape=reshape,
        output_transform=output_transform,
    )
    return _judge(out, few, target_layer, labels, masks)


def attention_advice(model: nn.Module, methods: Sequence[str]) -> str | None:
    """The line to say when a vision transformer is watched only by methods that do not read
    its attention (the defaults), or ``None``.

    Examples:
        >>> from torchvision.models import VisionTransformer
        >>> vit = VisionTransformer(32, 8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8)
        >>> attention_advice(vit, ["gradcam"]).split(":")[0]
        'SaliencyCallback'
        >>> attention_advice(vit, ["gradcam", "legrad"]) is None
        True
    """
    if any(METHODS[m].needs_attention for m in methods):
        return None
    try:
        check_transformer(model)
    except SaliencyConfigError:  # no attention these methods can read
        return None
    reading = available_attention_methods()
    return (
        f"SaliencyCallback: {type(model).__name__} is a vision transformer, and no method in "
        f"methods= reads its attention ({', '.join(reading)} do). On the ViTs of the detection "
        "benchmark, Grad-CAM on the tokens caught 7 of 23 learnt cues, each attention method "
        "16 to 19 (docs/transformers.md); add them to methods= to watch it as a transformer."
    )


def _judge(
    out: Explanations,
    few: Tensor,
    target_layer: LayerSpec,
    labels: Tensor | None,
    masks: Tensor | None,
) -> str | None:
    """The dry run's verdict on two samples' explanations: each failure is an error."""
    for method, error in out.errors.items():
        raise SaliencyConfigError(_explain_failure(method, error, target_layer, out.layer_name))
    for method, maps in out.items():
        concepts = METHODS[method].kind == "concepts"
        want = 4 if concepts else 3
        if maps.dim() != want or maps.shape[0] != few.shape[0] or maps.shape[-2:] != few.shape[-2:]:
            raise SaliencyConfigError(
                f"{method} returned maps of shape {tuple(maps.shape)} for images of shape "
                f"{tuple(few.shape)}; a map method must return (N, H, W) at input resolution."
            )
    report = ScoreMonitor().observe(
        0, out, None if labels is None else labels[:2], None if masks is None else masks[:2]
    )
    for method, error in report.errors.items():
        raise SaliencyConfigError(
            f"SaliencyCallback's dry run on two samples before training: the scores of "
            f"{method} cannot be computed ({type(error).__name__}: {error}); check masks= (or "
            f"the batches' masks), or drop {method!r} from methods."
        )
    return out.layer_name


def _explain_failure(method: str, error: BaseException, layer: Any, found: str | None) -> str:
    spec = METHODS[method]
    what = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    if "Checkpointing is not compatible" in str(error):
        fix = (
            f"{method} needs torch.autograd.grad, which torch.utils.checkpoint("
            "use_reentrant=True) does not support; checkpoint with use_reentrant=False, or "
            f"drop {method!r} from methods."
        )
    elif "different number of tensors was saved" in str(error):
        fix = (
            f"{method} reroutes the model's ReLUs for its backward, and "
            "torch.utils.checkpoint recomputes the forward without that routing; drop "
            f"{method!r} from methods or explain without activation checkpointing."
        )
    elif "does not require grad" in str(error) or "no input gradient" in str(error):
        fix = (
            f"{method} needs the gradient of the class score with respect to the input, and "
            "the model's forward runs part of it under torch.no_grad() (a frozen backbone or "
            f"linear probe); drop {method!r} from methods (layer methods after the no_grad "
            "block still work)."
        )
    elif spec.needs_attention:
        fix = (
            f"{method} reads every block's attention, and cannot on this model ({what}); "
            f"drop {method!r} from methods."
        )
    elif spec.needs_layer:
        chosen = layer if isinstance(layer, str) else found
        where = f"target_layer={chosen!r}" if chosen else "the auto-detected target layer"
        fix = (
            f"{method} explains a spatial feature map and failed on {where} ({what}); pass "
            "target_layer= the dotted name of a convolutional stage that forward() calls, "
            f"or drop {method!r} from methods."
        )
    else:
        fix = (
            f"{method} failed ({what}); check method_options[{method!r}] (every option: "
            f"lightning_saliency.available_options()), or drop {method!r} from methods."
        )
    return f"SaliencyCallback's dry run on two samples before training: {fix}"
