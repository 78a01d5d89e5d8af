"""How the callback calls the engine: its targets, options, target layer and warm starts.

:class:`Explainer` runs :func:`~lightning_saliency.explain` on the fixed samples as the
configuration says, and keeps what the engine learns across runs (the target layer's name,
chosen once by the dry run, and each method's warm start, such as IG's step count under
``"auto"``). If the pass as a whole fails it tries each method alone, so only the methods that
fail by themselves are switched off. For methods that factorise all samples jointly (DFF) it
also takes the layer's activations and factorises given activations (:mod:`.sharing` gathers
them across DDP ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_saliency.callback.config import SaliencyConfig
from lightning_saliency.callback.gathering import merge
from lightning_saliency.callback.samples import FixedSamples
from lightning_saliency.engine.explanations import (
    Explanations,
    explain,
    explanation_context,
    layer_activations,
)
from lightning_saliency.engine.layers import LayerSpec
from lightning_saliency.engine.methods import METHODS

Failures = dict[str, BaseException]


class Explainer:
    """The engine as the callback calls it.

    Attributes:
        layer_name: the target layer the dry run chose (``None`` before it ran, or if no
            method needs one); saved in the callback's state.
        warm_start: method -> what it keeps between runs; saved in the callback's state.
    """

    def __init__(self, config: SaliencyConfig) -> None:
        self.config = config
        self.layer_name: str | None = None
        self.warm_start: dict[str, dict[str, Any]] = {}

    @property
    def layer(self) -> LayerSpec:
        """The target layer: the user's, else the one the dry run chose."""
        return self.config.target_layer or self.layer_name

    def explain(
        self, model: nn.Module, samples: FixedSamples, methods: Sequence[str]
    ) -> tuple[Explanations | None, Failures]:
        """Explain ``samples`` with ``methods`` together; if the pass as a whole fails, each
        method alone. Returns the explanations (``None`` if none worked) and the failures."""
        try:
            out = self._explain(model, samples, methods)
            return out, dict(out.errors)
        except Exception as whole:
            if len(methods) == 1:
                return None, {methods[0]: whole}
        kept: Explanations | None = None
        errors: Failures = {}
        for method in methods:
            try:
                alone = self._explain(model, samples, [method])
            except Exception as err:
                errors[method] = err
                continue
            errors.update(alone.errors)
            kept = merge(kept, alone)
        return kept, errors

    def activations(self, model: nn.Module, samples: FixedSamples) -> Tensor:
        """The target layer's ``(N, C, h, w)`` activations of ``samples``."""
        found, _ = layer_activations(
            model,
            samples.images,
            self.layer,
            layout=self.config.layout,
            reshape=self.config.reshape,
            output_transform=self.config.output_transform,
        )
        return found

    def factorise(
        self,
        model: nn.Module,
        activations: Tensor,
        size: tuple[int, int],
        methods: Sequence[str],
        into: Explanations,
    ) -> Failures:
        """Each joint method's maps of all samples from their gathered ``activations``, put
        into ``into``; returns the failures (the same inputs on every rank: the same
        outcome)."""
        errors: Failures = {}
        for method in methods:
            compute = METHODS[method].joint
            assert compute is not None
            memory = self.warm_start.setdefault(method, {})
            try:
                with explanation_context(model):
                    options = self.config.method_options[method]
                    maps, extras = compute(activations, model, size, options, memory)
            except Exception as err:
                errors[method] = err
                continue
            into.maps[method] = maps.detach().float()
            into.extras.update(extras)
        return errors

    def _explain(
        self, model: nn.Module, samples: FixedSamples, methods: Sequence[str]
    ) -> Explanations:
        return explain(
            model,
            samples.images,
            self.config.targets(samples.labels),
            methods,
            self.layer,
            on_error="collect",
            method_options={m: self.config.method_options[m] for m in methods},
            seed=self.config.seed,
            warm_start=self.warm_start,
            layout=self.config.layout,
            reshape=self.config.reshape,
            output_transform=self.config.output_transform,
        )
