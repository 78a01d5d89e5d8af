"""Run by tests/test_distributed.py: 2 CPU processes (gloo) with SaliencyCallback.

Usage: python tests/ddp_script.py STRATEGY OUT_DIR [fail|figure]

With ``fail``, Integrated Gradients raises on rank 1 only, mid-run (after the setup's dry run);
with ``figure``, Grad-CAM's pictures fail on rank 0 (the only rank that draws), from the
second logged run on.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(__file__))
import dataclasses  # noqa: E402

from helpers import tiny_model  # noqa: E402
from torch.utils.data import DataLoader, Subset, SubsetRandomSampler  # noqa: E402

import lightning_saliency.callback.explainer as explainer_module  # noqa: E402
from lightning_saliency import SaliencyCallback, explain  # noqa: E402
from lightning_saliency.demos import ShortcutDataModule  # noqa: E402
from lightning_saliency.engine.methods import METHODS  # noqa: E402
from lightning_saliency.publish.publisher import Publisher  # noqa: E402

WRITTEN = {"pictures": 0}
# (samples, methods, rows through the model's forward) of each explanation call
EXPLAINED: list[tuple[int, list[str], int]] = []
_publish = Publisher.images


def forward_rows(model, call):
    """``call()``'s result and the rows it sent through ``model``'s forward."""
    rows = [0]

    def count(module, args):
        rows[0] += int(args[0].shape[0])

    handle = model.register_forward_pre_hook(count)
    try:
        return call(), rows[0]
    finally:
        handle.remove()


def counting_explain(model, images, *args, **kwargs):
    """Counts, per process, the samples and forward rows of each explain() call."""
    methods = args[1] if len(args) > 1 else kwargs.get("methods")
    out, rows = forward_rows(model, lambda: explain(model, images, *args, **kwargs))
    EXPLAINED.append((int(images.shape[0]), list(methods), rows))
    return out


_activations = explainer_module.layer_activations


def counting_activations(model, images, *args, **kwargs):
    """Counts the samples whose layer activations the callback takes for DFF, per process."""
    out, rows = forward_rows(model, lambda: _activations(model, images, *args, **kwargs))
    EXPLAINED.append((int(images.shape[0]), ["dff"], rows))
    return out


if __name__ in ("__main__", "__mp_main__"):  # run as the script (or its spawned children)
    explainer_module.explain = counting_explain
    explainer_module.layer_activations = counting_activations

if __name__ in ("__main__", "__mp_main__") and len(sys.argv) > 3 and sys.argv[3] == "fail":
    _ig = METHODS["integrated_gradients"]

    CALLS = {"ig": 0}

    def failing_on_rank_one(session, options):
        CALLS["ig"] += 1
        if int(os.environ.get("LOCAL_RANK", "0")) == 1 and CALLS["ig"] > 1:
            raise RuntimeError("IG broke on rank 1")
        return _ig.compute(session, options)

    METHODS["integrated_gradients"] = dataclasses.replace(_ig, compute=failing_on_rank_one)


if __name__ in ("__main__", "__mp_main__") and len(sys.argv) > 3 and sys.argv[3] == "figure":
    # Grad-CAM's pictures fail, mid-run; pictures are drawn on rank zero only, so the failure
    # happens there alone.
    import lightning_saliency.viz.figures as figures_module

    _tiles = figures_module.method_tiles
    DRAWN = {"gradcam": 0}

    def failing_gradcam_tiles(method, *args, **kwargs):
        if method == "gradcam":
            DRAWN["gradcam"] += 1
            if DRAWN["gradcam"] > 1:
                raise RuntimeError("Grad-CAM's picture broke on rank 0")
        return _tiles(method, *args, **kwargs)

    figures_module.method_tiles = failing_gradcam_tiles


def counting_images(self, pictures, step):
    """Counts, per process, the pictures handed to the loggers."""
    WRITTEN["pictures"] += len(pictures)
    _publish(self, pictures, step)


Publisher.images = counting_images


class CountingCallback(SaliencyCallback):
    """Records, per rank, how many pictures this process wrote and what it scored."""

    def __init__(self, out_dir: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def last_run_rows(self):
        """Rows this rank explained per method in the last logged run (the two last calls:
        the shared map methods and DFF's layer activations, both on this rank's share)."""
        rows = {}
        for count, methods, forwards in EXPLAINED[-2:]:
            for method in methods:
                rows[method] = count
            rows["forward_rows"] = rows.get("forward_rows", 0) + forwards
        return rows

    def maps_match_explain(self, pl_module):
        """The gathered maps of the last logged run against explain() of all the samples on
        the same weights (nothing trains after the last validation)."""
        samples = self.fixed_samples.to(pl_module.device)
        methods = list(self.explanations.maps)
        fresh = explain(
            pl_module, samples.images, samples.labels, methods, self.layer_name, ig_steps=8
        )
        diffs = {m: float((fresh[m] - self.explanations[m]).abs().max()) for m in methods}
        if "dff" in methods:  # concepts keep their order across epochs: compare the sets
            diffs["dff"] = float(
                (fresh["dff"].sum(1) - self.explanations["dff"].sum(1)).abs().max()
            )
        logits = float((fresh.logits - self.explanations.logits).abs().max())
        return diffs | {"logits": logits}

    def on_fit_end(self, trainer, pl_module):
        super().on_fit_end(trainer, pl_module)
        record = {
            "rank": trainer.global_rank,
            "written": WRITTEN["pictures"],
            "explained": sorted(self.history[-1].means),
            "history": [h.means for h in self.history],
            "alarm_events": [(e.epoch, e.method, e.score, e.state) for e in self.alarms],
            "alarms": float(
                trainer.callback_metrics.get("saliency_alarms/count", torch.tensor(-1.0))
            ),
            "indices": self.fixed_samples.indices,
            "images_sum": float(self.fixed_samples.images.double().sum()),
            "switched_off": sorted(self.switched_off),
            "last_run_rows": self.last_run_rows(),
            "maps_match_explain": self.maps_match_explain(pl_module),
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


VAL_INDICES = list(range(8, 32))


class SubsetVal(ShortcutDataModule):
    """The val loader reads a subset (k-fold style) in order; under DDP Lightning gives each
    rank a DistributedSampler over it, and the callback plans which rank copies which sample."""

    def val_dataloader(self):
        return DataLoader(Subset(self.val_set, VAL_INDICES), batch_size=8)


def subset_datamodule():
    return SubsetVal(n_train=64, n_val=32, size=32, batch_size=16)


class RandomSubsetVal(ShortcutDataModule):
    """The val loader samples a subset at random (k-fold style): no fixed order, so the
    samples are rank zero's first rows, shared with every rank."""

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=8, sampler=SubsetRandomSampler(VAL_INDICES))


def main() -> None:
    strategy, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    L.seed_everything(0)
    callback = CountingCallback(out_dir, num_samples=4, ig_steps=8)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=3 if sys.argv[3:] == ["figure"] else 2,
        logger=TensorBoardLogger(out_dir, name="ddp"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=2,
    )
    random_order = sys.argv[3:] == ["fail"]  # the other modes read a fixed order
    data = RandomSubsetVal(n_train=64, n_val=32, size=32, batch_size=16)
    trainer.fit(tiny_model(), data if random_order else subset_datamodule())


if __name__ == "__main__":
    main()
