"""Training is untouched, as a matrix: each setup fits twice from one seed, without the callback
and with it, and ends bitwise the same (weights, every buffer, optimizer state, RNG), and the
user's hooks see the same calls in the same stages. It replaces the single bitwise test.

The setups are those where a monitor can reach into training: a batch augmentation in
``on_after_batch_transfer`` gated on ``trainer.training`` (Lightning's recipe), a
``val_dataloader()`` that draws a random subset, quantization-aware training (observers update
in eval mode), a buffer the forward writes, manual optimization, ``StochasticWeightAveraging``,
gradient clipping with accumulation, ``channels_last``, spectral norm, ``bf16-mixed``,
validation in the middle of an epoch with Lightning's sanity check, and two vision transformers
(timm's, whose fused attention the attention methods switch off while they read it, and
torchvision's, whose ``nn.MultiheadAttention`` they hook), explained by the attention methods.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from helpers import hook_count, trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset, TensorDataset

from lightning_saliency import DEFAULT_METHODS, SaliencyCallback
from lightning_saliency.engine.methods import available_attention_methods

SETUPS = (
    "transfer_hook_augmentation",
    "random_val_dataloader",
    "quantization_aware",
    "forward_writes_a_buffer",
    "manual_optimization",
    "swa",
    "clipping_with_accumulation",
    "channels_last",
    "spectral_norm",
    "bf16_mixed",
    "mid_epoch_validation",
    "timm_vit",
    "torchvision_vit",
)
ATTENTION_METHODS = ("gradcam", *available_attention_methods())


def _data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.rand(n, 3, 24, 24, generator=g) * 0.5
    for k in range(4):  # a learnable bright square per class
        rows = labels == k
        images[rows, :, 4 * k : 4 * k + 8, 4:12] += 0.5
    return TensorDataset(images, labels)


class Net(L.LightningModule):
    """A small CNN with batch norm and dropout; ``setup_name`` switches one setup on."""

    def __init__(self, setup_name: str) -> None:
        super().__init__()
        self.setup_name = setup_name
        self.calls: list[tuple[str, str]] = []  # (hook, stage) as the user's code sees them
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
        )
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 4)
        if setup_name == "spectral_norm":
            self.head = nn.utils.parametrizations.spectral_norm(self.head)
        if setup_name == "forward_writes_a_buffer":
            self.register_buffer("seen", torch.zeros(()))
            self.register_buffer("input_mean", torch.zeros(3))
        if setup_name == "manual_optimization":
            self.automatic_optimization = False
        if setup_name == "timm_vit":  # attention dropout on: the modes matter
            import timm

            self.vit = timm.create_model(
                "vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=24,
                patch_size=6, embed_dim=16, depth=2, num_heads=2, attn_drop_rate=0.1,
                drop_rate=0.1,
            )  # fmt: skip
        if setup_name == "torchvision_vit":
            from torchvision.models import VisionTransformer

            self.vit = VisionTransformer(
                24, 6, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, dropout=0.1,
                attention_dropout=0.1, num_classes=4,
            )  # fmt: skip
        if setup_name == "quantization_aware":
            self.qconfig = torch.ao.quantization.get_default_qat_qconfig("fbgemm")
            torch.ao.quantization.prepare_qat(self, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.setup_name == "forward_writes_a_buffer":
            self.seen += x.shape[0]
            self.input_mean.mul_(0.9).add_(0.1 * x.detach().float().mean(dim=(0, 2, 3)))
        if self.setup_name.endswith("_vit"):
            logits: torch.Tensor = self.vit(x)
            return logits
        h = self.features(x).mean(dim=(2, 3))
        return self.head(self.drop(h))

    def note(self, hook: str) -> None:
        self.calls.append((hook, str(self.trainer.state.stage)))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.note("on_before_batch_transfer")
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.note("on_after_batch_transfer")
        images, labels = batch
        if self.setup_name == "transfer_hook_augmentation" and self.trainer.training:
            images = images + 0.1 * torch.randn_like(images)  # Kornia-style batch augmentation
        if self.setup_name == "channels_last":
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader[Any]:
        self.note("train_dataloader")
        return DataLoader(_data(64, 1), batch_size=16, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        self.note("val_dataloader")
        data = _data(64, 2)
        if self.setup_name == "random_val_dataloader":  # validate on a random half
            data = Subset(data, torch.randperm(64)[:32].tolist())  # type: ignore[assignment]
        return DataLoader(data, batch_size=16)


def _fit(tmp_path: Any, setup_name: str, callback: SaliencyCallback | None) -> dict[str, Any]:
    L.seed_everything(0)
    model = Net(setup_name)
    if setup_name == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    kwargs: dict[str, Any] = dict(max_epochs=2, num_sanity_val_steps=2)
    if setup_name == "swa":
        from lightning.pytorch.callbacks import StochasticWeightAveraging

        kwargs["callbacks_extra"] = [StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)]
    if setup_name == "clipping_with_accumulation":
        kwargs.update(gradient_clip_val=0.1, accumulate_grad_batches=2)
    if setup_name == "bf16_mixed":
        kwargs["precision"] = "bf16-mixed"
    if setup_name == "mid_epoch_validation":
        kwargs.update(val_check_interval=0.5, accumulate_grad_batches=2)
    extra = kwargs.pop("callbacks_extra", [])
    callbacks = extra + ([callback] if callback is not None else [])
    tr = trainer(str(tmp_path), callbacks, **kwargs)
    tr.fit(model)
    optimizer = tr.optimizers[0].state_dict()
    state = {f"param {n}": p.detach().clone() for n, p in model.named_parameters()}
    state |= {f"buffer {n}": b.detach().clone() for n, b in model.named_buffers()}
    for pid, entry in optimizer["state"].items():
        for key, value in entry.items():
            state[f"optimizer {pid} {key}"] = torch.as_tensor(value).clone()
    state["torch rng"] = torch.get_rng_state()
    state["numpy rng"] = torch.as_tensor(np.random.get_state()[1])
    state["python rng"] = torch.tensor(random.getstate()[1])
    state["val_loss"] = tr.callback_metrics["val_loss"].detach().clone()
    return {"state": state, "calls": model.calls, "hooks": hook_count(model), "model": model}


@pytest.mark.parametrize("setup_name", SETUPS)
def test_training_is_bitwise_unchanged(tmp_path, setup_name):
    without = _fit(tmp_path / "without", setup_name, None)
    methods = ATTENTION_METHODS if setup_name.endswith("_vit") else DEFAULT_METHODS
    callback = SaliencyCallback(num_samples=4, ig_steps=8, methods=methods)
    with_it = _fit(tmp_path / "with", setup_name, callback)

    assert callback.history, "the callback did explain"
    if setup_name.endswith("_vit"):  # the attention methods explained it
        assert set(methods) <= set(callback.history[-1].means), callback.history[-1].means
    assert not callback.switched_off, callback.switched_off
    assert with_it["calls"] == without["calls"]  # the user's hooks: the same calls and stages
    a, b = without["state"], with_it["state"]
    assert sorted(a) == sorted(b)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == [], changed
    assert with_it["hooks"] == without["hooks"]
    model = with_it["model"]
    assert all(p.requires_grad for p in model.parameters())


def test_the_samples_are_what_validation_ran(tmp_path):
    """The fixed samples are rows of the batches validation_step got (not augmented as in
    training, and among the random half the random val_dataloader drew)."""
    seen: list[torch.Tensor] = []

    class Watching(Net):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            seen.append(batch[0].detach().clone())
            super().validation_step(batch, batch_idx)

    for setup_name in ("transfer_hook_augmentation", "random_val_dataloader"):
        seen.clear()
        L.seed_everything(0)
        callback = SaliencyCallback(num_samples=4, ig_steps=8, methods=("gradcam",))
        trainer(str(tmp_path / setup_name), [callback], max_epochs=1).fit(Watching(setup_name))
        rows = torch.cat(seen)
        for image in callback.fixed_samples.images:
            assert bool((rows == image).flatten(1).all(dim=1).any()), setup_name
