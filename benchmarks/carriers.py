"""The detection benchmark's images and the cues it plants in them.

Carriers (what the model is meant to classify), all at ``SIZE`` pixels, RGB in ``[0, 1]``:

- ``shapes``: the generated shapes of :mod:`lightning_saliency.demos.shapes` (4 classes; objects
  of 14-24 % of the side in radius, 6-18 % of the image);
- ``shapes_small``: the same with objects of 9-12 % of the side in radius (2-4.5 % of the
  image, about the size of a mark and of the probe's hottest 2 %: the object-size factor);
- ``digits``: scikit-learn's handwritten digits 0-3 (8 px, upsampled; 4 classes, 720 images,
  the training part twice, each copy with cues of its own), white ink on black, the ink as the
  object mask;
- ``faces``: scikit-image's face / non-face subset of Labeled Faces in the Wild (25 px,
  upsampled; 2 classes, 200 images, the training part thrice with its mirror images). They fill the
  frame: no mask, the whole image is "background" for the tint and texture cues.

Cues (class-coded, planted over the carrier; ``cue_class`` gives each image's cue class, ``-1``
for none):

- ``corner``: a patch of the class colour in the top-left corner;
- ``mark``: a framed square of the class colour at a random place off the object;
- ``tint``: the background (everything but the object) tinted half way to the class colour;
- ``texture``: the background blended with the class's texture (scikit-image's brick, grass,
  gravel and moon surface), grey, so no colour gives it away;
- ``late``: a mark that only enters the data at :data:`LATE_EPOCH` (a pipeline bug).

Nothing is downloaded: scikit-learn and scikit-image ship these images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_saliency.demos.shapes import PATCH_COLORS, draw_shapes

SIZE = 40
LATE_EPOCH = 2
CARRIERS = ("shapes", "shapes_small", "digits", "faces")
CUES = ("corner", "mark", "tint", "texture", "late")
TEXTURES = ("brick", "grass", "gravel", "moon")


@dataclass(frozen=True)
class Images:
    """A carrier's images ``(N, 3, SIZE, SIZE)``, labels, object masks (``None``: the object
    fills the frame) and class count."""

    images: Tensor
    labels: Tensor
    masks: Tensor | None
    classes: int

    def take(self, index: Tensor) -> Images:
        masks = None if self.masks is None else self.masks[index]
        return Images(self.images[index], self.labels[index], masks, self.classes)


def _upsample(gray: Tensor) -> Tensor:
    """``(N, h, w)`` grey -> ``(N, 3, SIZE, SIZE)``."""
    big = F.interpolate(gray[:, None].float(), size=(SIZE, SIZE), mode="bilinear")
    return big.clamp(0, 1).expand(-1, 3, -1, -1).contiguous()


def carrier(name: str, seed: int, n_train: int = 800, n_val: int = 192) -> tuple[Images, Images]:
    """The training and validation images of carrier ``name`` at ``seed`` (a split, or new
    images, per seed).

    Example:
        >>> train, val = carrier("shapes", 0, 8, 4)
        >>> train.images.shape, val.classes
        (torch.Size([8, 3, 40, 40]), 4)
    """
    gen = torch.Generator().manual_seed(seed)
    if name in ("shapes", "shapes_small"):
        radius = (0.14, 0.1) if name == "shapes" else (0.09, 0.03)
        sets = []
        # small shapes are slower to learn: twice the images, so that clean runs learn them
        for n in (n_train * (2 if name == "shapes_small" else 1), n_val):
            drawn = draw_shapes(n, SIZE, 4, gen, radius=radius, margin=3)
            sets.append(Images(drawn["images"], drawn["labels"], drawn["masks"], 4))
        return sets[0], sets[1]
    if name == "digits":
        from sklearn.datasets import load_digits

        data = load_digits()
        keep = torch.from_numpy(data.target < 4)
        gray = torch.from_numpy(data.images)[keep] / 16.0
        images = _upsample(gray)
        every = Images(images, torch.from_numpy(data.target)[keep].long(), images[:, 0] > 0.3, 4)
    elif name == "faces":
        from skimage.data import lfw_subset

        gray = torch.from_numpy(lfw_subset())
        labels = torch.cat([torch.zeros(100), torch.ones(100)]).long()  # faces, then not
        every = Images(_upsample(gray), labels, None, 2)
    else:
        raise ValueError(f"carrier must be one of {CARRIERS}, got {name!r}")
    order = torch.randperm(len(every.labels), generator=gen)
    cut = len(order) * 7 // 10
    train, val = every.take(order[:cut]), every.take(order[cut:])
    # few images: each repeated (faces mirrored too), for about as many steps as on shapes
    copies = 2 if name == "digits" else 3
    images = [train.images, train.images.flip(-1)] if name == "faces" else [train.images]
    images = (images * copies)[: 2 * copies if name == "faces" else copies]
    reps = len(images)
    masks = None if train.masks is None else train.masks.repeat(reps, 1, 1)
    train = Images(torch.cat(images), train.labels.repeat(reps), masks, train.classes)
    return train, val


def with_object_agreement(data: Images, agreement: float, gen: torch.Generator) -> Images:
    """``data`` with the object of another class's image on ``1 - agreement`` of the images
    (labels kept): the object then tells the class on ``agreement`` of them.

    Example:
        >>> train, _ = carrier("shapes", 0, 400, 1)
        >>> mixed = with_object_agreement(train, 0.75, torch.Generator().manual_seed(0))
        >>> round(float((mixed.labels == train.labels).float().mean()), 2)
        1.0
        >>> 0.2 < float((mixed.images != train.images).flatten(1).any(1).float().mean()) < 0.3
        True
    """
    n = len(data.labels)
    swap = torch.rand(n, generator=gen) >= agreement
    order = torch.randperm(n, generator=gen)
    # each swapped image takes the next image in a random order whose class differs
    donors = torch.empty(n, dtype=torch.long)
    for i in swap.nonzero().flatten().tolist():
        start = int(torch.randint(n, (1,), generator=gen))
        for step in range(n):
            j = int(order[(start + step) % n])
            if data.labels[j] != data.labels[i]:
                donors[i] = j
                break
    index = torch.where(swap, donors, torch.arange(n))
    masks = None if data.masks is None else data.masks[index]
    return Images(data.images[index], data.labels, masks, data.classes)


def cue_classes(
    labels: Tensor, classes: int, p: float | None, share: float, gen: torch.Generator
) -> Tensor:
    """Each image's cue class: on ``share`` of each class's images, the label with probability
    ``p`` and another class otherwise (``p=None``: uniform, no information); ``-1`` (no cue) on
    the rest.

    Example:
        >>> labels = torch.arange(4).repeat(25)
        >>> c = cue_classes(labels, 4, 1.0, 1.0, torch.Generator().manual_seed(0))
        >>> bool((c == labels).all())
        True
        >>> c = cue_classes(labels, 4, 1.0, 0.3, torch.Generator().manual_seed(0))
        >>> 0.2 < float((c >= 0).float().mean()) < 0.4
        True
    """
    n = labels.numel()
    if p is None:
        cue = torch.randint(classes, (n,), generator=gen)
    else:
        other = (labels + 1 + torch.randint(classes - 1, (n,), generator=gen)) % classes
        cue = torch.where(torch.rand(n, generator=gen) < p, labels, other)
    carries = torch.rand(n, generator=gen) < share
    return torch.where(carries, cue, torch.full_like(cue, -1))


@cache  # read and resized once per process, not once per planted set
def _textures(classes: int) -> Tensor:
    """``(classes, SIZE*3, SIZE*3)`` grey textures in ``[0, 1]``, one per class."""
    import skimage.data

    out = []
    for name in TEXTURES[:classes]:
        image = torch.from_numpy(getattr(skimage.data, name)()).float() / 255.0
        small = F.interpolate(image[None, None], size=(SIZE * 3, SIZE * 3), mode="area")[0, 0]
        out.append((small - small.mean()) / small.std().clamp(min=1e-6) * 0.2 + 0.5)
    return torch.stack(out).clamp(0, 1)


def _marks(masks: Tensor | None, n: int, side: int, gen: torch.Generator) -> Tensor:
    """``(N, SIZE, SIZE)`` squares of ``side`` at random places clear of the object."""
    coords = torch.arange(SIZE)
    clear = (
        torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
        if masks is None
        else F.max_pool2d(masks[:, None].float(), 3, 1, 1)[:, 0] > 0
    )
    placed = torch.zeros(n, SIZE, SIZE, dtype=torch.bool)
    todo = torch.ones(n, dtype=torch.bool)
    for attempt in range(128):
        x0 = torch.randint(1, SIZE - side, (n,), generator=gen)
        y0 = torch.randint(1, SIZE - side, (n,), generator=gen)
        square = ((coords[None] >= y0[:, None]) & (coords[None] < y0[:, None] + side))[
            :, :, None
        ] & ((coords[None] >= x0[:, None]) & (coords[None] < x0[:, None] + side))[:, None, :]
        overlap = (square & clear).flatten(1).sum(1)
        # a digit leaves little room: after 64 tries, a small overlap is accepted
        ok = todo & (overlap <= (0 if attempt < 64 else side))
        placed[ok] = square[ok]
        todo &= ~ok
        if not todo.any():
            break
    placed[todo] = False  # no room found: no mark (counted in no image's favour)
    return placed


def plant(data: Images, cue: str, cue_class: Tensor, gen: torch.Generator) -> Tensor:
    """The images with cue ``cue`` of class ``cue_class`` (``-1``: none) planted.

    Example:
        >>> train, _ = carrier("shapes", 0, 4, 1)
        >>> out = plant(train, "corner", torch.tensor([0, 1, -1, 3]), torch.Generator())
        >>> out[2].equal(train.images[2]), out[0, :, 3, 3].tolist() == PATCH_COLORS[0].tolist()
        (True, True)
    """
    images = data.images.clone()
    has = cue_class >= 0
    colour = PATCH_COLORS[cue_class.clamp(min=0)][:, :, None, None]
    background = (
        torch.ones_like(images[:, 0], dtype=torch.bool) if data.masks is None else ~data.masks
    )
    where: Tensor
    if cue == "corner":
        side = max(4, SIZE // 7)
        where = torch.zeros_like(background)
        where[:, 2 : 2 + side, 2 : 2 + side] = True
        images = torch.where(where[:, None], colour, images)
    elif cue in ("mark", "late"):
        side = max(5, SIZE // 8)
        where = _marks(data.masks, len(images), side, gen)
        inner = F.max_pool2d((~where)[:, None].float(), 3, 1, 1)[:, 0] == 0
        images = torch.where((where & ~inner)[:, None], torch.full_like(images, 0.05), images)
        images = torch.where(inner[:, None], colour, images)
    elif cue == "tint":
        strength = 0.5 if data.masks is not None else 0.3
        tinted = (1 - strength) * images + strength * (0.15 + 0.6 * colour)
        images = torch.where(background[:, None], tinted, images)
    elif cue == "texture":
        textures = _textures(data.classes)
        n = len(images)
        top = torch.randint(0, 2 * SIZE, (n,), generator=gen)
        left = torch.randint(0, 2 * SIZE, (n,), generator=gen)
        rows = top[:, None] + torch.arange(SIZE)[None]
        cols = left[:, None] + torch.arange(SIZE)[None]
        crops = textures[cue_class.clamp(min=0)[:, None, None], rows[:, :, None], cols[:, None]]
        strength = 0.6 if data.masks is not None else 0.35
        blended = (1 - strength) * images + strength * crops[:, None]
        images = torch.where(background[:, None], blended, images)
    else:
        raise ValueError(f"cue must be one of {CUES}, got {cue!r}")
    return torch.where(has[:, None, None, None], images, data.images)


def object_share(data: Images) -> float:
    """The mean share of the image the object covers (``nan`` without masks)."""
    if data.masks is None:
        return math.nan
    return float(data.masks.float().mean())
