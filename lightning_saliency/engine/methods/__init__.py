"""The method registry; importing this package registers every built-in method.

This package is the only place that names a method: everything else reads the registry. Every
module in it is imported here, so a new method is one new file that calls ``register`` (or
``cam_method``), and nothing else changes.
"""

import importlib
import pkgutil

from lightning_saliency.engine.methods.base import (
    ALIASES,
    METHODS,
    RETIRED_OPTIONS,
    MethodOptions,
    MethodScore,
    NoOptions,
    SaliencyMethod,
    available_attention_methods,
    available_methods,
    available_options,
    build_options,
    canonical_name,
    flat_option_names,
    register,
    register_input_method,
    unregister,
)
from lightning_saliency.engine.methods.cam import cam_method
from lightning_saliency.engine.methods.session import ExplainSession, as_logits, upsample

for _module in pkgutil.iter_modules(__path__):  # importing a module registers its methods
    importlib.import_module(f"{__name__}.{_module.name}")

DEFAULT_METHODS: tuple[str, ...] = ("gradcam", "guided_gradcam", "dff", "integrated_gradients")
"""What the callback and ``explain()`` compute when no ``methods`` are given."""

__all__ = [
    "ALIASES",
    "DEFAULT_METHODS",
    "METHODS",
    "RETIRED_OPTIONS",
    "ExplainSession",
    "MethodOptions",
    "MethodScore",
    "NoOptions",
    "SaliencyMethod",
    "as_logits",
    "available_attention_methods",
    "available_methods",
    "available_options",
    "build_options",
    "canonical_name",
    "cam_method",
    "flat_option_names",
    "register",
    "register_input_method",
    "unregister",
    "upsample",
]
