"""What the callback refuses at ``setup``, before the model is placed: :func:`refuse_unsupported`.

No logger, FSDP1 and DeepSpeed are errors that name the fix. What depends on the model or the
data is checked later, on the real batches, by the dry run (:mod:`.intake`, :mod:`.dry_run`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_saliency import console
from lightning_saliency.errors import SaliencyConfigError


def refuse_unsupported(trainer: L.Trainer) -> None:
    """Raises:
    SaliencyConfigError: no logger, FSDP1 or DeepSpeed (FSDP2 and DDP are supported).
    """
    if not trainer.loggers:
        raise SaliencyConfigError(
            "SaliencyCallback needs a logger to write images to; pass "
            "Trainer(logger=TensorBoardLogger('logs')) (or CSVLogger for PNG files)."
        )
    strategy = type(trainer.strategy).__name__
    if "FSDP" in strategy:  # FSDP1; FSDP2 is ModelParallelStrategy with fully_shard
        raise SaliencyConfigError(
            f"SaliencyCallback does not support {strategy} (FSDP1): Lightning runs it on GPUs "
            "only, where this project cannot test it. Shard with FSDP2 instead: "
            "strategy=ModelParallelStrategy() and fully_shard() in configure_model(), which "
            "the callback supports (all ranks explain together); or use strategy='ddp'."
        )
    if "DeepSpeed" in strategy:
        raise SaliencyConfigError(
            f"SaliencyCallback does not support {strategy}: DeepSpeed runs the model inside "
            "its own engine, where the callback cannot take input gradients with the "
            "parameters frozen. Use FSDP2 (strategy=ModelParallelStrategy() and fully_shard() "
            "in configure_model()) or strategy='ddp'."
        )


def without_validation(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    """Whether a fit runs no validation (no ``validation_step``, or ``limit_val_batches=0``),
    so the callback explains at the end of training epochs, on training samples (said)."""
    has_val = is_overridden("validation_step", pl_module)
    if has_val and trainer.limit_val_batches != 0:
        return False
    why = "no validation_step" if not has_val else "limit_val_batches=0"
    console.warn(
        f"SaliencyCallback: {why}, so saliency is computed at the end of training epochs "
        "instead, on samples from the training batches (or samples=...)."
    )
    return True
