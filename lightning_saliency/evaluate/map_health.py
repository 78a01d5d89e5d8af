"""Blank maps, found and explained: :func:`blank_maps` and :func:`blank_reason`.

A map that is constant (all zeros, or no value above ``1e-12``) draws as an empty tile, and
every score of it is zero. That is what the method computed, not a failure: Grad-CAM keeps the
positive part of the class evidence at its layer, and an untrained network can have none
there; an input gradient can vanish below float precision through a deep, saturated network
(MobileNetV3's hard-swish, EfficientNet's stochastic depth at random weights). The callback
says so once per method, with the reason, rather than drawing an empty grid in silence.

Examples:
    >>> import torch
    >>> blank_maps({"gradcam": torch.stack([torch.zeros(4, 4), torch.rand(4, 4) + 0.1])})
    {'gradcam': 1}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_saliency.engine.methods import METHODS

FLOOR = 1e-12  # the largest magnitude of a map that shows nothing (the scores' own floor)


def blank(maps: Tensor) -> Tensor:
    """Per image, whether its map (or all its concept maps) is constant or below
    :data:`FLOOR` everywhere.

    Examples:
        >>> blank(torch.tensor([[[1.0, 1.0]], [[0.0, 1e-20]], [[0.0, 1.0]]])).tolist()
        [True, True, False]
    """
    flat = maps.detach().float().flatten(1)
    top, low = flat.amax(dim=1), flat.amin(dim=1)
    size = torch.maximum(top.abs(), low.abs())
    return (size <= FLOOR) | (top - low <= 1e-6 * size)


def blank_maps(out: Mapping[str, Tensor]) -> dict[str, int]:
    """How many of each method's maps are blank (methods with none are left out)."""
    counts = {method: int(blank(maps).sum()) for method, maps in out.items()}
    return {method: n for method, n in counts.items() if n}


def blank_reason(method: str, layer: str | None) -> str:
    """Why a method's map can be blank, and what to do.

    Examples:
        >>> blank_reason("gradcam", "layer4").startswith("the class evidence at layer 'layer4'")
        True
    """
    spec = METHODS.get(method)
    if spec is not None and spec.needs_layer:
        return (
            f"the class evidence at layer '{layer}' is not positive anywhere, or vanishes "
            "(common at random weights; it changes as the model trains); another "
            "target_layer= may show more"
        )
    return (
        "the input gradient is zero or below float precision (activations that vanish or "
        "saturate through the network, common at random weights)"
    )
