"""What the fixed samples are, and how a batch is read: images, labels in any form, masks.

:class:`FixedSamples` holds the images the callback explains every run, with their labels,
masks and dataset indices; :func:`batch_parts` and :func:`read_labels` read a batch as the
loop yields it; :func:`choose_indices` picks indices spread over classes by a private
generator; :func:`find_normalize` and :func:`find_class_names` look behind a dataset for what
the pictures undo and name. Taking the samples from the loop's batches is :mod:`.capture`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

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

        Examples:
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

        Examples:
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


def batch_parts(batch: Any, keys: BatchKeys = DEFAULT_KEYS) -> tuple[Tensor, Any, Tensor | None]:
    """``(images, labels as the batch holds them, masks)`` from a batch that is ``x``,
    ``(x, y[, mask])`` or a dict; :func:`read_labels` reads the labels as classes.

    Raises:
        SaliencyConfigError: the batch holds no float image tensor ``(N, C, H, W)``.
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


@dataclass(frozen=True)
class LabelReading:
    """A batch's labels read as classes: ``labels`` ``(N,)`` (``None`` when they cannot be
    read), why not (``problem``), and whether they are multi-hot rows (multi-label)."""

    labels: Tensor | None
    problem: str | None = None
    multi_hot: bool = False


def read_labels(raw: Any, n: int) -> LabelReading:
    """Class indices of ``n`` images from labels in any form a batch carries them: integers
    ``(N,)``, one-hot or soft rows ``(N, K)`` (their argmax; rows in ``[0, 1]`` that sum to
    one). Multi-hot rows (several ones) are a multi-label task; other forms are not classes,
    and ``problem`` says what they are.

    Examples:
        >>> read_labels(torch.tensor([[0, 1.0], [0.9, 0.1]]), 2).labels.tolist()
        [1, 0]
        >>> read_labels(torch.tensor([[1, 1.0], [0, 1.0]]), 2).multi_hot
        True
        >>> read_labels(torch.tensor([0.5, 2.5]), 2).problem
        'float labels of shape (2,) (a regression target?)'
    """
    if raw is None:
        return LabelReading(None)
    if not isinstance(raw, Tensor):
        return LabelReading(None, f"labels of type {type(raw).__name__}, not a tensor")
    shape = tuple(raw.shape)
    if raw.dim() == 0 or raw.shape[0] != n:
        return LabelReading(None, f"labels of shape {shape} for {n} images")
    if raw.dim() == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.dim() == 1 and not raw.is_floating_point() and raw.dtype != torch.bool:
        return LabelReading(raw.long())
    if raw.dim() == 1:
        return LabelReading(None, f"float labels of shape {shape} (a regression target?)")
    if raw.dim() == 2:
        rows = raw.detach().float()
        in_range = bool(((rows >= 0) & (rows <= 1)).all())
        sums = rows.sum(dim=1)
        if in_range and bool(((sums - 1).abs() <= 1e-3).all()):
            return LabelReading(rows.argmax(dim=1))
        binary = bool(((rows == 0) | (rows == 1)).all())
        if binary and bool((sums > 1).any()):
            return LabelReading(None, f"multi-hot rows of shape {shape}", multi_hot=True)
    return LabelReading(None, f"labels of shape {shape} and dtype {raw.dtype}")


def split_batch(
    batch: Any, keys: BatchKeys = DEFAULT_KEYS
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(images, labels, masks)`` from a batch, the labels read as classes
    (:func:`read_labels`; ``None`` when they are not).

    Examples:
        >>> x, y, m = split_batch({"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([0, 1])})
        >>> x.shape, y.tolist(), m
        (torch.Size([2, 3, 8, 8]), [0, 1], None)
    """
    images, raw, masks = batch_parts(batch, keys)
    return images, read_labels(raw, images.shape[0]).labels, masks


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
        if isinstance(label, Tensor) and label.dim() == 1 and label.numel() > 1:
            label = read_labels(label[None], 1).labels  # one-hot or soft
        try:
            labels[i] = int(label)
        except (TypeError, ValueError, RuntimeError):
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

    Examples:
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


def _chain(start: Any) -> Iterator[Any]:
    """``start`` and what it wraps: datasets inside ``Subset``/``ConcatDataset`` and wrappers
    (``dataset``, ``datasets``), and their transforms (``transform``, ``transforms``, the
    items of a ``Compose``), each once."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        yield obj
        for attr in ("transform", "transforms", "dataset", "datasets"):
            child = getattr(obj, attr, None)
            if attr in ("transforms", "datasets") and isinstance(child, (list, tuple)):
                stack.extend(reversed(child))
            elif child is not None and not isinstance(child, (str, bytes, Tensor)):
                stack.append(child)


def find_normalize(dataset: Any) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of a torchvision ``Normalize`` (``transforms`` or ``transforms.v2``)
    among the dataset's transforms, through ``Subset``/``ConcatDataset`` chains, if any.

    Examples:
        >>> from torchvision.transforms import v2
        >>> from torch.utils.data import Subset
        >>> class Data(list):
        ...     transform = v2.Compose([v2.ToDtype(torch.float32), v2.Normalize([0.5], [0.25])])
        >>> find_normalize(Subset(Data([1, 2]), [0]))
        ([0.5], [0.25])
    """
    from torchvision import transforms
    from torchvision.transforms import v2

    for obj in _chain(dataset):
        if isinstance(obj, (transforms.Normalize, v2.Normalize)):
            return list(map(float, torch.as_tensor(obj.mean).flatten())), list(
                map(float, torch.as_tensor(obj.std).flatten())
            )
    return None


def find_class_names(*owners: Any) -> list[str] | None:
    """Class names from the first ``classes`` list among ``owners`` (the datamodule, the
    loader's dataset) and the datasets they wrap (``Subset``, ``ConcatDataset``).

    Examples:
        >>> from torch.utils.data import Subset
        >>> class Data(list):
        ...     classes = ["cat", "dog"]
        >>> find_class_names(None, Subset(Data([1, 2]), [1]))
        ['cat', 'dog']
    """
    for owner in owners:
        for obj in _chain(owner):
            names = getattr(obj, "classes", None)
            if isinstance(names, (list, tuple)) and names:
                return [str(n) for n in names]
    return None
