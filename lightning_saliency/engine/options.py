"""One shape for method options everywhere: ``{"method": {"option": value}}``.

``explain()``, ``SaliencyCallback``, the command line (``--method-option method.option=value``)
and YAML all pass ``method_options`` through :func:`resolve_options`, so every option a method
declares is reachable from each of them and checked the same way. The callback's first-class
arguments (``ig_steps``, ``dff_components``, ...) are flat names that methods declare for one of
their options; ``explain()``'s other flat options still work for one release, with a warning.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_saliency.engine.methods import (
    METHODS,
    RETIRED_OPTIONS,
    MethodOptions,
    build_options,
    canonical_name,
    flat_option_names,
)
from lightning_saliency.errors import SaliencyConfigError

MethodOptionsArg = Mapping[str, Mapping[str, Any] | MethodOptions]


def _declared_default(method: str, option: str) -> Any:
    default = METHODS[method].option_fields()[option].default
    return None if default is dataclasses.MISSING else default


def _from_flat(
    methods: Sequence[str],
    flat: Mapping[str, Any],
    deprecated: bool,
    spelled: dict[tuple[str, str], str] | None = None,
) -> dict[str, dict[str, Any]]:
    table = flat_option_names()
    out: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        if name in RETIRED_OPTIONS:
            raise SaliencyConfigError(RETIRED_OPTIONS[name])
        if name not in table:
            known = ", ".join(sorted(table))
            raise SaliencyConfigError(
                f"unknown option {name!r}; use method_options={{'<method>': {{'<option>': value}}}}"
                f" (see available_options()); flat names still accepted: {known}."
            )
        targets = table[name]
        if deprecated:
            spelling = " and ".join(f"method_options={{{m!r}: {{{o!r}: ...}}}}" for m, o in targets)
            warnings.warn(
                f"explain(..., {name}=...) is deprecated and will be removed in the next release; "
                f"write {spelling}.",
                FutureWarning,
                stacklevel=4,
            )
        for method, option in targets:
            if method in methods and (deprecated or value != _declared_default(method, option)):
                out.setdefault(method, {})[option] = value
                if spelled is not None:
                    spelled[(method, option)] = f"{name}={value!r}"
    return out


def _build(method: str, values: Mapping[str, Any], spelled: Mapping[tuple[str, str], str]) -> Any:
    """The method's options; an error about an option the user set through a flat argument
    names that argument first (``ig_steps=0: ...``), since that is what they wrote."""
    try:
        return build_options(METHODS[method], values)
    except SaliencyConfigError as err:
        text = str(err)
        for (owner, option), argument in spelled.items():
            if owner == method and re.search(rf"\b{re.escape(option)}\b", text):
                raise SaliencyConfigError(f"{argument} is not valid: {text}") from err
        raise


def resolve_options(
    methods: Sequence[str],
    method_options: MethodOptionsArg | None = None,
    flat: Mapping[str, Any] | None = None,
    deprecated_flat: Mapping[str, Any] | None = None,
) -> dict[str, MethodOptions]:
    """The typed options of each of ``methods`` (canonical names), from ``method_options``
    and flat names. A flat value equal to its default counts as not given; a flat value and a
    ``method_options`` entry that disagree are an error, as are options of methods not in
    ``methods`` and values of the wrong type.

    Examples:
        >>> opts = resolve_options(("integrated_gradients", "occlusion"),
        ...                        {"occlusion": {"window": 8}}, {"ig_steps": 16})
        >>> opts["occlusion"].window, opts["integrated_gradients"].steps
        (8, 16)
    """
    spelled: dict[tuple[str, str], str] = {}
    values = _from_flat(methods, flat or {}, deprecated=False, spelled=spelled)
    for method, old in _from_flat(methods, deprecated_flat or {}, deprecated=True).items():
        values.setdefault(method, {}).update(old)
    if method_options is not None and not isinstance(method_options, Mapping):
        raise SaliencyConfigError(
            f"method_options must be a dict of method -> {{option: value}}, got {method_options!r}."
        )
    user: MethodOptionsArg = method_options or {}
    for key, entries in user.items():
        method = canonical_name(key)
        if method not in methods:
            raise SaliencyConfigError(
                f"method_options names {key!r}, which is not among methods={tuple(methods)}; "
                "add it to methods or drop its options."
            )
        given: Mapping[str, Any]
        if isinstance(entries, METHODS[method].options):
            given = {f.name: getattr(entries, f.name) for f in dataclasses.fields(entries)}
        elif isinstance(entries, Mapping):
            given = entries
        else:
            raise SaliencyConfigError(
                f"method_options[{key!r}] must be a dict of option -> value, got {entries!r}."
            )
        chosen = values.setdefault(method, {})
        for option, value in given.items():
            if option in chosen and chosen[option] != value:
                raise SaliencyConfigError(
                    f"{method} option {option!r} is set twice, to {chosen[option]!r} by a flat "
                    f"argument and to {value!r} by method_options; keep one."
                )
            chosen[option] = value
    return {m: _build(m, values.get(m, {}), spelled) for m in methods}


def parse_option_assignment(text: str) -> tuple[str, str, Any]:
    """``"smoothgrad.samples=16"`` -> ``("smoothgrad", "samples", 16)``: numbers, ``true``/
    ``false`` and ``none`` are converted, anything else stays a string.

    Examples:
        >>> parse_option_assignment("integrated_gradients.steps=auto")
        ('integrated_gradients', 'steps', 'auto')
        >>> parse_option_assignment("occlusion.window=8")
        ('occlusion', 'window', 8)
    """
    target, sep, raw = text.partition("=")
    method, dot, option = target.strip().partition(".")
    if not sep or not dot or not method or not option:
        raise SaliencyConfigError(
            f"a method option looks like METHOD.OPTION=VALUE, got {text!r}; "
            "lightning_saliency.available_options() lists them."
        )
    return method, option.strip(), _convert(raw.strip())


def _convert(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw
