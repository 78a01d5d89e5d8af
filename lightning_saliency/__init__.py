"""lightning-saliency: watch where an image classifier looks while it trains.

Example:
    >>> from lightning_saliency import SaliencyCallback, explain
"""

from lightning_saliency.callback import SaliencyCallback
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.explain import Explanations, explain
from lightning_saliency.methods import DEFAULT_METHODS, available_methods, available_options
from lightning_saliency.monitor import AlarmEvent, EpochScores

__all__ = [
    "DEFAULT_METHODS",
    "AlarmEvent",
    "EpochScores",
    "Explanations",
    "SaliencyCallback",
    "SaliencyConfigError",
    "available_methods",
    "available_options",
    "explain",
]
