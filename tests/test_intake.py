"""The samples are what validation runs, read in every form a user's batches take: labels one-hot,
soft or multi-hot, class names and Normalize behind ``random_split``, images that change size on
resume, a stream validated by step, and blank maps said with their reason."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
from helpers import trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, random_split

from lightning_saliency import SaliencyCallback, SaliencyConfigError


def _images(n: int, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.rand(n, 3, side, side, generator=g) * 0.5
    for k in range(3):
        images[labels == k, k] += 0.5
    return images, labels


class Net(L.LightningModule):
    """A tiny CNN; ``loaders`` gives its train and val loaders."""

    def __init__(self, train: Any, val: Any, soft: bool = False) -> None:
        super().__init__()
        self.train_loader, self.val_loader, self.soft = train, val, soft
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))

    def loss_of(self, batch: Any) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)  # integer classes or probability rows

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_of(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss_of(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> Any:
        return self.train_loader

    def val_dataloader(self) -> Any:
        return self.val_loader


def _loaders(labels_as: str = "int") -> tuple[DataLoader[Any], DataLoader[Any]]:
    images, labels = _images(24)
    target: torch.Tensor = labels
    if labels_as == "onehot":
        target = F.one_hot(labels, 3).float()
    elif labels_as == "soft":
        target = F.one_hot(labels, 3).float() * 0.85 + 0.05
    elif labels_as == "multihot":
        target = F.one_hot(labels, 3).float()
        target[:, 0] = 1.0
    data = TensorDataset(images, target)
    return DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)


@pytest.mark.parametrize("labels_as", ["onehot", "soft"])
def test_one_hot_and_soft_labels_are_read_as_classes(tmp_path, labels_as):
    callback = SaliencyCallback(num_samples=6, methods=("gradcam",))
    L.seed_everything(0)
    trainer(str(tmp_path), [callback], max_epochs=1).fit(Net(*_loaders(labels_as)))
    samples = callback.fixed_samples
    assert samples.labels is not None
    assert torch.equal(samples.labels, torch.tensor(samples.indices) % 3)
    assert sorted(samples.labels.tolist()) == [0, 0, 1, 1, 2, 2]  # spread over classes
    assert torch.equal(callback.explanations.targets.cpu(), samples.labels.cpu())  # not preds


def test_multi_hot_labels_with_target_label_are_an_error_before_training(tmp_path):
    model = Net(*_loaders("multihot"))
    before = model.fc.weight.detach().clone()
    with pytest.raises(SaliencyConfigError, match="multi-label.*pass target="):
        trainer(str(tmp_path), [SaliencyCallback()], num_sanity_val_steps=2).fit(model)
    assert torch.equal(model.fc.weight, before)  # no training step ran


def test_labels_that_are_not_classes_are_said_once(tmp_path, caplog):
    images, labels = _images(24)
    data = TensorDataset(images, labels.float() + 0.5)  # a regression target

    class Regression(Net):
        def loss_of(self, batch: Any) -> torch.Tensor:
            return F.mse_loss(self(batch[0])[:, 0], batch[1])

    model = Regression(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        trainer(str(tmp_path), [SaliencyCallback(methods=("gradcam",))], max_epochs=2).fit(model)
    said = [r.getMessage() for r in caplog.records if "not classes" in r.getMessage()]
    assert len(said) == 1 and "regression target" in said[0], said


class Named(Dataset[Any]):
    """A dataset with class names and a v2 Normalize, as torchvision's own datasets hold them."""

    classes = ["red", "green", "blue"]

    def __init__(self) -> None:
        from torchvision.transforms import v2

        self.images, self.labels = _images(30)
        self.transform = v2.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[i]), int(self.labels[i])


def test_class_names_and_v2_normalize_are_found_behind_random_split(tmp_path, caplog):
    train, val = random_split(Named(), [20, 10], generator=torch.Generator().manual_seed(0))
    model = Net(DataLoader(train, batch_size=5), DataLoader(val, batch_size=5))
    callback = SaliencyCallback(num_samples=3, methods=("gradcam",))
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        trainer(str(tmp_path), [callback], max_epochs=1).fit(model)
    assert callback.class_names == ["red", "green", "blue"]
    assert not [r for r in caplog.records if "Normalize" in r.getMessage()]  # it was found


def test_a_normalisation_in_the_transfer_hook_is_said_naming_mean_and_std(tmp_path, caplog):
    class Normalising(Net):
        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            images, labels = batch
            return (images - 0.5) / 0.1, labels

    model = Normalising(*_loaders())
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        trainer(str(tmp_path), [SaliencyCallback(methods=("gradcam",))], max_epochs=2).fit(model)
    said = [r.getMessage() for r in caplog.records if "Normalize" in r.getMessage()]
    assert len(said) == 1 and "mean= and std=" in said[0], said


def test_resumed_with_images_of_another_size_reads_the_same_indices_at_the_new_size(
    tmp_path, caplog
):
    def loaders(side: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
        data = TensorDataset(*_images(24, side))
        return DataLoader(data, batch_size=8), DataLoader(data, batch_size=8)

    first = SaliencyCallback(num_samples=4, methods=("gradcam",))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    L.seed_everything(0)
    trainer(str(tmp_path / "a"), [first, checkpoints], max_epochs=1, enable_checkpointing=True).fit(
        Net(*loaders(16))
    )
    resumed = SaliencyCallback(num_samples=4, methods=("gradcam",))
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        trainer(str(tmp_path / "b"), [resumed], max_epochs=2).fit(
            Net(*loaders(24)), ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
    assert resumed.fixed_samples.indices == first.fixed_samples.indices
    assert resumed.fixed_samples.images.shape[-2:] == (24, 24)
    said = [r.getMessage() for r in caplog.records if "changed size" in r.getMessage()]
    assert len(said) == 1 and "(16, 16) to (24, 24)" in said[0], said
    assert resumed.monitor.references["gradcam"].shape[-2:] != (16, 16)  # new references


def test_a_cue_that_enters_the_validation_data_later_reaches_the_samples(tmp_path):
    """A pipeline bug stamps a corner patch on every validation image from epoch 1 on: the
    samples are re-read from the batches each run, so the pictures show it (on main they were
    frozen at the first validation)."""
    images, labels = _images(24)
    val = TensorDataset(images.clone(), labels)

    class Stamping(Net):
        def on_train_epoch_start(self) -> None:
            if self.current_epoch == 1:
                val.tensors[0][:, :, :3, :3] = 1.0  # the cue enters the data

    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    model = Stamping(DataLoader(TensorDataset(images, labels), batch_size=8), DataLoader(val))
    trainer(str(tmp_path), [callback], max_epochs=2).fit(model)
    corner = callback.fixed_samples.images[:, :, :3, :3]
    assert bool((corner == 1.0).all())
    first = images[callback.fixed_samples.indices]
    assert torch.equal(callback.fixed_samples.images[:, :, 3:], first[:, :, 3:])  # same images


class Stream(IterableDataset[Any]):
    def __iter__(self) -> Any:
        images, labels = _images(24)
        while True:
            yield from zip(images, labels)


def test_a_stream_validated_by_step_is_labelled_and_spread_by_step(tmp_path):
    images, labels = _images(12)
    model = Net(DataLoader(Stream(), batch_size=4), DataLoader(TensorDataset(images, labels)))
    callback = SaliencyCallback(num_samples=2, methods=("gradcam",), sanity_check=False)
    trainer(str(tmp_path), [callback], max_steps=120, val_check_interval=3).fit(model)
    shown = callback.timeline.labels  # 40 validations, thinned to the timeline's 32 columns
    assert len(shown) == 32 and all(label.startswith("step ") for label in shown), shown
    steps = [int(label.split()[1]) for label in shown]
    assert steps == sorted(set(steps)) and steps[-1] >= 117  # the latest is kept
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) <= 2 * 3, gaps  # spread over the run, not the first 31 and the last


def test_a_random_val_sampler_keeps_the_first_samples_and_says_so(tmp_path, caplog):
    images, labels = _images(24)
    data = TensorDataset(images, labels)
    model = Net(DataLoader(data, batch_size=8), DataLoader(data, batch_size=8, shuffle=True))
    callback = SaliencyCallback(num_samples=4, methods=("gradcam",))
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        trainer(str(tmp_path), [callback], max_epochs=3).fit(model)
    said = [r.getMessage() for r in caplog.records if "not fixed" in r.getMessage()]
    assert len(said) == 1 and "RandomSampler" in said[0], said
    assert callback.fixed_samples.indices is None and len(callback.history) == 3


def test_blank_maps_are_said_once_with_their_reason(tmp_path, caplog):
    class Blank(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # no class evidence at conv
            return self.fc(-F.relu(self.conv(x)).mean(dim=(2, 3)).abs() * 0 + 1) + 0 * x.sum()

    model = Blank(*_loaders())
    callback = SaliencyCallback(num_samples=3, methods=("gradcam",), target_layer="conv")
    with caplog.at_level(logging.WARNING, logger="lightning_saliency"):
        trainer(str(tmp_path), [callback], max_epochs=2).fit(model)
    said = [r.getMessage() for r in caplog.records if "blank" in r.getMessage()]
    assert len(said) == 1 and "3 of 3 gradcam maps are blank" in said[0], said
    assert "target_layer=" in said[0]


def test_guided_gradcam_on_mobilenet_v3_small_at_random_weights_is_found_blank():
    """One of the three architectures where the maps were blank without a word."""
    import torchvision

    from lightning_saliency import explain
    from lightning_saliency.evaluate.map_health import blank_maps

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    out = explain(model, torch.rand(2, 3, 64, 64), methods=("guided_gradcam",))
    assert blank_maps(out) == {"guided_gradcam": 2}
