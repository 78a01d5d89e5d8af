"""Run by tests/test_distributed.py: FSDP2 (``fully_shard`` under ModelParallelStrategy) on 2
CPU processes (gloo), with and without SaliencyCallback.

Usage: python tests/fsdp_script.py OUT_DIR

Three fits of 2 epochs in one process group, each seeded alike: two without the callback (the
control: they must agree bit for bit) and one with it. Each rank writes ``rank{r}.json``: the
final full weights' checksums per run, what the callback explained, the pictures it wrote, and
the gathered maps against explain() of an unsharded copy with the same full weights.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_datamodule  # noqa: E402

from lightning_saliency import SaliencyCallback, explain  # noqa: E402
from lightning_saliency.demos.classifier import ShapesClassifier  # noqa: E402
from lightning_saliency.publish.publisher import Publisher  # noqa: E402

WRITTEN = {"pictures": 0}
_publish = Publisher.images


def counting_images(self, pictures, step):
    WRITTEN["pictures"] += len(pictures)
    _publish(self, pictures, step)


Publisher.images = counting_images


class Sharded(ShapesClassifier):
    """The demo's CNN with each conv block and the root sharded by FSDP2."""

    def configure_model(self):
        for block in self.features:
            if any(True for _ in block.parameters()):
                fully_shard(block)
        fully_shard(self)


def full_weights(model):
    """Every parameter and buffer in full, on every rank (a collective)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


class Recording(SaliencyCallback):
    def __init__(self, record, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def on_fit_end(self, trainer, pl_module):
        super().on_fit_end(trainer, pl_module)
        state = full_weights(pl_module)
        plain = ShapesClassifier(width=8)
        plain.load_state_dict(state)
        samples = self.fixed_samples
        fresh = explain(
            plain, samples.images, samples.labels, list(self.explanations.maps), ig_steps=8
        )
        self.record["maps_match_explain"] = {
            m: float((fresh[m] - self.explanations[m]).abs().max())
            for m in self.explanations.maps
            if fresh[m].shape == self.explanations[m].shape and m != "dff"
        }
        self.record["explained"] = sorted(self.history[-1].means)
        self.record["switched_off"] = sorted(self.switched_off)
        self.record["sanity_failed"] = None if self.sanity is None else self.sanity.failed
        self.record["layer"] = self.layer_name


def fit(out_dir, callbacks, name):
    L.seed_everything(0)
    model = Sharded(width=8)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        logger=TensorBoardLogger(out_dir, name=name),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    trainer.fit(model, tiny_datamodule())
    state = full_weights(model)
    return trainer.global_rank, {k: v.double().sum().item() for k, v in state.items()}, state


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    record = {}
    rank, sums_a, state_a = fit(out_dir, [], "plain_a")
    _, sums_b, state_b = fit(out_dir, [], "plain_b")
    callback = Recording(record, num_samples=4, ig_steps=8)
    _, sums_c, state_c = fit(out_dir, [callback], "saliency")
    record["rank"] = rank
    record["written"] = WRITTEN["pictures"]
    record["control_equal"] = all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    record["with_callback_equal"] = all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    record["checksums"] = [sums_a, sums_c]
    record["differ"] = {
        k: float((state_a[k].double() - state_c[k].double()).abs().max())
        for k in state_a
        if not torch.equal(state_a[k], state_c[k])
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
