"""Choosing and holding the fixed samples the callback explains every epoch.

The samples are chosen from what the val loader actually yields: the indices its sampler (or
batch sampler) visits, collated by its ``collate_fn``, picked by the callback's own generator.
The loader is the user's own, as the datamodule's or the module's ``val_dataloader()`` hook
returns it (``train_dataloader()`` when the callback explains at train-epoch end), so under
DDP every rank sees the user's sampler, not the per-rank ``DistributedSampler`` Lightning
wraps around it, and every rank holds the same samples as a single-device run. Loaders handed
straight to ``fit(val_dataloaders=...)`` have no public accessor before the first validation;
for those alone :func:`source_loaders` reads the loop's data source, in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, default_collate

from lightning_saliency.errors import SaliencyConfigError


@dataclass
class BatchKeys:
    """Where images, labels and masks live in a batch: dict keys, or tuple positions."""

    image: str = "image"
    label: str = "label"
    mask: str = "mask"


DEFAULT_KEYS = BatchKeys()
_IMAGE_KEYS = ("image", "images", "img", "x", "input", "inputs", "pixel_values")
_LABEL_KEYS = ("label", "labels", "target", "targets", "y")
_MASK_KEYS = ("mask", "masks", "segmentation", "object_mask")


@dataclass
class FixedSamples:
    """The images (model inputs), their labels and object masks, and where they came from."""

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None
    indices: list[int] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, rows: Sequence[int]) -> FixedSamples:
        """The samples at ``rows`` (positions in this set), in that order.

        Example:
            >>> s = FixedSamples(torch.zeros(4, 3, 2, 2), torch.arange(4), indices=[7, 8, 9, 10])
            >>> part = s.subset([1, 3]); part.labels.tolist(), part.indices
            ([1, 3], [8, 10])
        """
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.images.device)
        return FixedSamples(
            self.images[index],
            None if self.labels is None else self.labels[index.to(self.labels.device)],
            None if self.masks is None else self.masks[index.to(self.masks.device)],
            None if self.indices is None else [self.indices[i] for i in rows],
        )

    def to(self, device: torch.device) -> FixedSamples:
        return FixedSamples(
            self.images.to(device),
            None if self.labels is None else self.labels.to(device),
            None if self.masks is None else self.masks.to(device),
            self.indices,
        )

    def state(self) -> dict[str, Any]:
        """Plain tensors and lists: loads with ``torch.load(weights_only=True)``."""
        return {
            "images": self.images.detach().cpu().clone(),
            "labels": None if self.labels is None else self.labels.detach().cpu().clone(),
            "masks": None if self.masks is None else self.masks.detach().cpu().clone(),
            "indices": self.indices,
        }

    @classmethod
    def given(
        cls, images: Tensor, labels: Tensor | None = None, masks: Tensor | None = None
    ) -> FixedSamples:
        """Samples the user passed explicitly (masks ``N×1×H×W`` or ``N×H×W``).

        Example:
            >>> given = FixedSamples.given(torch.zeros(2, 3, 4, 4), masks=torch.ones(2, 1, 4, 4))
            >>> given.masks.shape
            torch.Size([2, 4, 4])
        """
        if masks is not None and masks.dim() == 4:
            masks = masks[:, 0]
        return cls(images.detach().clone(), labels, masks)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FixedSamples:
        return cls(state["images"], state.get("labels"), state.get("masks"), state.get("indices"))


def _pick(batch: Mapping[str, Any], preferred: str, fallbacks: Sequence[str]) -> Any:
    if preferred in batch:
        return batch[preferred]
    for key in fallbacks:
        if key in batch:
            return batch[key]
    return None


def split_batch(
    batch: Any, keys: BatchKeys = DEFAULT_KEYS
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(images, labels, masks)`` from a batch that is ``x``, ``(x, y[, mask])`` or a dict.

    Example:
        >>> x, y, m = split_batch({"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([0, 1])})
        >>> x.shape, y.tolist(), m
        (torch.Size([2, 3, 8, 8]), [0, 1], None)
    """
    labels = masks = None
    if isinstance(batch, Tensor):
        images = batch
    elif isinstance(batch, Mapping):
        images = _pick(batch, keys.image, _IMAGE_KEYS)
        labels = _pick(batch, keys.label, _LABEL_KEYS)
        masks = _pick(batch, keys.mask, _MASK_KEYS)
        if images is None:
            raise SaliencyConfigError(
                f"no image key in the batch (keys: {sorted(batch)}); set "
                f"SaliencyCallback(image_key=...) to the key that holds the images."
            )
    elif isinstance(batch, (tuple, list)) and batch:
        images = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        masks = batch[2] if len(batch) > 2 else None
    else:
        raise SaliencyConfigError(f"cannot find images in a batch of type {type(batch).__name__}.")
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise SaliencyConfigError(
            f"the model input must be a float image tensor (N, C, H, W); the batch holds {shape}. "
            "SaliencyCallback explains image classifiers; pass samples=... if images live "
            "elsewhere."
        )
    n = images.shape[0]
    if not (
        isinstance(labels, Tensor)
        and labels.dim() == 1
        and labels.shape[0] == n
        and not labels.is_floating_point()
    ):
        labels = None
    if isinstance(masks, Tensor) and masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if not (
        isinstance(masks, Tensor)
        and masks.dim() == 3
        and masks.shape[0] == n
        and masks.shape[-2:] == images.shape[-2:]
    ):
        masks = None
    return images, labels, masks


def _dataset_labels(
    dataset: Dataset[Any], keys: BatchKeys, pool: Sequence[int]
) -> dict[int, int] | None:
    """Labels of ``pool`` items: from ``targets``/``labels`` attributes, else by reading items."""
    for attr in ("targets", "labels"):
        values = getattr(dataset, attr, None)
        if values is not None:
            try:
                return {i: int(values[i]) for i in pool}
            except (TypeError, ValueError, IndexError):
                break
    labels = {}
    for i in pool:
        item = dataset[i]
        label: Any = None
        if isinstance(item, Mapping):
            label = _pick(item, keys.label, _LABEL_KEYS)
        elif isinstance(item, (tuple, list)) and len(item) > 1:
            label = item[1]
        try:
            labels[i] = int(label)
        except (TypeError, ValueError):
            return None
    return labels


def choose_indices(
    dataset: Dataset[Any],
    num: int,
    seed: int,
    keys: BatchKeys = DEFAULT_KEYS,
    candidates: Sequence[int] | None = None,
) -> list[int]:
    """``num`` indices of a map-style dataset, chosen among ``candidates`` (default: all) by a
    private generator and spread over classes (round robin) when labels are known. The global
    RNG is never touched.

    Example:
        >>> ds = [(torch.zeros(3, 4, 4), i % 2) for i in range(10)]
        >>> idx = choose_indices(ds, 4, seed=0)
        >>> sorted(ds[i][1] for i in idx)
        [0, 0, 1, 1]
        >>> set(choose_indices(ds, 2, seed=0, candidates=[7, 8, 9])) <= {7, 8, 9}
        True
    """
    if candidates is None:
        candidates = range(len(dataset))  # type: ignore[arg-type]  # map-style: __len__
    size = len(candidates)
    gen = torch.Generator().manual_seed(seed)
    order = [candidates[i] for i in torch.randperm(size, generator=gen).tolist()]
    if num >= size:
        return sorted(order)
    pool = order[: min(size, max(8 * num, 64))]
    labels = _dataset_labels(dataset, keys, pool)
    if not labels:
        return pool[:num]
    by_class: dict[int, list[int]] = {}
    for i in pool:
        by_class.setdefault(labels[i], []).append(i)
    chosen: list[int] = []
    while len(chosen) < num:
        for cls in sorted(by_class):
            if by_class[cls] and len(chosen) < num:
                chosen.append(by_class[cls].pop(0))
    return chosen


def _user_sampler(sampler: Any) -> Any:
    """The user's sampler inside the distributed wrappers Lightning puts around it (``None``
    for a plain ``DistributedSampler``, which Lightning makes from a sequential one)."""
    from torch.utils.data.distributed import DistributedSampler

    if isinstance(sampler, DistributedSampler):
        inner = getattr(sampler, "dataset", None)
        return getattr(inner, "_sampler", None)  # lightning's DistributedSamplerWrapper
    return sampler


def visited_indices(loader: Any) -> list[int] | None:
    """The dataset indices one pass of ``loader`` visits (sorted, without repeats), read from
    its batch sampler or sampler; ``None`` when they are not plain indices. Iterating a random
    sampler draws from the global RNG, so the caller isolates it.

    Example:
        >>> from torch.utils.data import DataLoader, SubsetRandomSampler
        >>> loader = DataLoader(list(range(10)), sampler=SubsetRandomSampler([7, 2, 5]))
        >>> visited_indices(loader)
        [2, 5, 7]
    """
    from torch.utils.data import BatchSampler

    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(loader, "sampler", None)
    if isinstance(batch_sampler, BatchSampler):
        batch_sampler = None  # the default one: its sampler says the same
    source = _user_sampler(sampler if batch_sampler is None else batch_sampler)
    if source is None:
        return None
    found: set[int] = set()
    try:
        for item in source:
            for index in item if batch_sampler is not None else [item]:
                if isinstance(index, bool) or not isinstance(index, int):
                    index = int(index)  # numpy or tensor scalars; others raise
                found.add(index)
    except (TypeError, ValueError):
        return None
    return sorted(found)


def collect_samples(loader: Any, num: int, seed: int, keys: BatchKeys = DEFAULT_KEYS) -> Any:
    """A collated batch of ``num`` fixed samples among what the loader's sampler visits (by
    index), or the first ``num`` of its stream for an ``IterableDataset``. Returns
    ``(batch, indices)``."""
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None) or default_collate
    if (
        dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and len(dataset) > 0
    ):
        candidates = visited_indices(loader)
        if candidates is not None and not candidates:
            return None, None
        indices = choose_indices(dataset, num, seed, keys, candidates)
        return collate([dataset[i] for i in indices]), indices
    batches, count = [], 0
    for batch in loader:
        batches.append(batch)
        images, *_ = split_batch(batch, keys)
        count += images.shape[0]
        if count >= num:
            break
    if not batches:
        return None, None
    return _concat(batches, num), None


def _concat(batches: list[Any], num: int) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches)[:num]
    if isinstance(first, Mapping):
        return {
            k: _concat([b[k] for b in batches], num) if isinstance(first[k], Tensor) else first[k]
            for k in first
        }
    if isinstance(first, (tuple, list)):
        return type(first)(
            _concat([b[i] for b in batches], num) if isinstance(first[i], Tensor) else first[i]
            for i in range(len(first))
        )
    return first


def pick_loader(loaders: Any, dataloader_idx: int) -> Any:
    """One loader out of what a ``val_dataloader()`` hook returned (loader, list, dict)."""
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if not loaders:
            return None
        if dataloader_idx >= len(loaders):
            raise SaliencyConfigError(
                f"dataloader_idx={dataloader_idx} but there are {len(loaders)} val dataloaders."
            )
        return loaders[dataloader_idx]
    return loaders


def find_normalize(dataset: Any) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of a torchvision ``Normalize`` among the dataset's transforms, if any."""
    from torchvision import transforms

    seen: set[int] = set()
    stack = [dataset]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, transforms.Normalize):
            return list(map(float, torch.as_tensor(obj.mean).flatten())), list(
                map(float, torch.as_tensor(obj.std).flatten())
            )
        for attr in ("transform", "transforms", "dataset", "datasets"):
            child = getattr(obj, attr, None)
            if isinstance(child, (list, tuple)):
                stack.extend(child)
            elif child is not None:
                stack.append(child)
    return None


def source_loaders(
    trainer: L.Trainer, pl_module: L.LightningModule, stage: str, train: bool = False
) -> Any:
    """What the val (or, with ``train=True``, the train) dataloader hook of this run returns,
    as the user wrote it (before Lightning adds distributed samplers): a loader, a list or a
    dict of loaders, or ``None`` when there is none."""
    hook = "train_dataloader" if train else "val_dataloader"
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        if owner is not None and is_overridden(hook, owner):
            return getattr(owner, hook)()
    # Loaders passed to fit()/validate() directly: no public accessor before the loop runs.
    if train:
        loop: Any = trainer.fit_loop
    elif stage == "fit":
        loop = trainer.fit_loop.epoch_loop.val_loop
    else:
        loop = trainer.validate_loop
    instance = getattr(getattr(loop, "_data_source", None), "instance", None)
    if instance is not None and not isinstance(
        instance, (L.LightningModule, L.LightningDataModule)
    ):
        return instance
    return trainer.train_dataloader if train else trainer.val_dataloaders


def choose_samples(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    stage: str,
    num: int,
    seed: int,
    keys: BatchKeys = DEFAULT_KEYS,
    dataloader_idx: int = 0,
    train: bool = False,
) -> tuple[FixedSamples | None, Any]:
    """The fixed samples of a run, on the module's device, through the strategy's own
    ``batch_to_device`` (so the module's transfer hooks apply), and the loader they came from.

    Raises:
        SaliencyConfigError: there is no loader to take samples from, or its batches hold no
            images.
    """
    loaders = source_loaders(trainer, pl_module, stage, train)
    loader = pick_loader(loaders, 0 if train else dataloader_idx)
    if loader is None:
        raise SaliencyConfigError(
            "SaliencyCallback found no val dataloader to take samples from; define "
            "val_dataloader() or pass samples=<tensor N×C×H×W>."
        )
    with isolate_rng(include_cuda=False):  # iterating a stream may draw from the RNG
        batch, indices = collect_samples(loader, num, seed, keys)
    if batch is None:
        return None, loader
    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
    images, labels, masks = split_batch(batch, keys)
    return FixedSamples(images.detach().clone(), labels, masks, indices), loader


def find_class_names(trainer: L.Trainer, loader: Any) -> list[str] | None:
    """Class names from the datamodule's or the loader's dataset's ``classes``, if any."""
    for owner in (getattr(trainer, "datamodule", None), getattr(loader, "dataset", None)):
        names = getattr(owner, "classes", None)
        if isinstance(names, (list, tuple)) and names:
            return [str(n) for n in names]
    return None
