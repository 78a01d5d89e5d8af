"""What a person looks at: captions, concept legends, per-method grids, the overview, the timeline.

The callback and the command line build their pictures here, from an
:class:`~lightning_saliency.engine.explanations.Explanations` and the model inputs;
:mod:`render` does the
pixel work on the device. Pictures come back as ``uint8`` tensors on the maps' device: the
loggers copy each finished picture to the host once. How a method's maps are drawn (concept
colours, a diverging scale for signed maps) comes from the method's record, not its name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_saliency.engine.class_names import class_name
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.engine.methods import METHODS
from lightning_saliency.viz import render


def captions(
    logits: Tensor,
    targets: Tensor | None = None,
    labels: Tensor | None = None,
    names: Sequence[str] | None = None,
    width: int | None = None,
) -> list[str]:
    """One short caption per image: ``label>pred 93% ok|X`` when labels are known, else
    ``pred 93%`` and, when the explained class is not the prediction, ``t=<target>``. With
    ``width`` (pixels), class names are abbreviated until the caption fits, never cut.

    Examples:
        >>> import torch
        >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
        >>> captions(logits, labels=torch.tensor([0, 0]), names=["cat", "dog"])
        ['cat>cat 98% ok', 'cat>dog 98% X']
        >>> captions(logits, labels=torch.tensor([0, 0]), names=["triangle", "dog"], width=100)
        ['tria>tria 98% ok', 'tria>dog 98% X']
        >>> captions(logits, targets=torch.tensor([0, 0]), names=["cat", "dog"])
        ['cat 98%', 'dog 98% t=cat']
    """
    conf, pred = logits.float().softmax(dim=1).max(dim=1)
    pred_l, conf_l = pred.tolist(), conf.tolist()
    texts = []
    if labels is not None:
        for label, p, c in zip(labels.tolist(), pred_l, conf_l):
            mark = "ok" if label == p else "X"
            texts.append(f"{class_name(names, label)}>{class_name(names, p)} {c:.0%} {mark}")
    else:
        target_l = pred_l if targets is None else targets.tolist()
        for t, p, c in zip(target_l, pred_l, conf_l):
            text = f"{class_name(names, p)} {c:.0%}"
            texts.append(text if t == p else f"{text} t={class_name(names, t)}")
    return texts if width is None else [render.fit(t, width) for t in texts]


def explanation_captions(
    out: Explanations,
    labels: Tensor | None = None,
    names: Sequence[str] | None = None,
    width: int | None = None,
) -> list[str]:
    """Captions of ``out``: :func:`captions`, or ``score 2.31`` per image when the maps explain
    a target function's score (a segmentation region, a regression value).

    Examples:
        >>> import torch
        >>> out = Explanations({}, torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
        ...                    extras={"target_scores": torch.tensor([2.314])})
        >>> explanation_captions(out)
        ['score 2.31']
    """
    scores = out.extras.get("target_scores")
    if isinstance(scores, Tensor):
        return [f"score {float(v):.3g}" for v in scores.tolist()]
    return captions(out.logits, out.targets, labels, names, width)


def concept_legend(
    concept_scores: Tensor | None,
    k: int,
    names: Sequence[str] | None = None,
    maps: Tensor | None = None,
) -> list[str]:
    """One legend line per concept: its share of the pictures' area (where it is the dominant
    concept, from ``maps`` ``(N, K, H, W)``) and its two most likely classes through the
    model's head.

    Examples:
        >>> import torch
        >>> concept_legend(torch.tensor([[3.0, 0.0], [0.0, 3.0]]), 2, ["cat", "dog"])
        ['c0: cat 95%, dog 5%', 'c1: dog 95%, cat 5%']
        >>> maps = torch.zeros(1, 2, 2, 2); maps[0, 0, 0] = 1.0; maps[0, 1, 1] = 1.0
        >>> concept_legend(None, 2, maps=maps)
        ['c0 (50% of area)', 'c1 (50% of area)']
    """
    shares = None
    if maps is not None and maps.dim() == 4 and maps.shape[1] == k:
        norm = maps / maps.flatten(2).amax(2).clamp(min=1e-12)[..., None, None]
        winner = norm.argmax(dim=1).flatten()
        shares = torch.bincount(winner, minlength=k).float() / max(1, winner.numel())
    texts = []
    for c in range(k):
        head = f"c{c}" + (f" ({float(shares[c]):.0%} of area)" if shares is not None else "")
        if concept_scores is None:
            texts.append(head if shares is not None else f"concept {c}")
            continue
        top = concept_scores[c].float().softmax(0).topk(min(2, concept_scores.shape[1]))
        parts = ", ".join(
            f"{class_name(names, int(i))[:8]} {float(p):.0%}"
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        )
        texts.append(f"{head}: {parts}")
    return texts


def tile_shape(image_size: tuple[int, int], tile_size: int) -> tuple[int, int]:
    """Tiles at most ``tile_size``; small inputs are enlarged by a whole factor (crisp
    pixels, and PNGs that compress well), large ones shrunk.

    Examples:
        >>> tile_shape((32, 32), 112), tile_shape((224, 224), 112)
        ((96, 96), (112, 112))
    """
    h, w = image_size
    side = max(h, w)
    scale = max(1, tile_size // side) if side <= tile_size else tile_size / side
    return max(8, round(h * scale)), max(8, round(w * scale))


Signs = str | Mapping[str, str]


def display_of(method: str, sign: Signs = "all") -> render.Display:
    """How ``method``'s maps are drawn: non-negative maps (the CAMs) on a sequential scale;
    signed maps as ``sign`` says (one of :data:`render.SIGNS`, or a dict method -> sign; a
    method it does not name is drawn ``"all"``, zero-centred).

    Examples:
        >>> display_of("gradcam", "absolute_value").sign, display_of("integrated_gradients").sign
        ('non_negative', 'all')
        >>> display_of("integrated_gradients", {"integrated_gradients": "positive"}).cmap
        'Reds'
    """
    if METHODS[method].sign != "signed":
        return render.Display("non_negative")
    chosen = sign if isinstance(sign, str) else sign.get(method, "all")
    return render.Display(chosen)


def method_tiles(
    method: str,
    maps: Tensor,
    picture: Tensor,
    alpha: float = 0.5,
    grey: bool = True,
    sign: Signs = "all",
) -> Tensor:
    """The tiles of one method's maps over ``picture`` (a greyscale copy when ``grey``), drawn
    as the method declares them (and ``sign`` chooses for signed maps), on one colour scale
    shared by the tiles."""
    display = display_of(method, sign)
    concepts = METHODS[method].kind == "concepts"
    return render.method_tiles(
        maps, picture, concepts, display.signed, alpha=alpha, grey=grey, display=display
    )


def concept_key(
    method: str, out: Explanations, names: Sequence[str] | None
) -> tuple[list[str], Tensor] | None:
    """The legend lines and colour swatches of a concept method's maps; ``None`` for map
    methods."""
    spec = METHODS[method]
    if spec.kind != "concepts":
        return None
    maps = out[method]
    scores = out.extras.get(spec.concept_scores or "")
    k = maps.shape[1]
    return concept_legend(scores, k, names, maps), render.concept_palette(k, maps.device)


def colour_key(method: str, maps: Tensor, sign: Signs = "all") -> tuple[float, bool] | None:
    """``(top, signed)`` of a map method's colour bar; ``None`` for concept methods."""
    if METHODS[method].kind != "map":
        return None
    display = display_of(method, sign)
    return float(render.display_scale(display.part(maps), display.signed)), display.signed


def colour_keys(
    out: Explanations, drawn: Mapping[str, Tensor], sign: Signs = "all"
) -> dict[str, tuple[float, render.Display]]:
    """Each drawn map method's colour bar: ``(top, display)``."""
    keys = {}
    for method in drawn:
        found = colour_key(method, out[method], sign)
        if found is not None:
            keys[method] = (found[0], display_of(method, sign))
    return keys


class EpochFigures:
    """The pictures of one logged epoch: a grid per method, the overview, and the small tiles
    of each method for the timeline.

    A method whose tiles cannot be drawn is left out and its error kept in ``errors``.

    Args:
        images: ``(N, C, H, W)`` model inputs.
        out: their explanations.
        labels: ``(N,)`` labels for captions (``None``: show the explained target).
        names: class names.
        mean, std: the normalisation to undo for display (``None``: per-image min-max).
        tile_size: the side of each tile.
        alpha: the maps' opacity.
        grey: draw the maps over a greyscale copy of the images (colours read on any photo).
        sign: which part of signed maps to show (see :func:`display_of`).
    """

    def __init__(
        self,
        images: Tensor,
        out: Explanations,
        labels: Tensor | None = None,
        names: Sequence[str] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        tile_size: int = 112,
        alpha: float = 0.5,
        grey: bool = True,
        sign: Signs = "all",
    ) -> None:
        self.sign = sign
        size = tile_shape((images.shape[-2], images.shape[-1]), tile_size)
        self.picture = render.resize(render.to_picture(images, mean, std), size)
        self.texts = explanation_captions(out, labels, names)  # in full, for text panels
        self.captions = explanation_captions(out, labels, names, self.picture.shape[-1] - 3)
        self.tiles: dict[str, Tensor] = {}
        self.errors: dict[str, BaseException] = {}
        for method, maps in out.items():
            try:
                self.tiles[method] = method_tiles(method, maps, self.picture, alpha, grey, sign)
            except Exception as err:  # one method's picture never takes down the others
                self.errors[method] = err
        self._out = out
        self._names = names

    def grids(self) -> dict[str, Tensor]:
        """Method -> its captioned ``uint8`` grid (concept methods with their legend)."""
        ncol = min(self.picture.shape[0], 4)
        pictures: dict[str, Tensor] = {}
        for method, tiles in self.tiles.items():
            legend, swatches = concept_key(method, self._out, self._names) or (None, None)
            key = colour_key(method, self._out[method], self.sign)
            display = display_of(method, self.sign)
            grid = render.method_grid(tiles, self.captions, ncol, legend, swatches, key, display)
            pictures[method] = render.to_uint8(grid)
        return pictures

    def overview(self) -> Tensor:
        """A row per sample: the input, then each method's tile, as ``uint8``; each map
        method's colour bar under its column."""
        keys = colour_keys(self._out, self.tiles, self.sign)
        picture = render.overview(self.picture, self.tiles, self.captions, keys=keys)
        return render.to_uint8(picture)


def comparison_figure(
    images: Tensor,
    out: Explanations,
    names: Sequence[str] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    alpha: float = 0.5,
    rows: Sequence[str] | None = None,
    sign: Signs = "all",
) -> Tensor:
    """The command line's figure, ``uint8``: a row per image (its label from ``rows``, e.g. the
    file name, above its caption; then each method's tile), the method names once as column
    headers, and the legend of concept methods (DFF) below."""
    picture = render.to_picture(images, mean, std)
    tiles = {m: method_tiles(m, maps, picture, alpha, sign=sign) for m, maps in out.items()}
    texts = explanation_captions(out, None, names, picture.shape[-1] - 3)
    keys = colour_keys(out, tiles, sign)
    figure = render.overview(picture, tiles, texts, rows, keys)
    for method in out:
        found = concept_key(method, out, names)
        if found is not None:
            lines = [f"{method} {line}" for line in found[0]]
            figure = torch.cat(
                [figure, render.label_row(lines, figure.shape[-1], figure.device, found[1])], 1
            )
    return render.to_uint8(figure)


class Timeline:
    """One method's maps across logged validations: samples as rows, validations as columns.

    Columns are kept on the host as small ``uint8`` tiles (64 px) so a long run costs no
    device memory. Past ``capacity`` columns the timeline keeps the first column, the last, and
    an even spread between them (by position, the epoch), so the early epochs where a shortcut
    is learnt stay in the picture however long the run.

    Examples:
        >>> import torch
        >>> timeline = Timeline(capacity=4)
        >>> for epoch in range(10):
        ...     timeline.add(torch.rand(2, 3, 16, 16), epoch=epoch)
        >>> timeline.labels
        ['ep 0', 'ep 3', 'ep 6', 'ep 9']
        >>> timeline.picture().shape[0], len(timeline), timeline.added
        (3, 4, 10)
    """

    def __init__(self, side: int = 64, capacity: int = 32) -> None:
        self.side = side
        self.capacity = max(2, capacity)
        self.columns: list[Tensor] = []
        self.labels: list[str] = []
        self.positions: list[float] = []
        self.added = 0
        self.rows: list[str] | None = None  # a label per sample (row), e.g. "#0\ncat"

    def __len__(self) -> int:
        return len(self.columns)

    def add(
        self, tiles: Tensor, epoch: int, label: str | None = None, position: float | None = None
    ) -> None:
        """Add one validation's ``(N, 3, H, W)`` tiles (floats in ``[0, 1]``), labelled
        ``ep <epoch>`` unless ``label`` is given; ``position`` (default: the epoch) places it
        on the time axis for thinning."""
        small = render.resize(tiles, (self.side, self.side))
        self.columns.append(render.to_uint8(small).cpu())
        self.labels.append(label or f"ep {epoch}")
        self.positions.append(float(epoch if position is None else position))
        self.added += 1
        if len(self.columns) > self.capacity:
            keep = spread(self.positions, self.capacity)
            self.columns = [self.columns[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            self.positions = [self.positions[i] for i in keep]

    def picture(self) -> Tensor:
        """The timeline as one ``uint8`` picture (on the host), epochs as a header row and,
        when :attr:`rows` is set, each sample's label in a first column."""
        return render.to_uint8(render.timeline(self.columns, self.labels, self.rows))

    def state_dict(self) -> dict[str, Any]:
        return {
            "columns": [c.clone() for c in self.columns],
            "labels": list(self.labels),
            "positions": list(self.positions),
            "added": self.added,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.columns = list(state.get("columns", []))
        self.labels = list(state.get("labels", []))
        positions = state.get("positions")
        if positions is None:  # 0.1.0 kept labels only: "ep 12"
            positions = [_epoch_of(label, i) for i, label in enumerate(self.labels)]
        self.positions = [float(p) for p in positions]
        self.added = int(state.get("added", len(self.columns)))


def _epoch_of(label: str, default: int) -> float:
    try:
        return float(label.split()[-1])
    except (ValueError, IndexError):
        return float(default)


def spread(positions: Sequence[float], count: int) -> list[int]:
    """Indices of ``count`` of the (increasing) ``positions``: the first, the last, and for
    each evenly spaced point between them the nearest position not yet taken.

    Examples:
        >>> spread([0, 1, 2, 3, 4, 5, 6, 7, 8], 3)
        [0, 4, 8]
        >>> spread([0, 0, 0, 0, 0, 0, 0, 0, 0], 3)  # equal positions: spread by order
        [0, 4, 8]
    """
    n = len(positions)
    if n <= count:
        return list(range(n))
    first, last = positions[0], positions[-1]
    chosen = {0, n - 1}
    for k in range(1, count - 1):
        target = first + (last - first) * k / (count - 1)
        place = (n - 1) * k / (count - 1)  # ties (equal positions) spread by order
        free = (i for i in range(n) if i not in chosen)
        chosen.add(
            min(free, key=lambda i: (abs(positions[i] - target), positions[i], abs(i - place)))
        )
    return sorted(chosen)


def first_map_method(methods: Sequence[str]) -> str | None:
    """The first method whose output is a single map per image (the timeline's default)."""
    return next((m for m in methods if METHODS[m].kind == "map"), None)
