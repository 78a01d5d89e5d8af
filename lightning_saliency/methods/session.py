"""The passes methods share within one ``explain()`` call.

:class:`ExplainSession` runs each expensive pass at most once per call and caches it, so
Grad-CAM, Guided Grad-CAM, DFF and the rest of the CAM family share one forward and one
backward. What a pass must do (keep the graph for a guided backward, say) comes from the
methods' declarations, never from their names.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.errors import SaliencyConfigError
from lightning_saliency.layers import to_spatial
from lightning_saliency.methods.base import METHODS


def as_logits(output: Any) -> Tensor:
    """Accept models returning a tensor, a tuple (first item) or a dict with ``logits``.

    Example:
        >>> as_logits({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
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


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(N, [K,] h, w)`` maps to ``size`` (the input resolution)."""
    squeeze = maps.dim() == 3
    batch = maps.unsqueeze(1) if squeeze else maps
    out = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    return out.squeeze(1) if squeeze else out


class ExplainSession:
    """The state one ``explain()`` call shares between methods (inside the safety context).

    Attributes:
        model, images, layer: what is explained, and the target layer (``None`` if unused).
        seed: the seed of methods that draw noise (drawn in a forked RNG).
        extras: what methods report besides their maps (becomes ``Explanations.extras``).
    """

    def __init__(
        self,
        model: nn.Module,
        images: Tensor,
        targets: Tensor | None,
        layer: nn.Module | None,
        methods: tuple[str, ...],
        seed: int = 0,
        warm_start: MutableMapping[str, dict[str, Any]] | None = None,
    ) -> None:
        self.model = model
        self.images = images
        self.layer = layer
        self.seed = seed
        self.extras: dict[str, Any] = {}
        self._guided = any(METHODS[m].needs_guided_backward for m in methods)
        self._warm_start = {} if warm_start is None else warm_start
        self._requested_targets = targets
        self._forward: dict[str, Any] | None = None
        self._cache: dict[str, Tensor] = {}

    @property
    def size(self) -> tuple[int, int]:
        return (self.images.shape[-2], self.images.shape[-1])

    def warm_start(self, method: str) -> dict[str, Any]:
        """A method's own state carried from one ``explain()`` call to the next (the callback
        keeps it between epochs and in its checkpoint): plain numbers only."""
        return self._warm_start.setdefault(method, {})

    # -- the shared forward ---------------------------------------------------------------
    def shared_forward(self) -> dict[str, Any]:
        """One forward that records the target layer's output (and routes ReLUs through the
        guided switch when a method needs the guided backward)."""
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

        x = self.images.detach().clone().requires_grad_(self._guided)
        handle = self.layer.register_forward_hook(keep) if self.layer is not None else None
        mode = GuidedReLUMode() if self._guided else None
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
        logits: Tensor = self.shared_forward()["logits"]
        return logits

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
        logits: Tensor = self.shared_forward()["logits"]
        return logits.gather(1, self.targets[:, None]).sum()

    # -- shared gradients ----------------------------------------------------------------
    def layer_activations(self) -> Tensor:
        """The target layer's output as ``(N, C, h, w)``, detached, float32."""
        return to_spatial(self.shared_forward()["layer_out"]).detach().float()

    def layer_gradients(self) -> Tensor:
        """d(target logit)/d(layer output) as ``(N, C, h, w)``: one plain backward, cached."""
        if "layer_grad" not in self._cache:
            fwd = self.shared_forward()
            keep_graph = self._guided and "guided" not in self._cache
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
                raise RuntimeError(
                    "guided gradients need a method declared with needs_guided_backward=True"
                )
            if mode.relu_calls == 0:
                warnings.warn(
                    f"{type(self.model).__name__} has no ReLU: guided backpropagation is then the "
                    "plain input gradient, so guided maps show the plain gradient instead.",
                    stacklevel=4,
                )
            mode.switch.guided = True
            (grad,) = torch.autograd.grad(self.target_score(), fwd["x"], allow_unused=True)
            self._cache["guided"] = (
                torch.zeros_like(fwd["x"]) if grad is None else grad.detach().float()
            )
        return self._cache["guided"]
