"""What a method is: its self-description, its typed options, and the registry that holds it.

A method is a function ``compute(session, options) -> Tensor`` returning ``(N, H, W)`` maps (or
``(N, K, H, W)`` concept maps) in float32 on the images' device, plus a :class:`SaliencyMethod`
record that says what those maps are (kind, sign), what they cost, what they need (a target
layer, the guided backward), what else they report, and which options they read. Everything
outside ``methods/`` reads these records and never names a method.

Adding a method is one file that calls :func:`register` (and its tests): ``explain()``, the
callback, the command line and YAML pick it up from the registry.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

from torch import Tensor, nn

from lightning_saliency.errors import SaliencyConfigError

if TYPE_CHECKING:
    from lightning_saliency.engine.methods.session import ExplainSession

Kind = Literal["map", "concepts"]
Sign = Literal["non_negative", "signed"]
Cost = Literal["cheap", "moderate", "expensive"]
JointFunction = Callable[
    [Tensor, "nn.Module", tuple[int, int], Any, dict[str, Any]], tuple[Tensor, dict[str, Any]]
]
"""``(activations, model, size, options, memory) -> (maps, extras)``: see ``joint``."""


@dataclass(frozen=True)
class MethodOptions:
    """Base of every method's typed options (a frozen dataclass per method).

    Subclasses declare fields with type hints and defaults; values are checked against the
    hints when they are built through :func:`build_options`, and ``check()`` adds range rules.
    """

    def check(self) -> None:
        """Raise ``ValueError`` naming the field when a value is out of range."""


@dataclass(frozen=True)
class NoOptions(MethodOptions):
    """For methods without options."""


@dataclass(frozen=True)
class MethodScore:
    """A per-image number a method measures about its own maps (e.g. IG's completeness error).

    ``extra`` is the key the method writes in ``Explanations.extras``; the callback logs it as
    ``saliency/<method>/<name>`` and, with a ``threshold``, raises an alarm when it is above.
    """

    extra: str
    name: str
    threshold: float | None = None
    meaning: str = ""


@dataclass(frozen=True)
class SaliencyMethod:
    """A registered method and its self-description.

    Attributes:
        name: the canonical name (``aliases`` resolve to it).
        compute: ``(session, options) -> maps``.
        description: one line for ``available_methods()``, the docs' methods table and ``--help``.
        options: the method's options dataclass (a :class:`MethodOptions` subclass).
        kind: ``"map"`` (``(N, H, W)``) or ``"concepts"`` (``(N, K, H, W)``).
        sign: ``"non_negative"`` or ``"signed"`` maps (signed ones render on a diverging scale).
        cost: ``"cheap"`` (shares one forward/backward), ``"moderate"`` or ``"expensive"``
            (many passes per image: give it its own cadence in the callback).
        passes: forward (F) and backward (B) passes per image, as text for tables.
        needs_layer: whether a target layer is needed.
        needs_guided_backward: whether the shared forward must route ReLUs for guided backprop.
        needs_attention: whether the method reads every block's attention (transformers
            only: :mod:`lightning_saliency.engine.attention` says which).
        location_alarms: whether scores that read only where a map points (the corner and
            object scores, consensus) may raise alarms for this method; ``False`` for maps
            that also mark where attention rests without mattering (the attention methods).
        class_specific: whether a map depends on the class it explains. Class-agnostic maps
            (EigenCAM, attention rollout) are scored and shown, never alarmed: an alarm says
            what the model's decision rests on.
        flat_names: flat argument name -> option field (``{"ig_steps": "steps"}``): the
            callback's first-class arguments and ``explain()``'s deprecated flat options.
        scores: per-image numbers the method reports about its maps (see :class:`MethodScore`).
        extras: keys the method writes in ``Explanations.extras``, with their meaning.
        concept_scores: for ``kind="concepts"``, the extra holding ``(K, num_classes)`` scores.
        aliases: other accepted spellings.
        joint: for a method that factorises all samples jointly (``kind="concepts"``):
            ``(activations, model, size, options, memory) -> (maps, extras)`` from the target
            layer's ``(N, C, h, w)`` activations of all samples. Under DDP each rank computes
            its share's activations, they are gathered, and every rank runs this alike.
    """

    name: str
    compute: Callable[[ExplainSession, Any], Tensor]
    description: str
    options: type[MethodOptions] = NoOptions
    kind: Kind = "map"
    sign: Sign = "non_negative"
    cost: Cost = "cheap"
    passes: str = "1F + 1B"
    needs_layer: bool = True
    needs_guided_backward: bool = False
    needs_attention: bool = False
    location_alarms: bool = True
    class_specific: bool = True
    flat_names: Mapping[str, str] = field(default_factory=dict)
    scores: tuple[MethodScore, ...] = ()
    extras: Mapping[str, str] = field(default_factory=dict)
    concept_scores: str | None = None
    aliases: tuple[str, ...] = ()
    joint: JointFunction | None = None

    def option_fields(self) -> dict[str, dataclasses.Field[Any]]:
        """The declared options, by name."""
        return {f.name: f for f in dataclasses.fields(self.options)}


METHODS: dict[str, SaliencyMethod] = {}
ALIASES: dict[str, str] = {}
RETIRED_OPTIONS: dict[str, str] = {}
"""Flat option names that no longer exist -> what to write instead (said as the error)."""


def register(method: SaliencyMethod) -> SaliencyMethod:
    """Add a method to the registry; returns it (so a module can keep a handle)."""
    if not dataclasses.is_dataclass(method.options) or not issubclass(
        method.options, MethodOptions
    ):
        raise TypeError(f"{method.name}: options must be a MethodOptions dataclass")
    METHODS[method.name] = method
    for alias in method.aliases:
        ALIASES[alias] = method.name
    return method


def register_input_method(
    name: str,
    compute: Callable[[ExplainSession, Any], Tensor],
    description: str,
    *,
    signed: bool,
    **fields: Any,
) -> SaliencyMethod:
    """Register a method that reads no target layer (its maps come from input gradients or
    perturbations), signed or non-negative; ``fields`` are the other record fields."""
    sign: Sign = "signed" if signed else "non_negative"
    return register(
        SaliencyMethod(name, compute, description, sign=sign, needs_layer=False, **fields)
    )


def unregister(name: str) -> None:
    """Remove a method and its aliases (plugins and tests)."""
    method = METHODS.pop(name)
    for alias in method.aliases:
        ALIASES.pop(alias, None)


def canonical_name(name: str) -> str:
    """Resolve an alias (``ig``) to its method name, or raise listing the known ones.

    Examples:
        >>> canonical_name("ig")
        'integrated_gradients'
    """
    if not isinstance(name, str):
        raise SaliencyConfigError(f"a method name must be a string, got {name!r}.")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        known = ", ".join(sorted(METHODS) + sorted(ALIASES))
        raise SaliencyConfigError(f"unknown saliency method {name!r}; known methods: {known}.")
    return key


def available_methods() -> dict[str, str]:
    """Every method name with a one-line description.

    Examples:
        >>> "gradcam" in available_methods()
        True
    """
    return {name: method.description for name, method in sorted(METHODS.items())}


def available_attention_methods() -> tuple[str, ...]:
    """The methods that read a transformer's attention (``needs_attention``), by name.

    Examples:
        >>> "legrad" in available_attention_methods()
        True
    """
    return tuple(sorted(name for name, method in METHODS.items() if method.needs_attention))


def available_options() -> dict[str, dict[str, Any]]:
    """Every method's options with their defaults, as ``method_options`` takes them.

    Examples:
        >>> available_options()["occlusion"]["window"] is None
        True
    """
    return {
        name: {
            f.name: f.default
            for f in dataclasses.fields(method.options)
            if f.default is not dataclasses.MISSING
        }
        for name, method in sorted(METHODS.items())
    }


# -- typed options ------------------------------------------------------------------------------
def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits a type hint made of classes, ``None``, ``Literal`` and unions."""
    if hint is Any:
        return True
    if hint is None or hint is type(None):
        return value is None
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == choice and type(value) is type(choice) for choice in hint.__args__)
    if origin is Union or origin is types.UnionType:
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is None or hint is type(None):
        return "None"
    if origin is Literal:
        return " or ".join(repr(c) for c in hint.__args__)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def build_options(method: SaliencyMethod, values: Mapping[str, Any]) -> MethodOptions:
    """The method's options dataclass from user values, each checked against its type.

    Examples:
        >>> build_options(METHODS["occlusion"], {"window": 8}).window
        8
        >>> try:
        ...     build_options(METHODS["occlusion"], {"windw": 8})
        ... except ValueError as err:
        ...     print(str(err).split("; ")[1])
        occlusion takes: batch_size, window, stride.
    """
    fields = method.option_fields()
    where = f"method_options[{method.name!r}]"
    if not isinstance(values, Mapping):
        raise SaliencyConfigError(f"{where} must be a dict of option -> value, got {values!r}.")
    hints = typing.get_type_hints(method.options)
    for key, value in values.items():
        if key not in fields:
            known = ", ".join(fields) or "no options"
            raise SaliencyConfigError(
                f"{where} has no option {key!r}; {method.name} takes: {known}."
            )
        if not _matches(value, hints[key]):
            raise SaliencyConfigError(
                f"{where}[{key!r}] must be {_describe(hints[key])}, got {value!r}."
            )
    options = method.options(**values)
    try:
        options.check()
    except ValueError as err:
        raise SaliencyConfigError(f"{where}: {err}") from err
    return options


def flat_option_names() -> dict[str, list[tuple[str, str]]]:
    """Flat argument name -> the ``(method, option)`` pairs it sets (one flat name may set the
    same option of several methods, e.g. a shared batch size)."""
    table: dict[str, list[tuple[str, str]]] = {}
    for name, method in METHODS.items():
        for flat, option in method.flat_names.items():
            table.setdefault(flat, []).append((name, option))
    return table
