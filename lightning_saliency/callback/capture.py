"""The fixed samples, taken from the batches validation really runs: :class:`SampleCapture`.

The callback never calls the user's ``val_dataloader()`` or transfer hooks itself: an extra
call runs the user's code at another time, in another stage (a batch augmentation gated on
``trainer.training`` would apply) and draws from the user's RNG. Instead it watches the batches
Lightning hands to ``on_validation_batch_start``, which are exactly what ``validation_step``
gets, after every transfer hook, in the validating stage, and copies the rows of its samples.

Where the loader's order is fixed (a sequential sampler, or Lightning's ``DistributedSampler``
over one without shuffling, with the default batch sampler), each sample is a dataset index:
the indices are chosen once (spread over classes, by a private generator, among the batches
validation runs, ``limit_val_batches`` included) and re-read at every validation, so a change
that enters the validation data later reaches them. Under DDP each index is copied on the
lowest rank that runs it and the rows are summed over the ranks, so every rank holds the same
samples as one process. Where the order is not fixed (a random or custom sampler, an
``IterableDataset``, a loader rebuilt on another dataset), the first rows of the first
validation run are taken, on rank zero (:attr:`SampleCapture.kept` says why); the caller keeps
the first it gets.

Examples:
    >>> from torch.utils.data import DataLoader
    >>> data = [(torch.full((1, 2, 2), float(i)), i % 2) for i in range(6)]
    >>> loader = DataLoader(data, batch_size=4)
    >>> capture = SampleCapture(num=2, seed=0)
    >>> capture.start(loader, batches=2)
    >>> for b, batch in enumerate(loader):
    ...     capture.see(batch, b)
    >>> samples = capture.finish()
    >>> samples.indices == capture.indices, sorted(samples.labels.tolist())
    (True, [0, 1])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import BatchSampler, IterableDataset, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from lightning_saliency.callback.samples import (
    DEFAULT_KEYS,
    BatchKeys,
    FixedSamples,
    LabelReading,
    batch_parts,
    choose_indices,
    read_labels,
)

Summing = Callable[[Tensor], Tensor]  # a sum over the ranks (one process: the identity)
PROBE_ROWS = 2  # rows kept from the first batch for the dry run


def rank_batches(loader: Any, world: int = 1) -> list[list[list[int]]] | None:
    """Each rank's batches of dataset indices, in the order the loader yields them, when that
    order is fixed: a ``SequentialSampler``, or a ``DistributedSampler`` without shuffling over
    the dataset itself, under the default ``BatchSampler``; ``None`` otherwise. No RNG is
    drawn and the loader is not iterated.

    Examples:
        >>> from torch.utils.data import DataLoader
        >>> rank_batches(DataLoader(list(range(5)), batch_size=2))
        [[[0, 1], [2, 3], [4]]]
        >>> rank_batches(DataLoader(list(range(5)), shuffle=True)) is None
        True
    """
    dataset = getattr(loader, "dataset", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return None
    if type(batch_sampler) is not BatchSampler:
        return None
    sampler = batch_sampler.sampler
    if isinstance(sampler, SequentialSampler):
        orders = [list(range(len(dataset)))] * world
    elif (
        isinstance(sampler, DistributedSampler)
        and not sampler.shuffle
        and sampler.dataset is dataset
        and sampler.num_replicas == world
    ):
        orders = []
        for rank in range(world):
            twin = copy.copy(sampler)
            twin.rank = rank
            orders.append([int(i) for i in twin])
    else:
        return None
    size, drop = batch_sampler.batch_size, batch_sampler.drop_last
    batches = []
    for order in orders:
        cut = len(order) - len(order) % size if drop else len(order)
        batches.append([order[i : i + size] for i in range(0, cut, size)])
    return batches


def unfixed_reason(loader: Any) -> str:
    """Why a loader's order is not fixed, for the message.

    Examples:
        >>> from torch.utils.data import DataLoader
        >>> unfixed_reason(DataLoader(list(range(4)), shuffle=True))
        'its sampler is a RandomSampler'
    """
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return "it streams an IterableDataset"
    batch_sampler = getattr(loader, "batch_sampler", None)
    if type(batch_sampler) is not BatchSampler:
        return f"its batch sampler is a {type(batch_sampler).__name__}"
    return f"its sampler is a {type(batch_sampler.sampler).__name__}"


class SampleCapture:
    """Copies the fixed samples out of the batches a validation run yields on this rank.

    Call :meth:`start` when the run starts (with the loader Lightning built), :meth:`see`
    with each batch, :meth:`finish` at its end (on every rank: under DDP it sums over them).

    Attributes:
        indices: the samples' dataset indices (``None`` while none are chosen, and where
            the order is not fixed).
        kept: why the samples cannot be re-read by index (``None``: they are, every run);
            then :meth:`finish` gives the first rows of each run.
        probe: the first rows of this run's first batch, for the dry run.
        labels_problem: why the batches' labels cannot be read as classes (``None``: they
            can, or there are none); ``multi_hot``: they are multi-hot rows.
    """

    def __init__(
        self, num: int, seed: int, keys: BatchKeys = DEFAULT_KEYS, rank: int = 0, world: int = 1
    ) -> None:
        self.num, self.seed, self.keys = num, seed, keys
        self.rank, self.world = rank, world
        self.indices: list[int] | None = None
        self.kept: str | None = None
        self.probe: FixedSamples | None = None
        self.labels_problem: str | None = None
        self.multi_hot = False
        self._dataset: Any = None
        self._where: dict[int, list[tuple[int, int]]] = {}  # batch -> [(row, slot)] here
        self._first_rows = False  # taking the first rows (the order is not fixed)
        self._rows: dict[int, tuple[Tensor, Tensor | None, Tensor | None]] = {}

    def start(self, loader: Any, batches: int | float, reuse: Sequence[int] | None = None) -> None:
        """Plan this run's copies: which rows of which of this rank's first ``batches``
        batches are samples. ``reuse``: indices to read (a resumed run's), when they all lie
        among them; otherwise, and at the first run, the indices are chosen anew."""
        self._rows, self.probe, self._where = {}, None, {}
        self._first_rows = self.kept is not None
        if self._first_rows:
            return
        order = rank_batches(loader, self.world)
        dataset: Any = getattr(loader, "dataset", None)
        if order is None or (self._dataset is not None and dataset is not self._dataset):
            self.kept = (
                unfixed_reason(loader) if order is None else "the loader was rebuilt on new data"
            )
            self._first_rows, self.indices = True, None
            return
        limit = len(order[0]) if math.isinf(batches) else int(batches)
        order = [rank[:limit] for rank in order]
        candidates = sorted({i for rank in order for batch in rank for i in batch})
        if reuse is not None and set(reuse) <= set(candidates):
            self.indices = list(reuse)
        elif self.indices is None or not set(self.indices) <= set(candidates):
            with isolate_rng(include_cuda=False):  # reading labels runs the dataset's transforms
                self.indices = choose_indices(dataset, self.num, self.seed, self.keys, candidates)
        self._dataset = dataset
        slot_of = {index: slot for slot, index in enumerate(self.indices)}
        owned: set[int] = set()
        for rank, batches_of_rank in enumerate(order):
            for b, batch in enumerate(batches_of_rank):
                for row, index in enumerate(batch):
                    if index in slot_of and index not in owned:
                        owned.add(index)
                        if rank == self.rank:
                            self._where.setdefault(b, []).append((row, slot_of[index]))

    def see(self, batch: Any, batch_idx: int) -> None:
        """Copy this batch's sample rows (and, from the first batch, the probe)."""
        wanted = self._where.get(batch_idx, [])
        taking = self._first_rows and self.rank == 0 and len(self._rows) < self.num
        if not wanted and not taking and self.probe is not None:
            return
        images, raw, masks = batch_parts(batch, self.keys)
        reading = read_labels(raw, images.shape[0])
        self.labels_problem, self.multi_hot = reading.problem, reading.multi_hot
        if self.probe is None:
            self.probe = _rows_of(images, reading, masks, range(min(PROBE_ROWS, len(images))))
        if taking:
            wanted = [(row, len(self._rows) + row) for row in range(len(images))]
            wanted = [(row, slot) for row, slot in wanted if slot < self.num]
        for row, slot in wanted:
            self._rows[slot] = (
                images[row].detach().clone(),
                None if reading.labels is None else reading.labels[row].detach().clone(),
                None if masks is None else masks[row].detach().clone(),
            )

    def shared_probe(self, total: Summing = lambda t: t) -> FixedSamples | None:
        """Rank zero's probe on every rank (``total`` sums over them), so that a check of it
        decides alike everywhere. Every rank must call it, with a probe of the same shape."""
        probe = self.probe
        if probe is None or self.world == 1:
            return probe
        mine = self.rank == 0

        def shared(t: Tensor) -> Tensor:
            return total(t.double() if mine else torch.zeros_like(t, dtype=torch.float64))

        return FixedSamples(
            shared(probe.images).to(probe.images.dtype),
            None if probe.labels is None else shared(probe.labels).to(probe.labels.dtype),
            None if probe.masks is None else shared(probe.masks).to(probe.masks.dtype),
        )

    def finish(self, total: Summing = lambda t: t) -> FixedSamples | None:
        """The samples this run read, the same on every rank (``total`` sums over them), or
        ``None`` when it did not read them all (a sanity check runs two batches) or there is
        nothing to read. Where the order is not fixed (:attr:`kept`) these are the first rows
        of this run, for the caller to keep or not. Every rank must call it, with a probe (it
        saw a batch)."""
        if self.probe is None:
            return None
        image, label, mask = self.probe.images[0], self.probe.labels, self.probe.masks
        device = image.device
        slots = self.num if self.indices is None else len(self.indices)
        exact = torch.promote_types(image.dtype, torch.float32)  # float64 inputs stay float64
        images = torch.zeros(slots, *image.shape, device=device, dtype=exact)
        labels = torch.zeros(slots, device=device, dtype=torch.float64)
        masks = None if mask is None else torch.zeros(slots, *mask.shape[1:], device=device)
        seen = torch.zeros(slots, device=device, dtype=torch.float64)
        for slot, (row_image, row_label, row_mask) in self._rows.items():
            images[slot], seen[slot] = row_image.to(exact), 1.0
            labels[slot] = -1.0 if row_label is None else float(row_label)
            if masks is not None and row_mask is not None:
                masks[slot] = row_mask.float()
        parts = [total(t) for t in (images, labels, seen)]
        mask_sum = None if masks is None else total(masks)
        have = parts[2] > 0
        complete = bool(have.all())
        if not complete and not (self._first_rows and bool(have.any())):
            return None
        keep = have.nonzero().flatten() if not complete else torch.arange(slots, device=device)
        labels_of = parts[1][keep]
        return FixedSamples(
            parts[0][keep].to(image.dtype),
            None if label is None or bool((labels_of < 0).any()) else labels_of.long(),
            None if mask_sum is None else mask_sum[keep].to(mask.dtype),  # type: ignore[union-attr]
            None if self.indices is None else [self.indices[int(k)] for k in keep],
        )


def _rows_of(
    images: Tensor, reading: LabelReading, masks: Tensor | None, rows: range
) -> FixedSamples:
    index = list(rows)
    return FixedSamples(
        images[index].detach().clone(),
        None if reading.labels is None else reading.labels[index].detach().clone(),
        None if masks is None else masks[index].detach().clone(),
    )
