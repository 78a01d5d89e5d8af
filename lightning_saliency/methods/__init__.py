"""The method registry; importing this package registers every built-in method."""

from lightning_saliency.methods import (  # noqa: F401 (importing registers the methods)
    cam,
    cam_family,
    dff,
    integrated_gradients,
    perturbation,
    smoothgrad,
)
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
