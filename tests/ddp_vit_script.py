"""Run by tests/test_attention_maps.py: a small ViT under DDP on 2 CPU processes (gloo), watched
by the attention methods; each rank writes the maps and scores it ends with.

Usage: python tests/ddp_vit_script.py OUT_DIR
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.models import VisionTransformer

sys.path.insert(0, os.path.dirname(__file__))
from helpers import tiny_datamodule  # noqa: E402

from lightning_saliency import SaliencyCallback, explain  # noqa: E402
from lightning_saliency.demos import ShapesClassifier  # noqa: E402
from lightning_saliency.engine.methods import available_attention_methods  # noqa: E402

METHODS = ["gradcam", *available_attention_methods()]


class ViTClassifier(ShapesClassifier):
    def __init__(self) -> None:
        super().__init__(num_classes=4)
        del self.features, self.pool, self.dropout, self.fc
        self.vit = VisionTransformer(32, 8, num_layers=2, num_heads=2, hidden_dim=16,
                                     mlp_dim=32, num_classes=4)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.vit(x)
        return logits


class Recording(SaliencyCallback):
    """Each rank's last scores, and its gathered maps against explain() of every sample on the
    same weights (nothing trains after the last validation)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        samples = self.fixed_samples.to(pl_module.device)
        fresh = explain(pl_module, samples.images, samples.labels, METHODS)
        record = {
            "means": self.history[-1].means,
            "switched_off": sorted(self.switched_off),
            "diffs": {m: float((fresh[m] - self.explanations[m]).abs().max()) for m in METHODS},
        }
        with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    L.seed_everything(0)
    callback = Recording(num_samples=4, methods=METHODS)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1,
        logger=TensorBoardLogger(out_dir, name="run"), callbacks=[callback],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(ViTClassifier(), tiny_datamodule())
