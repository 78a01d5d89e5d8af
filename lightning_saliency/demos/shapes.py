"""A planted-shortcut image set: shapes to classify, and a cue that can cheat.

Each image shows one shape (the class) at a random place, size and colour on a random smooth
background, with a per-pixel object mask. A cue carries a class colour; with probability
``shortcut_p`` it is the colour of the image's class (the shortcut), otherwise another class's
colour. ``shortcut_p=None`` draws the colour uniformly (no information): the clean control.
``shortcut_p=0.0`` always disagrees with the label: the "shortcut broken" split on which a
model that learnt the cue collapses. The cue is one of :data:`SHORTCUT_KINDS`:

- ``"corner"``: a small patch in the top-left corner (one fixed place);
- ``"background"``: the background is tinted with the colour (Waterbirds-like: the context
  gives the class away, everywhere but on the object);
- ``"mark"``: a small framed mark stamped at a random place off the object (a watermark, a
  hospital tag: a cue that moves).

The shapes, their places and colours are the same for every kind at one seed; only the cue
differs. Everything is deterministic from ``seed``.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHORTCUT_KINDS: tuple[str, ...] = ("corner", "background", "mark")
ShortcutKind = Literal["corner", "background", "mark"]
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


def draw_shapes(
    n: int,
    size: int,
    num_classes: int,
    gen: torch.Generator,
    radius: tuple[float, float] = (0.14, 0.1),
    margin: float = 0.0,
) -> dict[str, Tensor]:
    """``n`` shapes of a random class, place, colour and radius (``radius``: its least value
    and its spread, as shares of the side: 14-24 % by default), kept ``margin`` pixels off the
    top and left edges, on random smooth backgrounds: ``images`` (shape painted),
    ``background`` (without it), ``colours``, ``labels`` and ``masks``.

    Examples:
        >>> out = draw_shapes(2, 32, 4, torch.Generator().manual_seed(0), radius=(0.07, 0.03))
        >>> out["images"].shape, bool(out["masks"].float().mean() < 0.05)
        (torch.Size([2, 3, 32, 32]), True)
    """
    labels = torch.randint(num_classes, (n,), generator=gen)
    r = size * (radius[0] + radius[1] * torch.rand(n, generator=gen))
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
    colours = torch.rand(n, 3, generator=gen) * 0.7 + 0.3
    painted = torch.where(masks[:, None], colours[:, :, None, None], images).clamp(0, 1)
    return {
        "images": painted,
        "background": images,
        "colours": colours,
        "labels": labels,
        "masks": masks,
    }


def make_shortcut_images(
    n: int,
    size: int = 48,
    shortcut_p: float | None = 0.95,
    seed: int = 0,
    num_classes: int = 4,
    patch_size: int | None = None,
    kind: ShortcutKind = "corner",
) -> dict[str, Tensor]:
    """Generate ``n`` images ``(N, 3, size, size)`` in ``[0, 1]`` with labels, object masks,
    the cue's class (``patch_labels``), the corner patch's mask (``patch_mask``) and where each
    image's cue is (``cue_masks``, ``(N, size, size)``).

    Examples:
        >>> data = make_shortcut_images(8, size=32, shortcut_p=1.0)
        >>> data["images"].shape, bool((data["patch_labels"] == data["labels"]).all())
        (torch.Size([8, 3, 32, 32]), True)
        >>> mark = make_shortcut_images(8, size=32, kind="mark")
        >>> bool((mark["cue_masks"] & mark["masks"]).any())  # the mark never covers the object
        False
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 2..{len(SHAPES)}")
    if kind not in SHORTCUT_KINDS:
        raise ValueError(f"kind must be one of {SHORTCUT_KINDS}, got {kind!r}")
    gen = torch.Generator().manual_seed(seed)
    patch = patch_size or max(4, size // 7)
    drawn = draw_shapes(n, size, num_classes, gen, margin=patch + 3)
    labels, masks, images = drawn["labels"], drawn["masks"], drawn["background"]
    colour = drawn["colours"]

    if shortcut_p is None:
        patch_labels = torch.randint(num_classes, (n,), generator=gen)
    else:
        other = (labels + 1 + torch.randint(num_classes - 1, (n,), generator=gen)) % num_classes
        agree = torch.rand(n, generator=gen) < shortcut_p
        patch_labels = torch.where(agree, labels, other)
    cue_colour = PATCH_COLORS[patch_labels][:, :, None, None]
    patch_mask = torch.zeros(size, size, dtype=torch.bool)
    patch_mask[2 : 2 + patch, 2 : 2 + patch] = True
    if kind == "background":  # the context, tinted half way to the class colour
        images = 0.5 * images + 0.5 * (0.15 + 0.6 * cue_colour)
    images = torch.where(masks[:, None], colour[:, :, None, None], images)
    if kind == "corner":
        cue_masks = patch_mask.expand(n, size, size).clone()
        images = torch.where(patch_mask, cue_colour, images)
    elif kind == "background":
        cue_masks = ~masks
    else:
        cue_masks, frame = _place_marks(masks, max(5, size // 8), gen)
        images = torch.where(frame[:, None], torch.full_like(images, 0.05), images)
        images = torch.where((cue_masks & ~frame)[:, None], cue_colour, images)
    return {
        "images": images.clamp(0, 1),
        "labels": labels,
        "masks": masks,
        "patch_labels": patch_labels,
        "patch_mask": patch_mask,
        "cue_masks": cue_masks,
    }


def _place_marks(masks: Tensor, side: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Square marks of ``side`` pixels at random places that do not touch the object (one
    pixel of clearance), and their one-pixel dark frame; both ``(N, H, W)`` bool."""
    n, size = masks.shape[0], masks.shape[-1]
    clear = torch.nn.functional.max_pool2d(masks[:, None].float(), 3, 1, 1)[:, 0] > 0
    coords = torch.arange(size)
    placed = torch.zeros(n, size, size, dtype=torch.bool)
    todo = torch.ones(n, dtype=torch.bool)
    for _ in range(64):  # rejection sampling, all images at once
        x0 = torch.randint(1, size - side, (n,), generator=gen)
        y0 = torch.randint(1, size - side, (n,), generator=gen)
        inside_x = (coords[None] >= x0[:, None]) & (coords[None] < x0[:, None] + side)
        inside_y = (coords[None] >= y0[:, None]) & (coords[None] < y0[:, None] + side)
        square = inside_y[:, :, None] & inside_x[:, None, :]
        ok = todo & ~(square & clear).flatten(1).any(1)
        placed[ok] = square[ok]
        todo &= ~ok
        if not todo.any():
            break
    if todo.any():
        raise ValueError("no room for the mark beside the object; use larger images")
    inner = torch.nn.functional.max_pool2d((~placed)[:, None].float(), 3, 1, 1)[:, 0] == 0
    return placed, placed & ~inner


class ShortcutShapes(Dataset[dict[str, Tensor]]):
    """The generated set as a map-style dataset of ``{"image", "label", "mask"}`` dicts (no
    ``"mask"`` with ``masks=False``, as most real data sets), with a torchvision ``Normalize``
    in ``transform`` (the callback finds it to de-normalise).

    Examples:
        >>> ds = ShortcutShapes(4, size=32)
        >>> sorted(ds[0]), ds.classes[:2]
        (['image', 'label', 'mask'], ['circle', 'square'])
        >>> sorted(ShortcutShapes(4, size=32, kind="mark", masks=False)[0])
        ['image', 'label']
    """

    def __init__(
        self,
        n: int,
        size: int = 48,
        shortcut_p: float | None = 0.95,
        seed: int = 0,
        num_classes: int = 4,
        kind: ShortcutKind = "corner",
        masks: bool = True,
    ) -> None:
        data = make_shortcut_images(n, size, shortcut_p, seed, num_classes, kind=kind)
        self.images, self.labels, self.masks = data["images"], data["labels"], data["masks"]
        self.patch_mask, self.cue_masks = data["patch_mask"], data["cue_masks"]
        self.with_masks = masks
        self.transform = transforms.Normalize(MEAN, STD)
        self.classes = list(SHAPES[:num_classes])
        self.targets = self.labels.tolist()

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {"image": self.transform(self.images[index]), "label": self.labels[index]}
        if self.with_masks:
            item["mask"] = self.masks[index]
        return item


class ShortcutDataModule(L.LightningDataModule):
    """Train on the planted shortcut of ``kind`` (or not, ``shortcut=False``: the cue is
    there but carries no information); validate on two splits: index 0 with the shortcut
    intact, index 1 with it broken (the cue always lies). ``masks=False`` leaves the object
    masks out of the batches.

    Examples:
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
        kind: ShortcutKind = "corner",
        masks: bool = True,
    ) -> None:
        super().__init__()
        if kind not in SHORTCUT_KINDS:
            raise ValueError(f"kind must be one of {SHORTCUT_KINDS}, got {kind!r}")
        self.save_hyperparameters()
        self.classes = list(SHAPES[:num_classes])

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        size, seed, classes = hp["size"], hp["seed"], hp["num_classes"]
        kind, masks = hp["kind"], hp["masks"]
        train_p = hp["shortcut_p"] if hp["shortcut"] else None
        val_p = 1.0 if hp["shortcut"] else None
        self.train_set = ShortcutShapes(hp["n_train"], size, train_p, seed, classes, kind, masks)
        self.val_set = ShortcutShapes(hp["n_val"], size, val_p, seed + 1, classes, kind, masks)
        self.broken_set = ShortcutShapes(hp["n_val"], size, 0.0, seed + 2, classes, kind, masks)

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
