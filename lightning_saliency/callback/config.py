"""``SaliencyConfig``: the callback's arguments, checked once, frozen.

``SaliencyCallback.__init__`` hands its arguments, as given, to :meth:`SaliencyConfig.check`,
which checks each one's type and range (with the helpers of :mod:`.arguments`) and returns them
in the form the rest of the callback reads: canonical method names, typed method options,
tensors for explicit samples, labels and masks. A mistake is an error naming the argument and
its fix, before any training. What depends on the model or the data is checked later, by the
dry run (:mod:`.dry_run`). The callback's signature stays flat, so LightningCLI and YAML set
the same argument names.

Examples:
    >>> config = SaliencyConfig.check({"methods": ("gradcam", "ig"), "name": "deep"})
    >>> config.methods, config.prefix
    (('gradcam', 'integrated_gradients'), 'saliency/deep')
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from lightning_saliency.callback import arguments
from lightning_saliency.callback.samples import BatchKeys
from lightning_saliency.engine.explanations import normalize_methods
from lightning_saliency.engine.layers import LAYOUTS, Layout, Reshape
from lightning_saliency.engine.methods import DEFAULT_METHODS, METHODS, MethodOptions
from lightning_saliency.engine.methods.session import OutputTransform, TargetFunction
from lightning_saliency.engine.options import resolve_options
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.evaluate.alarms import merge_thresholds
from lightning_saliency.evaluate.scores import SignedMass
from lightning_saliency.viz.figures import first_map_method

Target = Literal["label", "pred"] | int | TargetFunction


@dataclass(frozen=True)
class SaliencyConfig:
    """Every argument of :class:`~lightning_saliency.SaliencyCallback`, checked (its
    docstring says what each one means). Built by :meth:`check`, never changed after; the
    flat ``image_key``, ``label_key`` and ``mask_key`` are ``keys``, and ``ig_steps``,
    ``ig_internal_batch_size`` and ``dff_components`` are in ``method_options``."""

    methods: tuple[str, ...]
    num_samples: int
    every_n_epochs: int
    method_every_n_epochs: dict[str, int]
    target_layer: str | nn.Module | None
    target: Target
    samples: Tensor | None
    labels: Tensor | None
    masks: Tensor | None
    keys: BatchKeys
    dataloader_idx: int
    method_options: dict[str, MethodOptions]
    denormalize: bool | None
    mean: list[float] | None
    std: list[float] | None
    class_names: list[str] | None
    tile_size: int
    thresholds: dict[str, float] | None
    timeline_method: str | None
    seed: int
    name: str | None
    per_class: bool
    grey_background: bool
    sign: str | dict[str, str]
    signed_mass: SignedMass
    sanity_check: bool
    sanity_gate: bool
    shortcut_probes: bool
    layout: Layout
    reshape: Reshape | None
    output_transform: OutputTransform | None

    @property
    def prefix(self) -> str:
        """The tags' prefix: ``saliency``, or ``saliency/<name>`` for a named callback."""
        return "saliency" if self.name is None else f"saliency/{self.name}"

    def due(self, method: str, run: int | None) -> bool:
        """Whether ``method`` runs at logged run ``run`` of a fit (``None``: outside the
        cadence, as ``trainer.validate()``), by ``method_every_n_epochs``."""
        return run is None or run % self.method_every_n_epochs.get(method, 1) == 0

    def targets(self, labels: Tensor | None) -> Tensor | int | TargetFunction | None:
        """What ``explain()`` explains for samples with ``labels``: the labels, a class, a
        target function, or ``None`` (the prediction)."""
        if callable(self.target):
            return self.target
        if self.target == "label" and labels is not None:
            return labels
        return self.target if isinstance(self.target, int) else None

    @classmethod
    def check(cls, given: Mapping[str, Any]) -> SaliencyConfig:
        """The checked configuration of the callback's arguments ``given`` (name -> value, as
        the user passed them; left out: the default).

        Raises:
            SaliencyConfigError: naming the argument and how to fix it.
        """
        unknown = set(given) - set(ARGUMENTS)
        if unknown:
            raise SaliencyConfigError(f"SaliencyCallback has no argument {sorted(unknown)[0]!r}.")
        raw = {**ARGUMENTS, **given}
        methods = normalize_methods(raw["methods"])
        samples = arguments.samples_tensor(raw["samples"])
        count = None if samples is None else samples.shape[0]
        mean, std = arguments.normalisation(
            raw["mean"], raw["std"], None if samples is None else samples.shape[1]
        )
        merge_thresholds(raw["thresholds"])  # unknown scores and non-numbers are refused
        return cls(
            methods=methods,
            num_samples=arguments.positive_int("num_samples", raw["num_samples"]),
            every_n_epochs=arguments.positive_int("every_n_epochs", raw["every_n_epochs"]),
            method_every_n_epochs=arguments.method_cadences(
                raw["method_every_n_epochs"], methods, _canonical
            ),
            target_layer=_target_layer(raw["target_layer"]),
            target=_target(raw["target"]),
            samples=samples,
            labels=arguments.labels_tensor(raw["labels"], count),
            masks=arguments.masks_tensor(raw["masks"], samples),
            keys=_keys(raw["image_key"], raw["label_key"], raw["mask_key"]),
            dataloader_idx=arguments.positive_int("dataloader_idx", raw["dataloader_idx"], 0),
            method_options=_method_options(methods, raw),
            denormalize=arguments.one_of("denormalize", raw["denormalize"], (None, True, False)),
            mean=mean,
            std=std,
            class_names=arguments.class_names_list(raw["class_names"]),
            tile_size=arguments.positive_int("tile_size", raw["tile_size"], minimum=16),
            thresholds=raw["thresholds"],
            timeline_method=_timeline_method(raw["timeline_method"], methods),
            seed=_seed(raw["seed"]),
            name=arguments.callback_name(raw["name"]),
            **_switches(raw),
            sign=arguments.display_sign(raw["sign"], methods, _signed_methods(), _canonical),
            signed_mass=arguments.one_of(
                "signed_mass", raw["signed_mass"], ("positive", "absolute")
            ),
            layout=arguments.one_of("layout", raw["layout"], LAYOUTS),
            reshape=_function("reshape", raw["reshape"]),
            output_transform=_function("output_transform", raw["output_transform"]),
        )


ARGUMENTS: dict[str, Any] = {
    "methods": DEFAULT_METHODS,
    "num_samples": 8,
    "every_n_epochs": 1,
    "method_every_n_epochs": None,
    "target_layer": None,
    "target": "label",
    "samples": None,
    "labels": None,
    "masks": None,
    "image_key": "image",
    "label_key": "label",
    "mask_key": "mask",
    "dataloader_idx": 0,
    "ig_steps": "auto",
    "ig_internal_batch_size": None,
    "dff_components": 4,
    "method_options": None,
    "denormalize": None,
    "mean": None,
    "std": None,
    "class_names": None,
    "tile_size": 112,
    "thresholds": None,
    "timeline_method": None,
    "seed": 0,
    "name": None,
    "per_class": True,
    "grey_background": True,
    "sign": "all",
    "signed_mass": "positive",
    "sanity_check": True,
    "sanity_gate": True,
    "shortcut_probes": True,
    "layout": "auto",
    "reshape": None,
    "output_transform": None,
}
"""The callback's arguments and their defaults: its signature holds the same (a test keeps them
equal), and ``check`` fills what is left out from here."""

_FLAT_OPTIONS = ("ig_steps", "ig_internal_batch_size", "dff_components")
_SWITCHES = ("per_class", "grey_background", "sanity_check", "sanity_gate", "shortcut_probes")


def _canonical(method: str) -> str:
    return normalize_methods([method])[0]


def _signed_methods() -> list[str]:
    return [m for m, spec in METHODS.items() if spec.sign == "signed"]


def _method_options(methods: tuple[str, ...], raw: Mapping[str, Any]) -> dict[str, MethodOptions]:
    flat = {key: raw[key] for key in _FLAT_OPTIONS}
    return resolve_options(methods, raw["method_options"], flat)


def _switches(raw: Mapping[str, Any]) -> dict[str, bool]:
    return {key: bool(arguments.one_of(key, raw[key], (True, False))) for key in _SWITCHES}


def _target(target: Any) -> Target:
    if (
        target in ("label", "pred")
        or callable(target)
        or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)
    ):
        chosen: Target = target
        return chosen
    raise SaliencyConfigError(
        f"target must be 'label', 'pred', a class index >= 0 or a function from the model's "
        f"output to one score per image, got {target!r}."
    )


def _target_layer(layer: Any) -> str | nn.Module | None:
    if layer is None or isinstance(layer, (str, nn.Module)):
        return layer
    raise SaliencyConfigError(
        "target_layer must be a dotted module name ('backbone.layer4'), an nn.Module or None, "
        f"got {layer!r}."
    )


def _keys(image: Any, label: Any, mask: Any) -> BatchKeys:
    given = {"image_key": image, "label_key": label, "mask_key": mask}
    for key, value in given.items():
        if not isinstance(value, str) or not value:
            raise SaliencyConfigError(f"{key} must be a non-empty string, got {value!r}.")
    return BatchKeys(image, label, mask)


def _timeline_method(method: Any, methods: tuple[str, ...]) -> str | None:
    if method is None:
        return first_map_method(methods)
    chosen = _canonical(method)
    if chosen not in methods or METHODS[chosen].kind != "map":
        maps = [m for m in methods if METHODS[m].kind == "map"]
        raise SaliencyConfigError(
            f"timeline_method={method!r} must be one of the map methods in methods: {maps}."
        )
    return chosen


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SaliencyConfigError(f"seed must be an int, got {seed!r}.")
    return seed


def _function(name: str, function: Any) -> Callable[..., Any] | None:
    if function is not None and not callable(function):
        raise SaliencyConfigError(f"{name} must be a function or None, got {function!r}.")
    return function  # type: ignore[no-any-return]
