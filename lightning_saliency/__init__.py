"""lightning-saliency: watch where an image classifier looks while it trains.

Every name a user or a plugin author imports lives here, on the face of the package; the
subpackages behind it are ``engine`` (``explain()`` and the methods), ``evaluate`` (scores,
probes, sanity check, alarms), ``viz`` (pictures), ``publish`` (loggers), ``callback`` and
``cli``.

Examples:
    >>> from lightning_saliency import SaliencyCallback, explain
    >>> from lightning_saliency import MethodOptions, cam_method, register
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_saliency.callback.callback import SaliencyCallback
    from lightning_saliency.callback.early_stopping import SaliencyEarlyStopping
    from lightning_saliency.engine.attention import register_attention
    from lightning_saliency.engine.explanations import Explanations, explain
    from lightning_saliency.engine.methods import (
        DEFAULT_METHODS,
        METHODS,
        ExplainSession,
        MethodOptions,
        MethodScore,
        NoOptions,
        SaliencyMethod,
        available_methods,
        available_options,
        cam_method,
        register,
        register_input_method,
        unregister,
    )
    from lightning_saliency.errors import SaliencyConfigError
    from lightning_saliency.evaluate.deletion import FaithfulnessReport, faithfulness
    from lightning_saliency.evaluate.hysteresis import AlarmEvent
    from lightning_saliency.evaluate.monitor import EpochScores
    from lightning_saliency.evaluate.sanity import SanityReport, sanity_check
    from lightning_saliency.evaluate.shortcut_probes import shortcut_scores

_METHODS = "lightning_saliency.engine.methods"
# Public names are imported on first use (PEP 562), so `lightning-saliency --help` and
# `import lightning_saliency.cli` import neither torch nor Lightning.
_WHERE = {
    "SaliencyCallback": "lightning_saliency.callback.callback",
    "SaliencyEarlyStopping": "lightning_saliency.callback.early_stopping",
    "SaliencyConfigError": "lightning_saliency.errors",
    "Explanations": "lightning_saliency.engine.explanations",
    "explain": "lightning_saliency.engine.explanations",
    "DEFAULT_METHODS": _METHODS,
    "METHODS": _METHODS,
    "available_methods": _METHODS,
    "available_options": _METHODS,
    "ExplainSession": _METHODS,
    "MethodOptions": _METHODS,
    "MethodScore": _METHODS,
    "NoOptions": _METHODS,
    "SaliencyMethod": _METHODS,
    "cam_method": _METHODS,
    "register": _METHODS,
    "register_input_method": _METHODS,
    "unregister": _METHODS,
    "register_attention": "lightning_saliency.engine.attention",
    "AlarmEvent": "lightning_saliency.evaluate.hysteresis",
    "EpochScores": "lightning_saliency.evaluate.monitor",
    "sanity_check": "lightning_saliency.evaluate.sanity",
    "SanityReport": "lightning_saliency.evaluate.sanity",
    "faithfulness": "lightning_saliency.evaluate.deletion",
    "FaithfulnessReport": "lightning_saliency.evaluate.deletion",
    "shortcut_scores": "lightning_saliency.evaluate.shortcut_probes",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'lightning_saliency' has no attribute {name!r}")


__all__ = [
    "AlarmEvent",
    "DEFAULT_METHODS",
    "EpochScores",
    "ExplainSession",
    "Explanations",
    "FaithfulnessReport",
    "METHODS",
    "MethodOptions",
    "MethodScore",
    "NoOptions",
    "SaliencyCallback",
    "SaliencyConfigError",
    "SaliencyEarlyStopping",
    "SaliencyMethod",
    "SanityReport",
    "available_methods",
    "available_options",
    "cam_method",
    "explain",
    "faithfulness",
    "register",
    "register_attention",
    "register_input_method",
    "sanity_check",
    "shortcut_scores",
    "unregister",
]
