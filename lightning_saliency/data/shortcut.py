"""A planted-shortcut image set: shapes to classify, a coloured corner patch that can cheat.

Each image shows one shape (the class) at a random place, size and colour on a random smooth
background, with a per-pixel object mask. A small patch in the top-left corner carries a colour;
with probability ``shortcut_p`` it is the colour of the image's class (the shortcut), otherwise
another class's colour. ``shortcut_p=None`` draws the colour uniformly (no information): the
clean control. ``shortcut_p=0.0`` always disagrees with the label: the "shortcut broken" split
on which a model that learnt the patch collapses. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
PATCH_COLORS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.2, 0.3, 1.0], [1.0, 1.0, 0.1]])
MEAN, STD = (0.45, 0.45, 0.45), (0.25, 0.25, 0.25)


def _shape_masks(kind: Tensor, cx: Tensor, cy: Tensor, r: Tensor, size: int) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32)
    y, x = coords[None, :, None], coords[None, None, :]
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx**2 + dy**2 <= rr**2
    square = (dx.abs() <= rr * 0.85) & (dy.abs() <= rr * 0.85)
    triangle = (dy <= rr * 0.8) & (dy >= -rr) & (dx.abs() <= (dy + rr) * 0.6)
    arm = rr / 3
    cross = ((dx.abs() <= arm) & (dy.abs() <= rr)) | ((dy.abs() <= arm) & (dx.abs() <= rr))
    options = torch.stack([circle, square, triangle, cross], dim=1)  # (N, 4, H, W)
    return options[torch.arange(kind.numel()), kind]


def make_shortcut_images(
    n: int,
    size: int = 48,
    shortcut_p: float | None = 0.95,
    seed: int = 0,
    num_classes: int = 4,
    patch_size: int | None = None,
) -> dict[str, Tensor]:
    """Generate ``n`` images ``(N, 3, size, size)`` in ``[0, 1]`` with labels, object masks,
    the patch's class (``patch_labels``) and the patch mask.

    Example:
        >>> data = make_shortcut_images(8, size=32, shortcut_p=1.0)
        >>> data["images"].shape, bool((data["patch_labels"] == data["labels"]).all())
        (torch.Size([8, 3, 32, 32]), True)
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPES)}")
    gen = torch.Generator().manual_seed(seed)
    patch = patch_size or max(4, size // 7)
    margin = patch + 3
    labels = torch.randint(num_classes, (n,), generator=gen)
    r = size * (0.14 + 0.1 * torch.rand(n, generator=gen))
    low = margin + r
    span = (size - 1 - r) - low
    cx = low + span * torch.rand(n, generator=gen)
    cy = low + span * torch.rand(n, generator=gen)
    masks = _shape_masks(labels, cx, cy, r, size)

    background = torch.rand(n, 3, 4, 4, generator=gen) * 0.6 + 0.1
    images = torch.nn.functional.interpolate(
        background, size=(size, size), mode="bilinear", align_corners=False
    )
    images = images + 0.05 * torch.randn(n, 3, size, size, generator=gen)
    colour = torch.rand(n, 3, generator=gen) * 0.7 + 0.3
    images = torch.where(masks[:, None], colour[:, :, None, None], images)

    if shortcut_p is None:
        patch_labels = torch.randint(num_classes, (n,), generator=gen)
    else:
        other = (labels + 1 + torch.randint(num_classes - 1, (n,), generator=gen)) % num_classes
        agree = torch.rand(n, generator=gen) < shortcut_p
        patch_labels = torch.where(agree, labels, other)
    patch_mask = torch.zeros(size, size, dtype=torch.bool)
    patch_mask[2 : 2 + patch, 2 : 2 + patch] = True
    images = torch.where(patch_mask, PATCH_COLORS[patch_labels][:, :, None, None], images)
    return {
        "images": images.clamp(0, 1),
        "labels": labels,
        "masks": masks,
        "patch_labels": patch_labels,
        "patch_mask": patch_mask,
    }


class ShortcutShapes(Dataset[dict[str, Tensor]]):
    """The generated set as a map-style dataset of ``{"image", "label", "mask"}`` dicts, with a
    torchvision ``Normalize`` in ``transform`` (the callback finds it to de-normalise).

    Example:
        >>> ds = ShortcutShapes(4, size=32)
        >>> sorted(ds[0]), ds.classes[:2]
        (['image', 'label', 'mask'], ['circle', 'square'])
    """

    def __init__(
        self,
        n: int,
        size: int = 48,
        shortcut_p: float | None = 0.95,
        seed: int = 0,
        num_classes: int = 4,
    ) -> None:
        data = make_shortcut_images(n, size, shortcut_p, seed, num_classes)
        self.images, self.labels, self.masks = data["images"], data["labels"], data["masks"]
        self.patch_mask = data["patch_mask"]
        self.transform = transforms.Normalize(MEAN, STD)
        self.classes = list(SHAPES[:num_classes])
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "image": self.transform(self.images[index]),
            "label": self.labels[index],
            "mask": self.masks[index],
        }


class ShortcutDataModule(L.LightningDataModule):
    """Train on the planted shortcut (or not, ``shortcut=False``); validate on two splits:
    index 0 with the shortcut intact, index 1 with it broken (the patch always lies).

    Example:
        >>> dm = ShortcutDataModule(n_train=16, n_val=8, size=32)
        >>> dm.setup("fit"); len(dm.val_dataloader())
        2
    """

    def __init__(
        self,
        shortcut: bool = True,
        shortcut_p: float = 0.95,
        n_train: int = 2000,
        n_val: int = 256,
        size: int = 48,
        batch_size: int = 64,
        num_classes: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(SHAPES[:num_classes])

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        size, seed, classes = hp["size"], hp["seed"], hp["num_classes"]
        train_p = hp["shortcut_p"] if hp["shortcut"] else None
        self.train_set = ShortcutShapes(hp["n_train"], size, train_p, seed, classes)
        self.val_set = ShortcutShapes(
            hp["n_val"], size, 1.0 if hp["shortcut"] else None, seed + 1, classes
        )
        self.broken_set = ShortcutShapes(hp["n_val"], size, 0.0, seed + 2, classes)

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        gen = torch.Generator().manual_seed(self.hparams["seed"])
        return DataLoader(
            self.train_set, batch_size=self.hparams["batch_size"], shuffle=True, generator=gen
        )

    def val_dataloader(self) -> list[DataLoader[dict[str, Tensor]]]:
        return [
            DataLoader(self.val_set, batch_size=self.hparams["batch_size"]),
            DataLoader(self.broken_set, batch_size=self.hparams["batch_size"]),
        ]
