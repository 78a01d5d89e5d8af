"""lightning-saliency: watch where an image classifier looks while it trains.

Example:
    >>> from lightning_saliency import SaliencyCallback, explain
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_saliency.callback import SaliencyCallback
    from lightning_saliency.errors import SaliencyConfigError
    from lightning_saliency.explain import Explanations, explain
    from lightning_saliency.faithfulness import FaithfulnessReport, faithfulness
    from lightning_saliency.methods import DEFAULT_METHODS, available_methods, available_options
    from lightning_saliency.monitor import AlarmEvent, EpochScores
    from lightning_saliency.sanity import SanityReport, sanity_check
    from lightning_saliency.shortcut_scores import shortcut_scores

# Public names are imported on first use (PEP 562), so `lightning-saliency --help` and
# `import lightning_saliency.cli` import neither torch nor Lightning.
_WHERE = {
    "SaliencyCallback": "callback",
    "SaliencyConfigError": "errors",
    "Explanations": "explain",
    "explain": "explain",
    "DEFAULT_METHODS": "methods",
    "available_methods": "methods",
    "available_options": "methods",
    "AlarmEvent": "monitor",
    "EpochScores": "monitor",
    "sanity_check": "sanity",
    "SanityReport": "sanity",
    "faithfulness": "faithfulness",
    "FaithfulnessReport": "faithfulness",
    "shortcut_scores": "shortcut_scores",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"lightning_saliency.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'lightning_saliency' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule ``lightning_saliency.explain`` must not replace the public
    function ``lightning_saliency.explain`` (the import system binds submodules as attributes
    of their package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "DEFAULT_METHODS",
    "AlarmEvent",
    "EpochScores",
    "Explanations",
    "FaithfulnessReport",
    "SaliencyCallback",
    "SaliencyConfigError",
    "SanityReport",
    "available_methods",
    "available_options",
    "explain",
    "faithfulness",
    "sanity_check",
    "shortcut_scores",
]
