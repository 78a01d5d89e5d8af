"""Training with the callback on, against training without it, on a device and precision:
bitwise the same weights, optimizer state and RNG, and the device memory it adds.

    python benchmarks/training_unchanged.py      # cuda when present: 32-true, bf16-mixed
    python benchmarks/training_unchanged.py --device cpu --precision 32-true --epochs 1

The test suite checks this on the CPU (``tests/test_callback.py``); this script is the same
check on a GPU, where the suite does not run. Each precision fits the demo's model and data
three times from the same seed: twice without the callback (so that a GPU that does not
reproduce its own training is told apart from a callback that changes it) and once with it,
every epoch logged. Prints one line per precision and exits 1 when training changed or the
callback switched a method off (then it did not check what it was meant to).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_saliency import SaliencyCallback
from lightning_saliency.demos import ShortcutDataModule
from lightning_saliency.demos.classifier import ShapesClassifier


def fit(device: torch.device, precision: str, epochs: int, with_callback: bool) -> dict[str, Any]:
    """One seeded demo fit; what training leaves behind, on the host, and the peak memory."""
    L.seed_everything(0)
    model = ShapesClassifier()
    callback = SaliencyCallback(every_n_epochs=1) if with_callback else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="gpu" if device.type == "cuda" else "cpu",
            devices=1,
            precision=precision,  # type: ignore[arg-type]
            deterministic="warn",  # max and average pooling have no deterministic CUDA backward
            logger=TensorBoardLogger(tmp),
            callbacks=[callback] if callback is not None else [],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, ShortcutDataModule())
        optimizer = trainer.optimizers[0].state_dict()
    state = {f"param {n}": p.detach().cpu().clone() for n, p in model.named_parameters()}
    state |= {f"buffer {n}": b.detach().cpu().clone() for n, b in model.named_buffers()}
    for pid, entry in optimizer["state"].items():
        for key, value in entry.items():
            state[f"optimizer {pid} {key}"] = torch.as_tensor(value).cpu().clone()
    state["cpu rng"] = torch.get_rng_state()
    if device.type == "cuda":
        state["cuda rng"] = torch.cuda.get_rng_state(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    logged = len(callback.history) if callback is not None else 0
    off = callback.switched_off if callback is not None else {}
    return {"state": state, "peak": peak, "logged": logged, "switched_off": off}


def differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """The entries that are not bitwise equal (missing ones included).

    >>> differences({"w": torch.ones(2)}, {"w": torch.ones(2)})
    []
    >>> differences({"w": torch.ones(2)}, {"w": torch.zeros(2), "v": torch.ones(1)})
    ['v', 'w']
    """
    names = sorted(set(a) | set(b))
    return [n for n in names if n not in a or n not in b or not torch.equal(a[n], b[n])]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--epochs", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    changed = False
    for precision in args.precision:
        plain = fit(device, precision, args.epochs, with_callback=False)
        again = fit(device, precision, args.epochs, with_callback=False)
        watched = fit(device, precision, args.epochs, with_callback=True)
        own = differences(plain["state"], again["state"])
        by_callback = differences(plain["state"], watched["state"])
        added = (watched["peak"] - plain["peak"]) / 2**20
        if own:
            verdict = f"NOT JUDGED: training without the callback does not reproduce ({own[:3]})"
        elif by_callback:
            verdict = f"CHANGED by the callback: {len(by_callback)} entries ({by_callback[:3]})"
            changed = True
        else:
            verdict = f"unchanged ({len(plain['state'])} entries bitwise equal)"
        memory = f"; peak device memory +{added:.0f} MB" if device.type == "cuda" else ""
        health = f"; the callback logged {watched['logged']} runs"
        if watched["switched_off"]:  # a check of nothing is no check: say what did not run
            health += f", switched off: {watched['switched_off']}"
            changed = True
        print(f"{device} {precision}, {args.epochs} epochs: {verdict}{memory}{health}", flush=True)
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
