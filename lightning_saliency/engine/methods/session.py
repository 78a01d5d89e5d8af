"""The passes methods share within one ``explain()`` call.

:class:`ExplainSession` runs each expensive pass at most once per call and caches it, so
Grad-CAM, Guided Grad-CAM, DFF and the rest of the CAM family share one forward and one
backward. What a pass must do (keep the graph for a guided backward, say) comes from the
methods' declarations, never from their names.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_saliency.engine.layers import LayerLayout, Reshape, prefix_tokens_of, read_layout
from lightning_saliency.errors import SaliencyConfigError

OutputTransform = Callable[[Any], Tensor]
TargetFunction = Callable[[Any], Tensor]


def as_logits(output: Any, transform: OutputTransform | None = None) -> Tensor:
    """The class scores in a model's output, by one rule: ``transform(output)`` when given;
    else the output itself if it is a tensor, its ``logits`` key, or its ``logits`` attribute
    (Hugging Face outputs, torchvision's named tuples). Anything else (a tuple of tensors, a
    dict without ``logits``) is ambiguous: an error that names ``output_transform=``. A
    single-logit binary classifier ``(N, 1)`` (or ``(N,)``) becomes two classes
    ``[-z/2, z/2]``: their softmax is ``sigmoid(z)``, class 1 is a positive logit.

    Examples:
        >>> as_logits({"logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
        >>> as_logits(torch.tensor([[2.0], [-4.0]])).tolist()
        [[-1.0, 1.0], [2.0, -2.0]]
        >>> as_logits((torch.zeros(2, 16), torch.zeros(2, 3)), lambda out: out[1]).shape
        torch.Size([2, 3])
    """
    if transform is not None:
        output = transform(output)
    elif isinstance(output, Mapping):
        if "logits" not in output:
            raise SaliencyConfigError(
                f"the model returns a dict without a 'logits' key (keys: {sorted(output)}); "
                "pass output_transform= a function from the output to the (N, num_classes) "
                "class scores, e.g. output_transform=lambda out: out['scores']."
            )
        output = output["logits"]
    elif not isinstance(output, Tensor) and isinstance(getattr(output, "logits", None), Tensor):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        shapes = [tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in output]
        raise SaliencyConfigError(
            f"the model returns a {type(output).__name__} of {len(output)} items {shapes}; which "
            "are the class scores is not certain. Pass output_transform= a function that picks "
            "them, e.g. output_transform=lambda out: out[1]."
        )
    if isinstance(output, Tensor) and output.dim() == 1:
        output = output[:, None]
    if not isinstance(output, Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise SaliencyConfigError(
            f"the model's class scores must have shape (N, num_classes); got {shape}. Pass "
            "output_transform= a function from the output to them, or target= a function "
            "from the output to one (N,) score per image."
        )
    if output.shape[1] == 1:  # one logit: the two classes of a sigmoid
        half = output / 2
        output = torch.cat([-half, half], dim=1)
    scores: Tensor = output
    return scores


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
        targets: Tensor | TargetFunction | None,
        layer: nn.Module | None,
        guided: bool,
        seed: int = 0,
        warm_start: MutableMapping[str, dict[str, Any]] | None = None,
        layout: str = "auto",
        reshape: Reshape | None = None,
        output_transform: OutputTransform | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.reshape = reshape
        self.output_transform = output_transform
        self.reading: LayerLayout | None = None
        self.layer_cells: tuple[int, int] | None = None  # the layer's grid, once read
        self.images = images
        self.layer = layer
        self.seed = seed
        self.extras: dict[str, Any] = {}
        self._guided = guided
        self._warm_start = {} if warm_start is None else warm_start
        self._score_fn: TargetFunction | None = None
        self._weights: Tensor | None = None
        if callable(targets) and not isinstance(targets, Tensor):
            self._score_fn, targets = targets, None
        elif isinstance(targets, Tensor) and targets.dim() == 2:  # multi-hot: several labels
            self._weights, targets = targets.detach().float(), None
        self._requested_targets = targets
        self._forward: dict[str, Any] | None = None
        self._cache: dict[str, Tensor] = {}
        self._shared: dict[str, Any] = {}

    def shared(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``'s value, computed once per ``explain()`` call and shared by every
        method that asks for ``key`` (a pass that several methods read)."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    def class_scores(self, x: Tensor) -> Tensor:
        """The model's ``(N, classes)`` scores for ``x``, by :func:`as_logits`'s rule."""
        return self._scores_of_output(self.model(x))

    def _scores_of_output(self, output: Any) -> Tensor:
        """Class scores of a model output; with a target function and no readable class
        scores (a segmentation map, a regression value), its score as one logit."""
        try:
            return as_logits(output, self.output_transform)
        except SaliencyConfigError:
            if self._score_fn is None:
                raise
            return as_logits(self._target_of_output(output)[:, None])

    def _target_of_output(self, output: Any, image: int | None = None) -> Tensor:
        """The score each image's map explains, ``(N,)``, from a model output; with ``image``,
        every row of the output is a (perturbed) copy of that image."""
        if self._score_fn is not None:
            score = self._score_fn(output)
            if not isinstance(score, Tensor) or score.dim() != 1:
                shape = tuple(score.shape) if isinstance(score, Tensor) else type(score).__name__
                raise SaliencyConfigError(
                    f"target= a function must return one score per image, (N,); it returned "
                    f"{shape}."
                )
            return score
        logits = as_logits(output, self.output_transform)
        if self._weights is not None:
            weights = self._weights if image is None else self._weights[image : image + 1]
            return (logits * weights.to(logits.device, logits.dtype)).sum(1)
        targets = self.targets if image is None else self.targets[image].expand(len(logits))
        return logits.gather(1, targets[:, None]).squeeze(1)

    def explained_scores(self, output: Any) -> Tensor:
        """The score each image's map explains, ``(N,)``, from a model output of the images."""
        return self._target_of_output(output)

    def class_score(self, logits: Tensor, method: str) -> Tensor:
        """The explained score ``(N,)`` from class scores ``(N, classes)`` that a method computed
        itself (a block's tokens through the head): the target class's, or the sum of the
        labels' (multi-hot targets). ``method`` names the method in the error a target
        function gets."""
        weights = self.target_weights(logits.shape[1], method)
        return (logits * weights.to(logits.device, logits.dtype)).sum(1)

    def target_weights(self, classes: int, method: str) -> Tensor:
        """``(N, classes)``: what each image's map explains as weights on the class scores, the
        target's one-hot row or the labels' multi-hot one. ``method`` names the method in the
        error a target function gets (it has no classes to weigh)."""
        if self._score_fn is not None:
            raise SaliencyConfigError(
                f"{method} weighs the class scores: it needs class targets, not a target function."
            )
        if self._weights is not None:
            return self._weights.float()
        eye = torch.eye(classes, device=self.images.device)
        return eye[self.targets.to(eye.device)]

    def target_scores(self, x: Tensor) -> Tensor:
        """The explained score of each image of ``x`` (``(N,)``, the same N as the images)."""
        return self._target_of_output(self.model(x))

    def image_scores(self, x: Tensor, index: int) -> Tensor:
        """The explained score of image ``index`` for a batch ``x`` of its perturbed copies."""
        return self._target_of_output(self.model(x), index)

    def captum_forward(self) -> tuple[Callable[..., Tensor], Tensor | int, tuple[Tensor, ...]]:
        """``(forward_func, target, additional_forward_args)`` for a captum attribution of the
        explained score (captum repeats the extra arguments with the inputs it expands)."""
        if self._score_fn is not None:
            score_fn = self._score_fn
            return (lambda x: score_fn(self.model(x))[:, None]), 0, ()
        if self._weights is not None:

            def weighted(x: Tensor, weights: Tensor) -> Tensor:
                return (self.class_scores(x) * weights).sum(1, keepdim=True)

            return weighted, 0, (self._weights.to(self.images.device),)
        return self.class_scores, self.targets, ()

    def spatial(self, output: Tensor) -> Tensor:
        """A layer output (or its gradient) as ``(N, C, h, w)``: by ``reshape`` when given,
        else by its layout, read once from the first output seen."""
        if self.reshape is not None:
            mapped = self.reshape(output)
            if not isinstance(mapped, Tensor) or mapped.dim() != 4:
                shape = tuple(mapped.shape) if isinstance(mapped, Tensor) else type(mapped)
                raise SaliencyConfigError(
                    f"reshape= must return (N, C, h, w); it returned {shape}."
                )
            self.layer_cells = (mapped.shape[-2], mapped.shape[-1])
            return mapped
        if self.reading is None:
            self.reading = read_layout(
                output,
                self.images.shape[0],
                self.size,
                self.layout,
                self.layer,
                prefix_tokens_of(self.model),
            )
        spatial = self.reading.to_spatial(output)
        self.layer_cells = (spatial.shape[-2], spatial.shape[-1])
        return spatial

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
        from lightning_saliency.engine.methods.guided_relu import GuidedReLUMode

        captured: dict[str, Tensor] = {}

        def keep(_module: nn.Module, _inp: Any, out: Tensor) -> Tensor:
            if "out" in captured or "no_grad" in captured:  # a recomputation (checkpointing)
                return out
            if not isinstance(out, Tensor):
                raise SaliencyConfigError(
                    f"the target layer returns a {type(out).__name__}, not a tensor; choose a "
                    "layer that returns one."
                )
            if not torch.is_grad_enabled():  # said by the methods that need the layer
                captured["no_grad"] = out
                return out
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
        output = logits
        logits = self._scores_of_output(output)
        self._forward = {"x": x, "logits": logits, "layer_out": captured.get("out"), "mode": mode}
        self._forward["output"] = output
        self._forward["no_grad"] = "no_grad" in captured
        return self._forward

    def _layer_output(self) -> Tensor:
        """The target layer's output from the shared forward, or the error that says why a
        layer method cannot use it."""
        fwd = self.shared_forward()
        if fwd["no_grad"]:
            raise SaliencyConfigError(
                "the target layer runs with gradients off: the model's forward calls it under "
                "torch.no_grad() (a frozen backbone or linear probe: only layers after the "
                "no_grad block can be explained) or inside "
                "torch.utils.checkpoint(use_reentrant=True) (use use_reentrant=False). Choose a "
                "target_layer= after it."
            )
        if fwd["layer_out"] is None:
            raise SaliencyConfigError(
                "the target layer was not called during the model's forward; pick a layer that "
                "the forward uses (target_layer=...)."
            )
        out: Tensor = fwd["layer_out"]
        return out

    @staticmethod
    def _routing(fwd: dict[str, Any]) -> Any:
        """The forward's ReLU routing, active again for a backward: activation checkpointing
        recomputes the forward there, and must save the same tensors as the first time."""
        mode = fwd["mode"]
        return mode if mode is not None else contextlib.nullcontext()

    @property
    def logits(self) -> Tensor:
        if self._forward is None and self.layer is None:
            with torch.no_grad():
                self._cache.setdefault("logits", self.class_scores(self.images))
            return self._cache["logits"]
        logits: Tensor = self.shared_forward()["logits"]
        return logits

    @property
    def targets(self) -> Tensor:
        if "targets" not in self._cache:
            logits = self.logits
            if self._weights is not None:  # the highest-scoring of the given labels
                weights = self._weights.to(logits.device)
                targets = logits.detach().masked_fill(weights <= 0, float("-inf")).argmax(1)
            elif self._requested_targets is None:
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
        """Sum over the batch of each image's explained score (images are independent in
        eval): its target class's logit, the sum of its labels' logits (multi-hot targets), or
        a target function's score."""
        return self._target_of_output(self.shared_forward()["output"]).sum()

    # -- shared gradients ----------------------------------------------------------------
    def layer_activations(self) -> Tensor:
        """The target layer's output as ``(N, C, h, w)``, detached, float32."""
        return self.spatial(self._layer_output()).detach().float()

    def layer_gradients(self) -> Tensor:
        """d(target logit)/d(layer output) as ``(N, C, h, w)``: one plain backward, cached."""
        if "layer_grad" not in self._cache:
            fwd = self.shared_forward()
            layer_out = self._layer_output()
            keep_graph = self._guided and "guided" not in self._cache
            with self._routing(fwd):
                (grad,) = torch.autograd.grad(
                    self.target_score(), layer_out, retain_graph=keep_graph, allow_unused=True
                )
            if grad is None:  # never a silently zero map
                raise SaliencyConfigError(
                    "the class scores do not depend on the target layer's output through "
                    "autograd (is it detached, or run under torch.no_grad() or "
                    "torch.utils.checkpoint(use_reentrant=True)?); choose another target_layer."
                )
            self._cache["layer_grad"] = self.spatial(grad).detach().float()
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
            with self._routing(fwd):
                (grad,) = torch.autograd.grad(self.target_score(), fwd["x"], allow_unused=True)
            if grad is None:  # never a silently zero map
                raise SaliencyConfigError(
                    "no input gradient: the class scores do not depend on the input through "
                    "autograd (the forward runs part of the model under torch.no_grad(), a "
                    "frozen backbone or linear probe?)."
                )
            self._cache["guided"] = grad.detach().float()
        return self._cache["guided"]
