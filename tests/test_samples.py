"""Choosing and holding the fixed samples, without a Trainer."""

import io

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torchvision import transforms

from lightning_saliency import SaliencyConfigError
from lightning_saliency.callback.capture import SampleCapture
from lightning_saliency.callback.samples import (
    BatchKeys,
    FixedSamples,
    choose_indices,
    find_class_names,
    find_normalize,
    pick_loader,
    read_labels,
    split_batch,
)

X = torch.zeros(4, 3, 8, 8)
Y = torch.tensor([0, 1, 2, 3])
M = torch.ones(4, 1, 8, 8, dtype=torch.bool)


@pytest.mark.parametrize(
    "batch",
    [
        (X, Y, M),
        [X, Y, M],
        {"image": X, "label": Y, "mask": M},
        {"pixel_values": X, "labels": Y, "masks": M},
    ],
)
def test_batches_of_every_shape_give_images_labels_and_masks(batch):
    images, labels, masks = split_batch(batch)
    assert images is X and torch.equal(labels, Y) and masks.shape == (4, 8, 8)


def test_custom_keys_and_what_is_not_a_label():
    images, labels, masks = split_batch({"x_in": X, "cls": Y.float()}, BatchKeys("x_in", "cls"))
    assert images is X and labels is None and masks is None  # float "labels" are not classes
    assert split_batch(X)[0] is X


@pytest.mark.parametrize(
    "batch, message",
    [
        ({"pixels": X}, "set SaliencyCallback\\(image_key=...\\)"),
        ((torch.zeros(4, 10, dtype=torch.long), Y), "float image tensor"),
        (42, "cannot find images"),
    ],
)
def test_batches_without_images_are_refused_naming_the_fix(batch, message):
    with pytest.raises(SaliencyConfigError, match=message):
        split_batch(batch)


def test_choice_is_private_deterministic_and_spread_over_classes():
    dataset = [(torch.zeros(3, 4, 4), i % 4) for i in range(40)]
    state = torch.get_rng_state()
    first = choose_indices(dataset, 8, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is never used
    assert first == choose_indices(dataset, 8, seed=3) != choose_indices(dataset, 8, seed=4)
    assert sorted(dataset[i][1] for i in first) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert choose_indices(dataset[:5], 8, seed=0) == [0, 1, 2, 3, 4]  # fewer than asked


def _capture_run(capture, loader):
    """One run of ``loader`` through ``capture`` (the batches of this rank, as the loop
    yields them)."""
    capture.start(loader, batches=float("inf"))
    for b, batch in enumerate(loader):
        capture.see(batch, b)


def test_capture_reads_the_same_indices_from_each_run_and_sees_later_changes():
    images = torch.stack([torch.full((3, 4, 4), float(i)) for i in range(10)])
    data = TensorDataset(images, torch.arange(10) % 2)
    capture = SampleCapture(num=3, seed=0)
    _capture_run(capture, DataLoader(data, batch_size=4))
    first = capture.finish()
    assert [int(v) for v in first.images[:, 0, 0, 0]] == first.indices == capture.indices
    images += 100  # a change that enters the validation data later
    _capture_run(capture, DataLoader(data, batch_size=4))
    again = capture.finish()
    assert again.indices == first.indices and torch.equal(again.images, first.images + 100)


def _two_ranks(data, num, seed):
    """Two ranks' captures of one run over ``data``, each through its DistributedSampler."""
    from torch.utils.data.distributed import DistributedSampler

    captures = []
    for rank in range(2):
        sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        capture = SampleCapture(num=num, seed=seed, rank=rank, world=2)
        _capture_run(capture, DataLoader(data, batch_size=2, sampler=sampler))
        captures.append(capture)
    return captures


def test_capture_under_two_ranks_holds_what_one_process_holds():
    """Each index is copied on the lowest rank that runs it (DistributedSampler pads by
    repeating), and the sum over ranks gives every rank the one-process samples."""
    data = TensorDataset(torch.arange(9.0)[:, None, None, None].expand(9, 1, 2, 2), torch.zeros(9))
    alone = SampleCapture(num=5, seed=1)
    _capture_run(alone, DataLoader(data, batch_size=2))
    single = alone.finish()
    parts = _two_ranks(data, num=5, seed=1)
    from_rank_1: list[torch.Tensor] = []
    parts[1].finish(lambda t: from_rank_1.append(t) or t)  # what rank 1 puts in the sum
    both = parts[0].finish(lambda t: t + from_rank_1.pop(0))  # the all-reduce, on rank 0
    assert both.indices == single.indices
    assert torch.equal(both.images, single.images)  # no row counted twice


def test_samples_are_the_batch_rows_bit_for_bit_in_every_precision():
    for dtype in (torch.float64, torch.bfloat16, torch.float32):
        images = (torch.rand(6, 1, 2, 2, dtype=torch.float64) / 3).to(dtype)
        capture = SampleCapture(num=3, seed=0)
        _capture_run(capture, DataLoader(TensorDataset(images), batch_size=2))
        samples = capture.finish()
        assert samples.images.dtype == dtype
        assert torch.equal(samples.images, images[samples.indices]), dtype


def test_every_rank_dry_runs_rank_zeros_probe():
    """Each rank's first batch differs; the dry run checks rank zero's rows on every rank, so
    a mistake in the data is found on all ranks alike (not on one, leaving the other waiting)."""
    data = TensorDataset(torch.arange(8.0)[:, None, None, None].expand(8, 1, 2, 2), torch.arange(8))
    captures = _two_ranks(data, num=2, seed=0)
    assert captures[1].probe.labels.tolist() == [1, 3]  # rank 1's own first rows
    from_rank_0: list[torch.Tensor] = []
    captures[0].shared_probe(lambda t: from_rank_0.append(t) or t)
    probe = captures[1].shared_probe(lambda t: t + from_rank_0.pop(0))
    assert probe.labels.tolist() == [0, 2] and probe.labels.dtype == torch.long
    assert probe.images[:, 0, 0, 0].tolist() == [0.0, 2.0]


def test_capture_keeps_the_first_rows_where_the_order_is_not_fixed():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.full((3, 4, 4), float(i)), i) for i in range(10))

    capture = SampleCapture(num=3, seed=0)
    _capture_run(capture, DataLoader(Stream(), batch_size=2))
    samples = capture.finish()
    assert samples.indices is None and samples.images[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert capture.kept == "it streams an IterableDataset"
    shuffled = SampleCapture(num=2, seed=0)
    _capture_run(shuffled, DataLoader(TensorDataset(torch.zeros(4, 3, 2, 2)), shuffle=True))
    assert shuffled.kept == "its sampler is a RandomSampler"


def test_labels_in_every_form_a_batch_carries_them():
    onehot = torch.eye(4)[Y]
    assert torch.equal(read_labels(onehot, 4).labels, Y)
    soft = 0.9 * onehot + 0.025  # label smoothing
    assert torch.equal(read_labels(soft, 4).labels, Y)
    assert torch.equal(read_labels(Y[:, None], 4).labels, Y)
    multi = onehot.clone()
    multi[0, 3] = 1
    reading = read_labels(multi, 4)
    assert reading.labels is None and reading.multi_hot
    assert "regression" in read_labels(Y.float() + 0.5, 4).problem
    assert read_labels(["cat"] * 4, 4).problem == "labels of type list, not a tensor"


def test_normalize_v2_and_class_names_are_found_behind_subset_and_concat():
    from torch.utils.data import ConcatDataset, Subset
    from torchvision.transforms import v2

    class Named(torch.utils.data.Dataset):
        classes = ["cat", "dog"]
        transform = v2.Compose([v2.ToImage(), v2.Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))])

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(3, 2, 2), i % 2

    chain = Subset(ConcatDataset([Named(), Named()]), [0, 5])
    assert find_normalize(chain) == (pytest.approx([0.5, 0.4, 0.3]), pytest.approx([0.2] * 3))
    assert find_class_names(None, chain) == ["cat", "dog"]


def test_pick_loader_by_index():
    a, b = DataLoader([1]), DataLoader([2])
    assert pick_loader([a, b], 1) is b and pick_loader({"x": a, "y": b}, 0) is a
    assert pick_loader(a, 0) is a and pick_loader(None, 0) is None
    with pytest.raises(SaliencyConfigError, match="dataloader_idx=2 but there are 2"):
        pick_loader([a, b], 2)


def test_normalize_is_found_in_nested_transforms():
    class Wrapped:
        def __init__(self):
            self.dataset = type("Inner", (), {})()
            self.dataset.transform = transforms.Compose(
                [transforms.ToTensor(), transforms.Normalize((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))]
            )

    mean, std = find_normalize(Wrapped())
    assert mean == pytest.approx([0.5, 0.4, 0.3]) and std == pytest.approx([0.2, 0.2, 0.2])
    assert find_normalize(object()) is None


def test_fixed_samples_survive_a_weights_only_checkpoint():
    samples = FixedSamples(X.clone(), Y.clone(), M[:, 0].clone(), [3, 1, 4, 1])
    buffer = io.BytesIO()
    torch.save(samples.state(), buffer)
    buffer.seek(0)
    restored = FixedSamples.from_state(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.images, X) and restored.indices == [3, 1, 4, 1]
    assert len(restored.to(torch.device("cpu"))) == 4
