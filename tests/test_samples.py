"""Choosing and holding the fixed samples, without a Trainer."""

import io

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset
from torchvision import transforms

from lightning_saliency import SaliencyConfigError
from lightning_saliency.callback.samples import (
    BatchKeys,
    FixedSamples,
    choose_indices,
    collect_samples,
    find_normalize,
    pick_loader,
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


def test_collect_from_a_map_style_set_and_from_a_stream():
    dataset = [{"image": torch.full((3, 4, 4), float(i)), "label": i % 2} for i in range(10)]
    batch, indices = collect_samples(DataLoader(dataset, batch_size=4), 3, seed=0)
    assert [int(v) for v in batch["image"][:, 0, 0, 0]] == indices and len(indices) == 3

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.full((3, 4, 4), float(i)), i) for i in range(10))

    batch, indices = collect_samples(DataLoader(Stream(), batch_size=2), 3, seed=0)
    assert indices is None and batch[0][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]


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
