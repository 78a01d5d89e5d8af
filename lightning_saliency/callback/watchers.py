"""EarlyStopping on a saliency key counts logged validations only.

Lightning's ``EarlyStopping`` checks its key at every validation. With
``SaliencyCallback(every_n_epochs=k)`` a saliency key changes only at every k-th validation;
in between the callback keeps the last value in the metrics (present and finite, so
``strict=True`` and ``check_finite=True`` hold), and ``EarlyStopping`` would count each
unchanged value against its patience. :class:`StaleCheckGuard` undoes exactly that count: the
callback tells it, at a validation where a watched key is stale, to snapshot each watching
``EarlyStopping``'s public ``state_dict()``; the guard, which Lightning calls after every other
callback, restores it once the check has run (at ``on_validation_end`` or at
``on_train_epoch_end``, whichever the ``EarlyStopping`` uses), and takes back the stop that
check asked for. So ``patience=p`` means p *logged* validations without improvement.

``ModelCheckpoint`` needs no guard: an unchanged value is never better than itself, so with its
default ``save_top_k=1`` it saves only at logged validations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from typing_extensions import override


def watching(callbacks: Sequence[L.Callback], prefix: str) -> list[EarlyStopping]:
    """The ``EarlyStopping`` callbacks whose ``monitor`` is a key under ``prefix/``."""
    return [
        cb
        for cb in callbacks
        if isinstance(cb, EarlyStopping)
        and not isinstance(cb, StaleCheckGuard)
        and str(cb.monitor).startswith(prefix + "/")
    ]


class StaleCheckGuard(EarlyStopping):
    """Restores watching ``EarlyStopping`` callbacks after a check on a stale key.

    It is an ``EarlyStopping`` only so that Lightning calls it where it calls those: in the
    monitoring phase of ``on_train_epoch_end``, after the module's own hook, and so after the
    user's ``EarlyStopping`` that it follows in the callback list. It never stops a run itself
    and saves no state.

    Example:
        >>> guard = StaleCheckGuard([EarlyStopping("saliency/gradcam/consensus")])
        >>> guard.holding
        False
    """

    def __init__(self, watchers: Sequence[EarlyStopping]) -> None:
        super().__init__(monitor="lightning_saliency_guard", strict=False, check_finite=False)
        self.watchers = list(watchers)
        self._held: dict[int, dict[str, Any]] = {}
        self._stop_before = False
        self._others: dict[int, int] = {}  # other EarlyStopping callbacks -> stopped_epoch

    @property
    @override
    def state_key(self) -> str:
        return f"StaleCheckGuard{[w.monitor for w in self.watchers]}"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pass

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def hold(self, trainer: L.Trainer, stale: set[str]) -> None:
        """Snapshot each watcher whose key is in ``stale``, before it checks."""
        self._stop_before = bool(trainer.should_stop)
        for watcher in self.watchers:
            if watcher.monitor in stale:
                self._held[id(watcher)] = watcher.state_dict()
        self._others = {
            id(cb): cb.stopped_epoch
            for cb in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(cb, EarlyStopping) and cb is not self and id(cb) not in self._held
        }

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release(trainer, at_epoch_end=False)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release(trainer, at_epoch_end=True)

    def _release(self, trainer: L.Trainer, at_epoch_end: bool) -> None:
        for watcher in self.watchers:
            before = self._held.get(id(watcher))
            if before is None:
                continue
            checked = (watcher.wait_count, watcher.stopped_epoch) != (
                before["wait_count"],
                before["stopped_epoch"],
            )
            if not (checked or at_epoch_end):
                continue  # it checks at the end of the training epoch: wait for that
            stopped_here = checked and watcher.wait_count >= watcher.patience
            watcher.load_state_dict(before)
            if stopped_here and not (self._stop_before or self._others_stopped(trainer)):
                trainer.should_stop = False
            del self._held[id(watcher)]

    def _others_stopped(self, trainer: L.Trainer) -> bool:
        """Whether another EarlyStopping asked for the stop too (that stop stands)."""
        return any(
            isinstance(cb, EarlyStopping)
            and self._others.get(id(cb), cb.stopped_epoch) != cb.stopped_epoch
            for cb in trainer.callbacks  # type: ignore[attr-defined]
        )
