"""Trainer runs and TensorBoard reading shared by the callback tests."""

from __future__ import annotations

import glob
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_saliency.demos import ShortcutDataModule
from lightning_saliency.demos.classifier import ShapesClassifier


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


def read_events(log_dir: str, thresholds: bool = False) -> EventAccumulator:
    """All images and scalars of the (single) run under ``log_dir``, or of its thresholds' run
    (``<run>/thresholds``, written beside it)."""
    runs = sorted(
        {
            os.path.dirname(p)
            for p in glob.glob(f"{log_dir}/**/events.out.tfevents.*", recursive=True)
            if (os.path.basename(os.path.dirname(p)) == "thresholds") == thresholds
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


# -- comparing maps, and the model before and after explaining ------------------------------------
def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max scaling (pytorch-grad-cam normalises its maps this way)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp(min=1e-12)).reshape(maps.shape)


def per_image_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each pair of maps."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def writer_threads() -> list[str]:
    """The callback's writer threads alive now (one runs from setup to teardown)."""
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("lightning-saliency")]


def hook_count(model: torch.nn.Module) -> int:
    """Hooks registered on the model's modules. torch has no public way to count them, so this
    reads its hook dictionaries (the one private read the tests allow)."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(getattr(m, "_backward_pre_hooks", {}))
        for m in model.modules()
    )


def snapshot(model: torch.nn.Module) -> dict[str, Any]:
    """Everything explaining must leave as it was: weights, grads, buffers, modes, RNG."""
    import random

    import numpy as np

    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": hook_count(model),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    import numpy as np

    for key in ("params", "grads", "buffers"):
        assert before[key].keys() == after[key].keys(), key
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name]), (key, name)
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["rng"][0], after["rng"][0])
    assert before["rng"][1] == after["rng"][1]
    assert np.array_equal(before["rng"][2], after["rng"][2])


def options_table() -> Any:
    """``docs/options_table.py``, the generator of the methods page's options table, as a module."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "options_table.py")
    spec = importlib.util.spec_from_file_location("options_table", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wandb_offline_records(path: Any) -> list[Any]:
    """The records of an offline W&B run file (``run-*.wandb``), as W&B's protobuf ``Record``s.
    The file is a LevelDB-style log (wandb 0.31 has no Python reader): a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header (CRC, length, type: full, first, middle,
    last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B", path
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        body, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = body
        elif kind in (3, 4):
            pending += body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out
