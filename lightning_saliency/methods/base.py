"""One signature for every method, a registry, and the shared passes methods reuse.

A method is a function ``compute(session) -> Tensor`` returning ``(N, H, W)`` (or ``(N, K, H, W)``)
float32 maps on the images' device. The :class:`ExplainSession` runs each expensive pass at most
once per call and caches it, so Grad-CAM, Guided Grad-CAM and DFF share one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.layers import to_spatial


@dataclass(frozen=True)
class SaliencyMethod:
    """A registered method: its name, what it shows, and the options it reads."""

    name: str
    compute: Callable[[ExplainSession], Tensor]
    description: str
    needs_layer: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()


METHODS: dict[str, SaliencyMethod] = {}
ALIASES: dict[str, str] = {}


def register(method: SaliencyMethod) -> SaliencyMethod:
    """Add a method to the registry (one line per new method)."""
    METHODS[method.name] = method
    for alias in method.aliases:
        ALIASES[alias] = method.name
    return method


def canonical_name(name: str) -> str:
    """Resolve an alias (``ig``) to its method name, or raise listing the known ones.

    Example:
        >>> canonical_name("ig")
        'integrated_gradients'
    """
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in METHODS:
        known = ", ".join(sorted(METHODS) + sorted(ALIASES))
        raise SaliencyConfigError(f"unknown saliency method {name!r}; known methods: {known}.")
    return key


def available_methods() -> dict[str, str]:
    """Every method name with a one-line description.

    Example:
        >>> "gradcam" in available_methods()
        True
    """
    return {name: method.description for name, method in sorted(METHODS.items())}


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(N, [K,] h, w)`` maps to ``size`` (the input resolution)."""
    squeeze = maps.dim() == 3
    batch = maps.unsqueeze(1) if squeeze else maps
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return out.squeeze(1) if squeeze else out


class ExplainSession:
    """The state one ``explain()`` call shares between methods (inside the safety context)."""

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        targets: Tensor | None,
        layer: nn.Module | None,
        methods: tuple[str, ...],
        options: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.images = images
        self.layer = layer
        self.methods = methods
        self.options = dict(options)
        self.extras: dict[str, Any] = {}
        self._requested_targets = targets
        self._forward: dict[str, Any] | None = None
        self._cache: dict[str, Tensor] = {}

    @property
    def size(self) -> tuple[int, int]:
        return (self.images.shape[-2], self.images.shape[-1])

    # -- the shared forward ---------------------------------------------------------------
    def shared_forward(self) -> dict[str, Any]:
        """One forward that records the target layer's output (and routes ReLUs through the
        guided switch when Guided Grad-CAM is asked for)."""
        if self._forward is not None:
            return self._forward
        from lightning_saliency.methods.guided_relu import GuidedReLUMode

        captured: dict[str, Tensor] = {}

        def keep(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            # Parameters are frozen: without an input gradient the graph starts here.
            out = out if out.requires_grad else out.detach().requires_grad_()
            captured["out"] = out
            # Hand a copy downstream so an in-place op after the layer cannot alter what we keep.
            return out.clone()

        guided = "guided_gradcam" in self.methods
        x = self.images.detach().clone().requires_grad_(guided)
        handle = self.layer.register_forward_hook(keep) if self.layer is not None else None
        mode = GuidedReLUMode() if guided else None
        try:
            if mode is not None:
                with mode:
                    logits = self.model(x)
            else:
                logits = self.model(x)
        finally:
            if handle is not None:
                handle.remove()
        logits = as_logits(logits)
        self._forward = {"x": x, "logits": logits, "layer_out": captured.get("out"), "mode": mode}
        if self.layer is not None and "out" not in captured:
            raise SaliencyConfigError(
                "the target layer was not called during the model's forward; pick a layer that "
                "the forward uses (target_layer=...)."
            )
        return self._forward

    @property
    def logits(self) -> Tensor:
        if self._forward is None and self.layer is None:
            with torch.no_grad():
                self._cache.setdefault("logits", as_logits(self.model(self.images)))
            return self._cache["logits"]
        return self.shared_forward()["logits"]

    @property
    def targets(self) -> Tensor:
        if "targets" not in self._cache:
            logits = self.logits
            if self._requested_targets is None:
                targets = logits.detach().argmax(dim=1)
            else:
                targets = self._requested_targets.to(logits.device).long().reshape(-1)
                if targets.numel() == 1 and logits.shape[0] > 1:
                    targets = targets.expand(logits.shape[0])
                if targets.numel() != logits.shape[0]:
                    raise SaliencyConfigError(
                        f"got {targets.numel()} targets for {logits.shape[0]} images."
                    )
                if bool((targets < 0).any()) or bool((targets >= logits.shape[1]).any()):
                    raise SaliencyConfigError(
                        f"target class out of range: the model has {logits.shape[1]} classes."
                    )
            self._cache["targets"] = targets
        return self._cache["targets"]

    def target_score(self) -> Tensor:
        """Sum over the batch of each image's target logit (images are independent in eval)."""
        logits = self.shared_forward()["logits"]
        return logits.gather(1, self.targets[:, None]).sum()

    # -- shared gradients ----------------------------------------------------------------
    def layer_activations(self) -> Tensor:
        """The target layer's output as ``(N, C, h, w)``, detached, float32."""
        return to_spatial(self.shared_forward()["layer_out"]).detach().float()

    def layer_gradients(self) -> Tensor:
        """d(target logit)/d(layer output) as ``(N, C, h, w)``: one plain backward, cached."""
        if "layer_grad" not in self._cache:
            fwd = self.shared_forward()
            keep_graph = "guided_gradcam" in self.methods and "guided" not in self._cache
            (grad,) = torch.autograd.grad(
                self.target_score(), fwd["layer_out"], retain_graph=keep_graph, allow_unused=True
            )
            if grad is None:
                grad = torch.zeros_like(fwd["layer_out"])
            self._cache["layer_grad"] = to_spatial(grad).detach().float()
        return self._cache["layer_grad"]

    def guided_gradients(self) -> Tensor:
        """Guided-backprop gradient of the target logit w.r.t. the input ``(N, C, H, W)``."""
        if "guided" not in self._cache:
            fwd = self.shared_forward()
            self.layer_gradients()  # the plain backward first, while the graph is kept
            mode = fwd["mode"]
            if mode is None or not fwd["x"].requires_grad:
                raise RuntimeError("guided gradients need 'guided_gradcam' among the methods")
            if mode.relu_calls == 0:
                import warnings

                warnings.warn(
                    f"{type(self.model).__name__} has no ReLU: guided backpropagation is then the "
                    "plain input gradient, so guided_gradcam shows gradient x Grad-CAM.",
                    stacklevel=4,
                )
            mode.switch.guided = True
            (grad,) = torch.autograd.grad(self.target_score(), fwd["x"], allow_unused=True)
            self._cache["guided"] = (
                torch.zeros_like(fwd["x"]) if grad is None else grad.detach().float()
            )
        return self._cache["guided"]


def as_logits(output: Any) -> Tensor:
    """Accept models returning a tensor, a tuple (first item) or a dict with ``logits``."""
    if isinstance(output, Mapping):
        output = output.get("logits", next(iter(output.values())))
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise SaliencyConfigError(
            f"the model must return class scores of shape (N, num_classes); it returned {shape}. "
            "Saliency needs an image classifier."
        )
    return output
