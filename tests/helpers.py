"""Trainer runs and TensorBoard reading shared by the callback tests."""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_saliency.data import ShortcutDataModule
from lightning_saliency.demo import ShapesClassifier


def tiny_datamodule(**kwargs: Any) -> ShortcutDataModule:
    defaults = dict(n_train=64, n_val=32, size=32, batch_size=16)
    defaults.update(kwargs)
    return ShortcutDataModule(**defaults)


def tiny_model(**kwargs: Any) -> ShapesClassifier:
    return ShapesClassifier(width=kwargs.pop("width", 8), **kwargs)


def trainer(log_dir: str | None, callbacks: list, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(log_dir, name="run") if log_dir else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def read_events(log_dir: str) -> EventAccumulator:
    """All images and scalars of the (single) run under ``log_dir``."""
    runs = sorted(
        {
            os.path.dirname(p)
            for p in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)
        }
    )
    assert len(runs) == 1, runs
    acc = EventAccumulator(runs[0], size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def state_of(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    }
