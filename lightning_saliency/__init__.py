"""lightning-saliency: watch where an image classifier looks while it trains.

Example:
    >>> from lightning_saliency import SaliencyCallback, explain
"""

from lightning_saliency.callback import SaliencyCallback
from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.explain import DEFAULT_METHODS, Explanations, explain
from lightning_saliency.methods import available_methods

__all__ = [
    "DEFAULT_METHODS",
    "Explanations",
    "SaliencyCallback",
    "SaliencyConfigError",
    "available_methods",
    "explain",
]
