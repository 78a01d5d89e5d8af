"""Pixels on the device: colour maps (matplotlib LUTs), overlays, text, grids.

Everything here takes and returns tensors on the maps' device; nothing here copies a picture to
the host. (:mod:`lightning_saliency.publish.publisher` copies each finished ``uint8`` picture once;
:class:`lightning_saliency.viz.figures.Timeline` keeps its small tiles on the host.) Text is drawn
from a glyph atlas that PIL renders once on the host and that is copied to the device per
caption, so a caption costs a small copy and a paste, not a host round trip per tile.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

_FIRST_CHAR, _LAST_CHAR = 32, 126


@functools.lru_cache(maxsize=16)
def _lut_cpu(name: str) -> Tensor:
    colors = matplotlib.colormaps[name](torch.linspace(0, 1, 256).numpy())[:, :3]
    return torch.tensor(colors, dtype=torch.float32)


def colormap_lut(name: str, device: torch.device) -> Tensor:
    """A ``(256, 3)`` float LUT of a matplotlib colour map, on ``device``.

    Examples:
        >>> colormap_lut("jet", torch.device("cpu")).shape
        torch.Size([256, 3])
    """
    return _lut_cpu(name).to(device)


def apply_colormap(values: Tensor, name: str) -> Tensor:
    """Colour ``(N, H, W)`` values in ``[0, 1]`` → ``(N, 3, H, W)`` in ``[0, 1]``."""
    lut = colormap_lut(name, values.device)
    index = (values.clamp(0, 1) * 255).round().long()
    return lut[index].permute(0, 3, 1, 2)


SEQUENTIAL = "inferno"  # non-negative maps (the CAMs): dark = low, bright yellow = high
DIVERGING = "RdBu_r"  # signed maps: blue = negative, white = 0, red = positive
SIGNS = ("all", "positive", "negative", "absolute_value")  # captum's visualize_image_attr signs


@dataclass(frozen=True)
class Display:
    """How one method's maps are drawn. ``sign`` is ``"non_negative"`` for maps that cannot be
    negative (the CAMs: sequential colours), or one of captum's choices for signed maps:
    ``"all"`` on a diverging scale around zero (blue -, red +), ``"positive"`` (reds) or
    ``"negative"`` (blues) for one part only, ``"absolute_value"`` for the magnitude.

    Examples:
        >>> view = Display("negative")
        >>> view.part(torch.tensor([[[-2.0, 1.0]]])).tolist(), view.signed, view.cmap
        ([[[2.0, 0.0]]], False, 'Blues')
    """

    sign: str = "non_negative"

    @property
    def signed(self) -> bool:
        """Whether the colours are zero-centred (``-top .. +top``)."""
        return self.sign == "all"

    @property
    def cmap(self) -> str:
        return {
            "all": DIVERGING,
            "positive": "Reds",
            "negative": "Blues",
        }.get(self.sign, SEQUENTIAL)

    def part(self, maps: Tensor) -> Tensor:
        """The values shown: the negative part as magnitudes, or the absolute value, or as is."""
        if self.sign == "positive":
            return maps.clamp(min=0)
        if self.sign == "negative":
            return (-maps).clamp(min=0)
        if self.sign == "absolute_value":
            return maps.abs()
        return maps

    def labels(self, top: float) -> tuple[str, str, str]:
        """The colour bar's labels at its left end, middle and right end."""
        if self.signed:
            return f"-{top:.2g}", "0", f"+{top:.2g}"
        if self.sign == "negative":
            return "0", "", f"-{top:.2g}"
        if self.sign == "absolute_value":
            return "0", "", f"|{top:.2g}|"
        return "0", "", f"{top:.2g}"


def display_scale(maps: Tensor, signed: bool = False, quantile: float = 0.995) -> Tensor:
    """The value shown at full colour: a high quantile of the maps' (absolute) values, one for
    the whole stack so that its tiles compare (a few hot pixels cannot wash the rest out).

    Examples:
        >>> float(display_scale(torch.tensor([[[0.0, 2.0]], [[1.0, 4.0]]]), quantile=1.0))
        4.0
    """
    flat = maps.flatten().float()
    ref = flat.abs() if signed else flat.clamp(min=0)
    if ref.numel() > 1 << 24:  # torch.quantile's input limit: a strided sample of it
        ref = ref[:: ref.numel() // (1 << 23) + 1]
    top = torch.quantile(ref, quantile) if ref.numel() > 1 else ref.amax()
    return torch.maximum(top, ref.amax() * 1e-3).clamp(min=1e-12)


def scale_maps(
    maps: Tensor, signed: bool = False, quantile: float = 0.995, top: Tensor | None = None
) -> Tensor:
    """Scaling to ``[0, 1]`` for display on one scale for the whole stack (``top``, default
    :func:`display_scale`). Unsigned maps: ``0 -> 0``, ``top -> 1``. Signed maps: ``0 -> 0.5``,
    ``-top -> 0``, ``+top -> 1``. Constant maps become zeros (or 0.5), never NaN.

    Examples:
        >>> scale_maps(torch.zeros(1, 2, 2)).sum().item()
        0.0
        >>> scale_maps(torch.tensor([[[-2.0, 0.0, 2.0]]]), signed=True, quantile=1.0).tolist()
        [[[0.0, 0.5, 1.0]]]
    """
    top = display_scale(maps, signed, quantile) if top is None else top
    scaled = maps.float() / top
    scaled = (scaled.clamp(-1, 1) + 1) / 2 if signed else scaled.clamp(0, 1)
    return torch.nan_to_num(scaled, nan=0.0)


def desaturate(picture: Tensor) -> Tensor:
    """A greyscale copy of ``(N, 3, H, W)`` pictures, slightly lightened, so coloured maps
    read on any photograph."""
    grey = picture * torch.tensor([0.299, 0.587, 0.114], device=picture.device)[:, None, None]
    luminance = grey.sum(dim=1, keepdim=True)
    return (0.15 + 0.7 * luminance).expand_as(picture)


def to_picture(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """Model inputs → displayable ``(N, 3, H, W)`` in ``[0, 1]``: undo ``Normalize(mean, std)``
    when known, else per-image min-max; 1-channel images become grey RGB, >3 keep the first 3.
    """
    x = images.detach().float()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
        s = torch.as_tensor(std, device=x.device, dtype=x.dtype).reshape(1, -1, 1, 1)
        x = x * s + m
    else:
        lo = x.flatten(1).amin(1).reshape(-1, 1, 1, 1)
        hi = x.flatten(1).amax(1).reshape(-1, 1, 1, 1)
        x = (x - lo) / (hi - lo).clamp(min=1e-12)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        x = (
            x[:, :3]
            if x.shape[1] > 3
            else torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], 1)
        )
    return x.clamp(0, 1)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize ``(N, C, H, W)`` pictures for display: nearest when enlarging, area when
    shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    mode = "nearest" if size[0] >= x.shape[-2] else "area"
    return F.interpolate(x, size=size, mode=mode)


def overlay(
    picture: Tensor,
    maps: Tensor,
    signed: bool = False,
    cmap: str | None = None,
    alpha: float = 0.5,
    top: Tensor | None = None,
    grey: bool = True,
) -> Tensor:
    """Blend coloured maps over pictures (a greyscale copy when ``grey``); the map's strength
    sets the opacity, so cold regions show the image itself. ``top`` is the value at full
    colour (default: :func:`display_scale` of ``maps``)."""
    values = scale_maps(maps, signed=signed, top=top)
    heat = apply_colormap(values, cmap or (DIVERGING if signed else SEQUENTIAL))
    strength = (values - 0.5).abs() * 2 if signed else values
    weight = (alpha + 0.3) * strength[:, None].pow(0.5)
    base = desaturate(picture) if grey else picture
    return base * (1 - weight) + heat * weight


def colour_bar(
    width: int, top: float, signed: bool, device: torch.device, display: Display | None = None
) -> Tensor:
    """A ``(3, 32, width)`` key for a grid: the colour scale over ``[0, top]`` (or
    ``[-top, top]`` for signed maps; ``display`` for another sign choice) and its end values,
    so a reader knows what the colours mean.

    Examples:
        >>> colour_bar(120, 0.5, True, torch.device("cpu")).shape
        torch.Size([3, 32, 120])
    """
    display = display or Display("all" if signed else "non_negative")
    bar = torch.zeros(3, 12 + LINE, width, device=device)
    inner = max(2, width - 4)
    ramp = torch.linspace(0, 1, inner, device=device)[None].expand(10, inner)
    bar[:, 1:11, 2 : 2 + inner] = apply_colormap(ramp[None], display.cmap)[0]
    labels = list(display.labels(top))
    if sum(text_width(t) for t in labels) + 16 > width:  # a narrow bar: its ends only
        labels[1] = ""
    for text, where in zip(labels, (0.0, 0.5, 1.0)):
        if not text:
            continue
        mask = text_mask(text, device)[:, : width - 2]
        left = int(where * (width - mask.shape[1] - 2)) + 1
        bar[:, 12 : 12 + mask.shape[0], left : left + mask.shape[1]] = mask
    return bar


def concept_overlay(picture: Tensor, concepts: Tensor, alpha: float = 0.6) -> Tensor:
    """DFF ``(N, K, H, W)`` → each pixel coloured by its dominant concept, opacity by strength,
    and each concept's region (where it is at least :data:`REGION` of its peak) outlined in its
    colour at full opacity, so neighbouring concepts and the image stay apart."""
    palette = concept_palette(concepts.shape[1], concepts.device)
    norm = concepts / concepts.flatten(2).amax(dim=2).clamp(min=1e-12)[..., None, None]
    strength, winner = norm.max(dim=1)
    colours = palette[winner].permute(0, 3, 1, 2)
    weight = alpha * strength.clamp(0, 1)[:, None]
    region = torch.where(strength >= REGION, winner, torch.full_like(winner, -1))
    edge = _region_edges(region) & (region >= 0)
    weight = torch.where(edge[:, None], torch.ones_like(weight), weight)
    return picture * (1 - weight) + colours * weight


REGION = 0.35  # a concept's region: where it is the strongest and >= 35 % of its peak


def _region_edges(labels: Tensor) -> Tensor:
    """``(N, H, W)`` booleans: pixels whose 4-neighbourhood holds another label."""
    padded = F.pad(labels[:, None].float(), (1, 1, 1, 1), mode="replicate")[:, 0]
    centre = padded[:, 1:-1, 1:-1]
    edge = torch.zeros_like(labels, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        neighbour = padded[:, dy : dy + labels.shape[1], dx : dx + labels.shape[2]]
        edge |= neighbour != centre
    return edge


# Okabe & Ito's colour-blind-safe palette, without pure red, green, blue or yellow: those are
# the colours of the demo's corner patches, and common in photos' signage and watermarks.
CONCEPT_COLORS = (
    (0.90, 0.62, 0.00),  # orange
    (0.34, 0.71, 0.91),  # sky blue
    (0.80, 0.47, 0.65),  # reddish purple
    (0.00, 0.62, 0.45),  # bluish green
    (0.84, 0.37, 0.00),  # vermillion
    (0.00, 0.45, 0.70),  # blue
    (0.45, 0.25, 0.65),  # purple
    (0.55, 0.35, 0.20),  # brown
)


def concept_palette(k: int, device: torch.device) -> Tensor:
    """The ``(K, 3)`` colours :func:`concept_overlay` uses (repeating past 8).

    Examples:
        >>> concept_palette(10, torch.device("cpu")).shape
        torch.Size([10, 3])
    """
    colours = torch.tensor(CONCEPT_COLORS, device=device)
    return colours[torch.arange(k, device=device) % len(CONCEPT_COLORS)]


# -- text -----------------------------------------------------------------------------------
FONT_SIZE = 14  # at TensorBoard's ~350-px card width a 4-tile grid shrinks to ~0.75: glyphs
LINE = 20  # stay >= 9 px tall. A caption strip (and a legend or header line) is LINE px high.


@functools.lru_cache(maxsize=1)
def _glyphs_cpu() -> list[Tensor]:
    """One ``(18, advance)`` mask per printable ASCII character, drawn once with PIL's own
    TrueType font at :data:`FONT_SIZE` (no font file needed)."""
    from PIL import Image, ImageDraw, ImageFont

    font: Any = ImageFont.load_default(size=FONT_SIZE)  # FreeType since Pillow 10.1
    ascent, descent = font.getmetrics()
    height = ascent + descent
    glyphs = []
    for code in range(_FIRST_CHAR, _LAST_CHAR + 1):
        char = chr(code)
        advance = max(2, round(font.getlength(char)))
        img = Image.new("L", (advance, height))
        ImageDraw.Draw(img).text((0, 0), char, fill=255, font=font)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        glyphs.append(data.reshape(height, advance).float() / 255)
    return glyphs


def text_width(text: str) -> int:
    """The width in pixels :func:`text_mask` gives ``text``.

    Examples:
        >>> text_width("ok") == text_mask("ok", torch.device("cpu")).shape[1]
        True
    """
    glyphs = _glyphs_cpu()
    codes = [ord(c) if _FIRST_CHAR <= ord(c) <= _LAST_CHAR else ord("?") for c in text] or [32]
    return sum(glyphs[c - _FIRST_CHAR].shape[1] for c in codes)


def clear_text_cache() -> None:
    """Forget the cached caption bitmaps (a bounded LRU; for memory measurements)."""
    _text_mask_cpu.cache_clear()


@functools.lru_cache(maxsize=512)
def _text_mask_cpu(text: str) -> Tensor:
    glyphs = _glyphs_cpu()
    codes = [ord(c) if _FIRST_CHAR <= ord(c) <= _LAST_CHAR else ord("?") for c in text] or [32]
    return torch.cat([glyphs[c - _FIRST_CHAR] for c in codes], dim=1)


def text_mask(text: str, device: torch.device) -> Tensor:
    """A ``(18, width)`` float mask of ``text`` (ASCII; others become '?'), on ``device``.

    Examples:
        >>> text_mask("ok", torch.device("cpu")).shape[0]
        18
    """
    return _text_mask_cpu(text).to(device)


def caption(tiles: Tensor, texts: Sequence[str], color: Sequence[float] = (1, 1, 1)) -> Tensor:
    """Append a dark caption strip under each ``(N, 3, H, W)`` tile with its text."""
    n, _, _, w = tiles.shape
    strip = torch.zeros(n, 3, LINE, w, device=tiles.device, dtype=tiles.dtype)
    col = torch.tensor(color, device=tiles.device, dtype=tiles.dtype)[:, None, None]
    for i, text in enumerate(texts):
        mask = text_mask(text, tiles.device)[:, : w - 2]
        strip[i, :, 1 : 1 + mask.shape[0], 1 : 1 + mask.shape[1]] = col * mask
    return torch.cat([tiles, strip], dim=2)


def fit(text: str, width: int) -> str:
    """``text`` shortened to ``width`` pixels by dropping the last characters of its longest
    names (never numbers, percentages or the ``ok``/``X`` mark), so captions are abbreviated
    deliberately, not cut.

    Examples:
        >>> fit("triangle>triangle 100% ok", 10_000)
        'triangle>triangle 100% ok'
        >>> fit("triangle>triangle 100% ok", text_width("tri>tri 100% ok"))
        'tri>tri 100% ok'
    """
    import re

    parts = re.split(r"([>\s=]+)", text)  # names and marks, and what separates them

    def shrinkable(i: int) -> bool:
        part = parts[i]
        return (
            i % 2 == 0 and len(part) > 1 and not re.search(r"\d", part) and part not in ("ok", "X")
        )

    while text_width("".join(parts)) > width:
        names = [i for i in range(len(parts)) if shrinkable(i)]
        if not names:
            break
        longest = max(names, key=lambda i: (len(parts[i]), -i))
        parts[longest] = parts[longest][:-1]
    return "".join(parts)


def label_row(
    texts: Sequence[str], width: int, device: torch.device, swatches: Tensor | None = None
) -> Tensor:
    """Lines of text (a legend) as a ``(3, LINE * L, width)`` picture; optional colour
    swatches."""
    rows = []
    for i, text in enumerate(texts):
        row = torch.zeros(3, LINE, width, device=device)
        offset = 1
        if swatches is not None:
            row[:, 3:17, 2:16] = swatches[i][:, None, None]
            offset = 20
        mask = text_mask(fit(text, width - offset - 2), device)[:, : max(0, width - offset - 1)]
        row[:, 1 : 1 + mask.shape[0], offset : offset + mask.shape[1]] = mask
        rows.append(row)
    return torch.cat(rows, dim=1)


def grid(tiles: Tensor, ncol: int) -> Tensor:
    """Tiles ``(N, 3, H, W)`` → one ``(3, H', W')`` picture with thin separators."""
    picture: Tensor = make_grid(tiles, nrow=max(1, ncol), padding=2, pad_value=0.15)
    return picture


def to_uint8(picture: Tensor) -> Tensor:
    """``[0, 1]`` float picture → ``uint8`` (still on its device)."""
    return (torch.nan_to_num(picture, nan=0.0).clamp(0, 1) * 255).round().to(torch.uint8)


# -- composed pictures ------------------------------------------------------------------------
def method_tiles(
    maps: Tensor,
    picture: Tensor,
    concepts: bool,
    signed: bool,
    alpha: float = 0.5,
    top: Tensor | None = None,
    grey: bool = True,
    display: Display | None = None,
) -> Tensor:
    """Tiles for one method: concept colouring for ``(N, K, H, W)`` concept maps, else an
    overlay on one scale for all tiles (``top``; a diverging scale around zero when the
    method's maps are ``signed``, or as ``display`` chooses); over a greyscale copy of the
    picture when ``grey``."""
    size = (picture.shape[-2], picture.shape[-1])
    if concepts:
        if maps.dim() != 4:
            raise ValueError(f"concept maps must be (N, K, H, W), got {tuple(maps.shape)}")
        base = desaturate(picture) if grey else picture
        return concept_overlay(base, resize(maps, size), alpha=alpha + 0.1)
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got {tuple(maps.shape)}")
    display = display or Display("all" if signed else "non_negative")
    shown = display.part(maps)
    top = display_scale(shown, display.signed) if top is None else top
    resized = resize(shown[:, None], size)[:, 0]
    return overlay(picture, resized, display.signed, display.cmap, alpha, top, grey)


def method_grid(
    tiles: Tensor,
    captions: Sequence[str],
    ncol: int,
    legend: Sequence[str] | None = None,
    swatches: Tensor | None = None,
    bar: tuple[float, bool] | None = None,
    display: Display | None = None,
) -> Tensor:
    """A captioned grid of one method's tiles, with its colour bar (``(top, signed)``, drawn
    as ``display`` says) or a legend below."""
    picture = grid(caption(tiles, captions), ncol)
    if bar is not None:
        key = colour_bar(picture.shape[-1], bar[0], bar[1], picture.device, display)
        picture = torch.cat([picture, key], dim=1)
    if legend:
        rows = label_row(legend, picture.shape[-1], picture.device, swatches)
        picture = torch.cat([picture, rows], dim=1)
    return picture


def header_row(titles: Sequence[str], width: int, device: torch.device) -> Tensor:
    """Column titles above ``len(titles)`` columns of ``width`` (grid padding 2), each on one
    or two lines (split at ``_``), never cut."""
    lines = [_two_lines(t, width - 4) for t in titles]
    height = LINE * max(len(ls) for ls in lines)
    cells = []
    for title_lines in lines:
        cell = torch.zeros(3, height, width, device=device)
        for j, line in enumerate(title_lines):
            mask = text_mask(fit(line, width - 4), device)[:, : width - 4]
            cell[:, LINE * j + 1 : LINE * j + 1 + mask.shape[0], 2 : 2 + mask.shape[1]] = mask
        cells.append(cell)
    row: Tensor = make_grid(torch.stack(cells), nrow=len(cells), padding=2, pad_value=0.15)
    return row[:, 2:, :]


def _two_lines(title: str, width: int) -> list[str]:
    if text_width(title) <= width or "_" not in title:
        return [title]
    head, _, tail = title.rpartition("_")
    return [head + "_", tail]


def overview(
    picture: Tensor,
    tiles: dict[str, Tensor],
    captions: Sequence[str],
    rows: Sequence[str] | None = None,
    keys: dict[str, tuple[float, Display]] | None = None,
) -> Tensor:
    """A row per sample: the input (captioned, and labelled with ``rows`` above its caption
    when given), then each method's tile; the method names once, as column headers, and under
    each column in ``keys`` its colour bar (``(top, display)``)."""
    n = picture.shape[0]
    if rows is not None:  # the row label joins the caption strip: two lines under the input
        width = picture.shape[-1] - 3
        first = caption(picture, [fit(r, width) for r in rows])
        columns = [torch.cat([first, caption(first[:, :, :0], captions)], dim=2)]
        columns += [caption(caption(t, [""] * n), [""] * n) for t in tiles.values()]
    else:
        columns = [caption(picture, captions)]
        columns += [caption(t, [""] * n) for t in tiles.values()]
    stacked = torch.stack(columns, dim=1).flatten(0, 1)
    body = grid(stacked, len(columns))
    header = header_row(["input", *tiles], picture.shape[-1] + 2, picture.device)
    parts = [header[:, :, : body.shape[-1]], body]
    if keys:
        parts.append(key_row(["input", *tiles], keys, picture.shape[-1], picture.device))
    return torch.cat(parts, dim=1)


def key_row(
    columns: Sequence[str],
    keys: dict[str, tuple[float, Display]],
    width: int,
    device: torch.device,
) -> Tensor:
    """Under a grid of ``len(columns)`` columns of ``width`` (padding 2): each keyed column's
    colour bar, blank under the others."""
    cells = []
    for column in columns:
        if column in keys:
            top, display = keys[column]
            cells.append(colour_bar(width, top, display.signed, device, display))
        else:
            cells.append(torch.zeros(3, 12 + LINE, width, device=device))
    row: Tensor = make_grid(torch.stack(cells), nrow=len(cells), padding=2, pad_value=0.15)
    return row[:, 2:, :]


@functools.lru_cache(maxsize=8)
def _row_labels(rows: tuple[str, ...], side: int) -> Tensor:
    """A ``(N, 3, side, side)`` tile per row label (its lines, as many as fit), on the host."""
    names = torch.zeros(len(rows), 3, side, side)
    for i, text in enumerate(rows):
        for j, line in enumerate(text.split("\n")[: side // LINE]):
            mask = _text_mask_cpu(fit(line, side - 4))[:, : side - 4]
            names[i, :, 2 + LINE * j : 2 + LINE * j + mask.shape[0], 2 : 2 + mask.shape[1]] = mask
    return names


def timeline(
    columns: Sequence[Tensor], labels: Sequence[str], rows: Sequence[str] | None = None
) -> Tensor:
    """Samples as rows, logged epochs as columns: the epochs once, as a header row, and each
    row's label (sample and class) in a first column when ``rows`` are given."""
    stacked = torch.stack(list(columns), dim=1).float() / 255  # (N, columns, 3, side, side)
    n, count, _, side, _ = stacked.shape
    if rows is not None:
        names = _row_labels(tuple(rows), side).to(stacked.device)
        stacked = torch.cat([names[:, None], stacked], dim=1)
        labels = ["", *labels]
        count += 1
    stacked = stacked.flatten(0, 1)
    body = grid(stacked, count)
    header = header_row(list(labels), side + 2, stacked.device)
    return torch.cat([header[:, :, : body.shape[-1]], body], dim=1)
