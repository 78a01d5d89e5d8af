"""Catch a planted shortcut while it is being learnt.

Trains a small CNN on generated shapes with a planted cue that gives the class away
(``--clean``: the cue is there but carries no information), with ``SaliencyCallback`` and
TensorBoard. ``--shortcut`` picks the cue: a patch in the top-left corner (``corner``), a
class-tinted background (``background``) or a small mark stamped at a random place (``mark``).
Each epoch prints accuracy on a split where the shortcut holds and one where it lies, next to
the Grad-CAM scores; the alarm fires when the model reads the cue. ``--no-masks`` hides the
object masks from the callback, as with most real data sets.

    lightning-saliency demo                     # the corner patch
    lightning-saliency demo --shortcut mark --no-masks
    lightning-saliency demo --clean             # the control
    lightning-saliency demo --data cifar10 --data-dir ~/data   # a real data set

(``python examples/shortcut_demo.py`` runs the same from a checkout.)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from lightning_saliency.callback import SaliencyCallback
from lightning_saliency.cli.parser import DEFAULT_METHODS
from lightning_saliency.demos import SHORTCUT_KINDS, ShortcutDataModule
from lightning_saliency.demos.classifier import ShapesClassifier, demo_trainer

TABLE_SCORES = (
    "object_enrichment",
    "corner_enrichment",
    "small_cue_reliance",
    "colour_reliance",
)


class EpochTable(L.Callback):
    """Prints one line per validation epoch: accuracies and the Grad-CAM scores."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.rows: list[dict[str, float]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items()}
        row = {
            "epoch": trainer.current_epoch,
            "acc": m.get("val_acc/dataloader_idx_0", m.get("val_acc", float("nan"))),
            "acc_broken": m.get("val_acc/dataloader_idx_1", float("nan")),
            "alarms": m.get("saliency_alarms/count", 0.0),
        }
        prefix = f"saliency/{self.method}/"
        for key, value in m.items():  # every score of the method, without per-class ones
            if key.startswith(prefix) and "/" not in key[len(prefix) :]:
                row[key[len(prefix) :]] = value
        for score in TABLE_SCORES:
            row.setdefault(score, float("nan"))
        self.rows.append(row)

    def print(self) -> None:
        """The whole table, after training: the alarm lines streamed during the run (on the
        ``lightning_saliency`` logger) never land inside it."""
        print(
            f"\n{'epoch':>5} {'acc':>6} {'acc_broken':>10} "
            + " ".join(f"{s:>19}" for s in TABLE_SCORES)
            + f" {'alarms':>6}"
        )
        for row in self.rows:
            print(
                f"{row['epoch']:>5} {row['acc']:>6.2f} {row['acc_broken']:>10.2f} "
                + " ".join(f"{row[s]:>19.2f}" for s in TABLE_SCORES)
                + f" {int(row['alarms']):>6}"
            )


def quiet_third_parties() -> None:
    """The demo's output is its own: no Lightning cloud tip, no torch deprecation notice."""
    import logging
    import warnings

    class NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            text = record.getMessage()
            return "Tip:" not in text and "estimate number of stepping batches" not in text

    for name in ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero"):
        logging.getLogger(name).addFilter(NoTips())
    warnings.filterwarnings("ignore", message=r".*treespec.*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")


class Cifar10DataModule(L.LightningDataModule):
    """CIFAR-10 as ``{"image", "label"}`` batches; downloads only when asked (``--download``)."""

    classes = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def __init__(
        self, data_dir: str, batch_size: int = 128, download: bool = False, limit: int | None = None
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.download, self.limit = (
            data_dir,
            batch_size,
            download,
            limit,
        )

    def setup(self, stage: str | None = None) -> None:
        from torchvision import datasets, transforms

        tf = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))]
        )
        self.train_set = _AsDict(
            datasets.CIFAR10(self.data_dir, True, tf, download=self.download), self.limit
        )
        self.val_set = _AsDict(
            datasets.CIFAR10(self.data_dir, False, tf, download=self.download), self.limit
        )

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class _AsDict(torch.utils.data.Dataset[dict[str, Any]]):
    def __init__(self, dataset: Any, limit: int | None) -> None:
        self.dataset, self.limit = dataset, limit
        self.transform = getattr(dataset, "transform", None)  # lets the callback find Normalize
        self.classes = getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return min(len(self.dataset), self.limit or len(self.dataset))

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.dataset[i]
        return {"image": image, "label": label}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lightning-saliency demo", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--clean", action="store_true", help="no shortcut: the control run")
    p.add_argument(
        "--shortcut",
        choices=SHORTCUT_KINDS,
        default="corner",
        help="the planted cue: a corner patch, a class-tinted background, a mark at a random place",
    )
    p.add_argument(
        "--no-masks", action="store_true", help="hide the object masks (most data sets have none)"
    )
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument(
        "--shortcut-p",
        type=float,
        default=1.0,
        help="share of training images whose patch gives the class away",
    )
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=256)
    p.add_argument("--size", type=int, default=48, help="image side in pixels")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--logdir", default="logs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", choices=("shapes", "cifar10"), default="shapes")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--download", action="store_true", help="allow downloading --data cifar10")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    L.seed_everything(args.seed, workers=True)
    if args.data == "cifar10":
        dm: L.LightningDataModule = Cifar10DataModule(
            args.data_dir, download=args.download, limit=args.limit
        )
        model = ShapesClassifier(num_classes=10)
        name = "cifar10"
    else:
        dm = ShortcutDataModule(
            shortcut=not args.clean,
            shortcut_p=args.shortcut_p,
            n_train=args.n_train,
            n_val=args.n_val,
            size=args.size,
            seed=args.seed,
            kind=args.shortcut,
            masks=not args.no_masks,
        )
        model = ShapesClassifier(num_classes=4)
        name = f"{args.shortcut}-clean" if args.clean else args.shortcut
    saliency = SaliencyCallback(
        methods=args.methods.split(","), num_samples=args.num_samples, seed=args.seed
    )
    table = EpochTable(args.methods.split(",")[0])
    quiet_third_parties()
    logger = TensorBoardLogger(args.logdir, name=name, default_hp_metric=False)
    trainer = demo_trainer(args.epochs, logger, [saliency, table])
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        table.print()
    alarms = sorted({f"{e.method}/{e.score}" for e in saliency.alarms if e.state != "cleared"})
    print(f"\nTrained {args.epochs} epochs in {seconds:.0f} s.")
    print("Alarms raised: " + (", ".join(alarms) if alarms else "none"))
    print(f"Logs:     {logger.log_dir}")
    print(f"Timeline: {saliency.timeline_path}")
    print(f"Open:     tensorboard --logdir {args.logdir} --samples_per_plugin images=500")
    return {
        "rows": table.rows,
        "alarms": alarms,
        "timeline": saliency.timeline_path,
        "log_dir": logger.log_dir,
        "seconds": seconds,
        "callback": saliency,
    }
