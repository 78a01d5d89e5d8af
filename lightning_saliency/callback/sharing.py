"""The ranks of a run, as one logged run sees them: :class:`Sharing`.

The pipeline asks two things of the ranks and never looks at the world size itself:

- :meth:`Sharing.explain`: under DDP each rank explains its share of the samples
  (``samples[r::W]``) and the shares are gathered (:mod:`.gathering`), so W ranks do 1/W of
  the work each and hold the explanations of a single-device run; methods that factorise all
  samples jointly (DFF) share the forward: each rank takes its share's layer activations, they
  are gathered, and every rank factorises all of them alike. One process, another strategy
  (FSDP2: every rank must be in every forward) or fewer samples than ranks: every rank
  explains all samples.
- :meth:`Sharing.any_rank`: which flags are raised on any rank, in one collective (the failure
  policy's agreement); one process answers alone.

Examples:
    >>> Sharing().any_rank([True, False])
    [True, False]
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import Tensor, nn

from lightning_saliency.callback.explainer import Explainer, Failures
from lightning_saliency.callback.gathering import (
    gather_activations,
    gather_explanations,
    merge,
    share_of,
    shareable,
)
from lightning_saliency.callback.samples import FixedSamples
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import METHODS


class Sharing:
    """The ranks of a run: ``strategy`` (``None``: one process), this ``rank`` of ``world``,
    and whether the samples are split between them (``split``: plain DDP)."""

    def __init__(
        self,
        strategy: Strategy | None = None,
        rank: int = 0,
        world: int = 1,
        split: bool = False,
    ) -> None:
        self.strategy = strategy
        self.rank = rank
        self.world = world
        self.split = split and world > 1

    @classmethod
    def of(cls, trainer: L.Trainer) -> Sharing:
        """The trainer's ranks; the samples are split under DDP only."""
        strategy = trainer.strategy
        split = isinstance(strategy, DDPStrategy)
        return cls(strategy, trainer.global_rank, trainer.world_size, split)

    def any_rank(self, flags: Sequence[bool]) -> list[bool]:
        """Flag ``i`` is raised if it is raised on any rank: one sum over the ranks, the same
        answer on every rank."""
        if self.world == 1 or self.strategy is None or not flags:
            return list(flags)
        raised = torch.tensor([float(f) for f in flags], device=self.strategy.root_device)
        total = self.strategy.reduce(raised, reduce_op="sum")
        return [bool(v > 0) for v in total.tolist()]

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over the ranks (one process: ``values`` itself)."""
        if self.world == 1 or self.strategy is None:
            return values
        return self.strategy.reduce(values, reduce_op="sum")

    def explain(
        self,
        explainer: Explainer,
        model: nn.Module,
        samples: FixedSamples,
        methods: Sequence[str],
    ) -> tuple[Explanations | None, Failures]:
        """The explanations of all ``samples`` by ``methods`` on every rank, and what failed
        (on any rank, under DDP)."""
        if not self.split or len(samples) < self.world:
            return explainer.explain(model, samples, methods)
        split, whole = shareable(methods)
        mine = samples.subset(share_of(len(samples), self.rank, self.world))
        size = (int(samples.images.shape[-2]), int(samples.images.shape[-1]))
        shared: Explanations | None = None
        errors: Failures = {}
        if split:
            local, local_errors = explainer.explain(model, mine, split)
            shared, errors = gather_explanations(
                self._gathers(),
                local,
                local_errors,
                split,
                len(samples),
                self.rank,
                self.world,
                size,
                samples.images.device,
            )
        joint = [m for m in whole if METHODS[m].joint is not None] if shared is not None else []
        if joint:
            assert shared is not None
            errors.update(self._factorise(explainer, model, samples, mine, size, joint, shared))
        rest: Explanations | None = None
        alone = [m for m in whole if m not in joint]
        if alone:
            rest, rest_errors = explainer.explain(model, samples, alone)
            errors.update(rest_errors)
        return merge(shared, rest), errors

    def _factorise(
        self,
        explainer: Explainer,
        model: nn.Module,
        samples: FixedSamples,
        mine: FixedSamples,
        size: tuple[int, int],
        joint: Sequence[str],
        shared: Explanations,
    ) -> Failures:
        """The joint methods under DDP: this rank's share (``mine``) of the layer's
        activations, gathered, factorised alike on every rank into ``shared``."""
        local = None
        failure: BaseException | None = None
        try:
            local = explainer.activations(model, mine)
        except Exception as err:
            failure = err
        everything = gather_activations(
            self._gathers(), local, len(samples), self.rank, self.world, samples.images.device
        )
        if everything is None:
            error = failure or RuntimeError("the layer's activations failed on another rank")
            return {m: error for m in joint}
        return explainer.factorise(model, everything, size, joint, shared)

    def _gathers(self) -> Strategy:
        assert self.strategy is not None
        return self.strategy
