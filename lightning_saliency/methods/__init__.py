"""The method registry; importing this package registers every built-in method."""

from lightning_saliency.methods import cam, dff, integrated_gradients  # noqa: F401 (registers)
from lightning_saliency.methods.base import (
    METHODS,
    ExplainSession,
    SaliencyMethod,
    available_methods,
    canonical_name,
    register,
)

__all__ = [
    "METHODS",
    "ExplainSession",
    "SaliencyMethod",
    "available_methods",
    "canonical_name",
    "register",
]
