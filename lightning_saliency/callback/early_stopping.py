"""``SaliencyEarlyStopping``: early stopping on a saliency key, counting logged runs only.

Between logged runs ``SaliencyCallback`` keeps each key's last value in the metrics, so the
key is present and finite at every validation (``strict=True`` and ``check_finite=True``
hold). A plain ``EarlyStopping`` would count every such unchanged value against its patience:
with ``every_n_epochs=2``, a method's own cadence, or a method switched off after a failure,
the monitor would stop the run. :class:`SaliencyEarlyStopping` takes the same arguments and
checks only at the validation runs where its key was logged anew, so ``patience=p`` means p
*logged* runs without improvement. It asks the callbacks that log the key, through their
public :meth:`~lightning_saliency.SaliencyCallback.logged_anew`, and changes no other
callback's state.

A plain ``EarlyStopping`` on a saliency key is refused when the fit starts
(:func:`refuse_plain_early_stopping`), naming this class. ``ModelCheckpoint`` needs nothing:
an unchanged value is never better than itself, so with its default ``save_top_k=1`` it saves
at logged runs only.

Examples:
    >>> stop = SaliencyEarlyStopping(monitor="saliency/gradcam/corner_enrichment", mode="min")
    >>> stop.patience
    3
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from typing_extensions import override

from lightning_saliency.errors import SaliencyConfigError


@runtime_checkable
class LogsKeys(Protocol):
    """A callback that holds its keys in the metrics between the runs that log them."""

    def logged_anew(self, key: str) -> bool | None:
        """Whether ``key`` was logged anew at the latest validation run (``False``: its last
        value was held), or ``None`` if the key is not this callback's."""
        ...


class SaliencyEarlyStopping(EarlyStopping):
    """``EarlyStopping`` (the same arguments) whose patience counts the validation runs where
    ``SaliencyCallback`` logged its key anew; at the others it does not check."""

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._logged_anew(trainer):
            super().on_validation_end(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._logged_anew(trainer):
            super().on_train_epoch_end(trainer, pl_module)

    def _logged_anew(self, trainer: L.Trainer) -> bool:
        """Whether the key was logged anew; a key no callback holds is checked as usual."""
        callbacks: list[L.Callback] = trainer.callbacks  # type: ignore[attr-defined]
        answers = [cb.logged_anew(self.monitor) for cb in callbacks if isinstance(cb, LogsKeys)]
        known = [answer for answer in answers if answer is not None]
        return not known or any(known)


def refuse_plain_early_stopping(callbacks: Sequence[L.Callback], prefixes: Sequence[str]) -> None:
    """Raises:
    SaliencyConfigError: an ``EarlyStopping`` that is not a :class:`SaliencyEarlyStopping`
        watches a key under one of ``prefixes``.
    """
    for callback in callbacks:
        if isinstance(callback, SaliencyEarlyStopping) or not isinstance(callback, EarlyStopping):
            continue
        if any(str(callback.monitor).startswith(prefix + "/") for prefix in prefixes):
            raise SaliencyConfigError(
                f"EarlyStopping(monitor={callback.monitor!r}) would count the validation runs "
                "where SaliencyCallback logs nothing new (its last value is held: "
                "every_n_epochs > 1, method_every_n_epochs, a method switched off) against its "
                "patience; use lightning_saliency.SaliencyEarlyStopping with the same "
                "arguments, which counts logged runs only."
            )
