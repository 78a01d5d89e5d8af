"""Pictures without a Trainer: colour scales, overlays, de-normalisation, the figures the
callback and the command line share, the timeline."""

import pytest
import torch
from torchvision.transforms import Normalize

from lightning_saliency import explain
from lightning_saliency.engine.explanations import Explanations
from lightning_saliency.viz import figures, render
from lightning_saliency.viz.figures import (
    EpochFigures,
    Timeline,
    captions,
    comparison_figure,
    concept_legend,
    tile_shape,
)


def test_scale_maps_never_gives_nan_and_centres_signed_maps():
    assert render.scale_maps(torch.zeros(2, 4, 4)).abs().sum() == 0
    signed = render.scale_maps(torch.tensor([[[-2.0, 0.0], [0.0, 2.0]]]), signed=True)
    assert signed.tolist() == [[[0.0, 0.5], [0.5, 1.0]]]
    spiky = torch.zeros(1, 20, 20)
    spiky[0, 0, 0], spiky[0, 5:, 5:] = 1000.0, 1.0
    assert render.scale_maps(spiky)[0, 10, 10] > 0.9  # one hot pixel cannot wash out the rest


def test_cold_regions_show_the_image_itself():
    picture = torch.rand(1, 3, 8, 8)
    maps = torch.zeros(1, 8, 8)
    maps[0, :2, :2] = 1.0
    tiles = render.overlay(picture, maps)
    grey = render.desaturate(picture)  # maps are drawn over a greyscale copy of the photo
    assert torch.allclose(tiles[:, :, 4:, 4:], grey[:, :, 4:, 4:])
    assert not torch.allclose(tiles[:, :, :2, :2], grey[:, :, :2, :2])
    assert torch.allclose(render.overlay(picture, maps, grey=False)[:, :, 4:, 4:],
                          picture[:, :, 4:, 4:])  # fmt: skip


def test_one_colour_scale_per_grid_so_tiles_compare():
    """Two maps, one half as strong: per-image scaling would draw both at full colour."""
    picture = torch.full((2, 3, 8, 8), 0.5)
    maps = torch.zeros(2, 8, 8)
    maps[0, 2:6, 2:6], maps[1, 2:6, 2:6] = 1.0, 0.5
    tiles = render.method_tiles(maps, picture, concepts=False, signed=False)
    grey = render.desaturate(picture)
    change = (tiles - grey).abs()[:, :, 2:6, 2:6].mean((1, 2, 3))
    assert float(change[1]) < 0.85 * float(change[0])


def test_every_map_grid_carries_its_colour_bar_and_signed_ones_centre_on_zero():
    figures = EpochFigures(torch.rand(3, 3, 16, 16), _explanations())
    grids = figures.grids()
    for method, signed in (("gradcam", False), ("integrated_gradients", True)):
        picture = grids[method].float() / 255
        bar = picture[:, -31:-21, 2:-2]  # the strip's ramp, under the captioned tiles
        lut = render.colormap_lut(render.DIVERGING if signed else render.SEQUENTIAL, bar.device)
        assert torch.allclose(bar[:, 5, 0], lut[0], atol=0.02), method
        assert torch.allclose(bar[:, 5, -1], lut[-1], atol=0.02), method
        if signed:  # the middle of a zero-centred scale is (near) white
            assert float(bar[:, 5, bar.shape[-1] // 2].min()) > 0.9
    zero = render.method_tiles(torch.zeros(1, 8, 8), torch.full((1, 3, 8, 8), 0.5), False, True)
    assert torch.allclose(zero, render.desaturate(torch.full((1, 3, 8, 8), 0.5)))


def test_normalisation_is_undone_for_display():
    image = torch.rand(2, 3, 6, 6)
    normalize = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    shown = render.to_picture(normalize(image), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    assert torch.allclose(shown, image, atol=1e-6)
    grey = render.to_picture(torch.rand(1, 1, 4, 4), None, None)
    assert grey.shape == (1, 3, 4, 4) and torch.equal(grey[:, 0], grey[:, 2])


def test_maps_of_the_wrong_layout_are_an_error_not_a_picture():
    picture = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"must be \(N, H, W\)"):
        render.method_tiles(torch.rand(2, 3, 8, 8), picture, concepts=False, signed=False)
    with pytest.raises(ValueError, match=r"concept maps must be \(N, K, H, W\)"):
        render.method_tiles(torch.rand(2, 8, 8), picture, concepts=True, signed=False)


def test_signed_methods_are_drawn_on_a_diverging_scale():
    picture = torch.full((1, 3, 8, 8), 0.5)
    maps = torch.zeros(1, 8, 8)
    maps[0, :, :4], maps[0, :, 4:] = -1.0, 1.0
    tiles = render.method_tiles(maps, picture, concepts=False, signed=True)
    red, blue = tiles[0, 0], tiles[0, 2]
    assert (blue[:, :4] > red[:, :4]).all() and (red[:, 4:] > blue[:, 4:]).all()


@pytest.mark.parametrize("sign", render.SIGNS)
def test_each_of_captums_sign_choices_shows_its_part(sign):
    """``positive`` shows only where the map is > 0 (in reds), ``negative`` only where it is
    < 0 (in blues), ``absolute_value`` both, sequentially; ``all`` both, zero-centred."""
    picture = torch.full((1, 3, 8, 8), 0.5)
    maps = torch.zeros(1, 8, 8)
    maps[0, :, :4], maps[0, :, 4:] = -1.0, 1.0
    display = render.Display(sign)
    tiles = render.method_tiles(maps, picture, False, display.signed, display=display)[0]
    grey = render.desaturate(picture)[0]
    left_changed = (tiles[:, :, :4] - grey[:, :, :4]).abs().amax() > 0.2
    right_changed = (tiles[:, :, 4:] - grey[:, :, 4:]).abs().amax() > 0.2
    assert left_changed == (sign != "positive")
    assert right_changed == (sign != "negative")
    if sign == "positive":
        assert (tiles[0, :, 4:] > tiles[2, :, 4:]).all()  # red
    if sign == "negative":
        assert (tiles[2, :, :4] > tiles[0, :, :4]).all()  # blue
    if sign == "absolute_value":  # one colour for one magnitude, whatever its sign
        assert torch.allclose(tiles[:, :, :4], tiles[:, :, 4:])
    bar_text = render.Display(sign).labels(1.0)
    assert (
        bar_text
        == {
            "all": ("-1", "0", "+1"),
            "positive": ("0", "", "1"),
            "negative": ("0", "", "-1"),
            "absolute_value": ("0", "", "|1|"),
        }[sign]
    )


def test_guided_gradcam_grid_is_on_a_zero_centred_scale():
    """Guided Grad-CAM's maps are signed (captum's channel sum): its grid's colour bar runs
    from -top through white at 0 to +top, and its tiles show both signs."""
    from models import ModuleCNN, seeded

    model = seeded(ModuleCNN()).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = explain(model, images, targets=[0, 1, 2, 3], methods=("guided_gradcam",))
    maps = out["guided_gradcam"]
    assert (maps < 0).any() and (maps > 0).any()
    top, signed = figures.colour_key("guided_gradcam", maps)
    assert signed
    grid = figures.EpochFigures(images, out).grids()["guided_gradcam"]
    bar = grid[:, -(12 + render.LINE) + 5, :].float() / 255  # the ramp's middle row
    middle = bar[:, bar.shape[1] // 2]
    assert (middle > 0.9).all(), "white at zero"
    assert bar[2, 5] > bar[0, 5] and bar[0, -5] > bar[2, -5]  # blue on the left, red right


def _explanations(n: int = 3) -> Explanations:
    gen = torch.Generator().manual_seed(0)
    return Explanations(
        {
            "gradcam": torch.rand(n, 16, 16, generator=gen),
            "integrated_gradients": torch.randn(n, 16, 16, generator=gen),
            "dff": torch.rand(n, 2, 16, 16, generator=gen),
        },
        logits=torch.randn(n, 3, generator=gen),
        targets=torch.zeros(n, dtype=torch.long),
        extras={"dff_concept_scores": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 3.0]])},
    )


def test_epoch_figures_give_a_grid_per_method_and_an_overview():
    out = _explanations()
    figures = EpochFigures(torch.rand(3, 3, 16, 16), out, torch.tensor([0, 1, 2]), ["a", "b", "c"])
    grids = figures.grids()
    assert set(grids) == {"gradcam", "integrated_gradients", "dff"}
    for grid in grids.values():
        assert grid.dtype == torch.uint8 and grid.shape[0] == 3
    assert grids["dff"].shape[1] > grids["gradcam"].shape[1]  # the concept legend below
    overview = figures.overview()
    assert overview.shape[2] > 4 * 96 and overview.shape[1] > 3 * 96  # 4 columns, 3 rows
    assert figures.captions[0].startswith("a>")


def test_the_command_line_figure_is_built_from_the_same_parts():
    out = _explanations(2)
    picture = comparison_figure(torch.rand(2, 3, 16, 16), out, None, None, None)
    assert picture.dtype == torch.uint8 and picture.shape[2] > 4 * 16


def test_captions_legends_and_tile_sizes():
    logits = torch.tensor([[0.0, 3.0]])
    assert captions(logits, labels=torch.tensor([0])) == ["0>1 95% X"]
    assert captions(logits, targets=torch.tensor([1])) == ["1 95%"]
    assert concept_legend(None, 2) == ["concept 0", "concept 1"]
    assert tile_shape((20, 40), 112) == (40, 80)  # whole-factor enlargement keeps the aspect


def test_timeline_keeps_memory_flat_and_the_latest_epochs():
    timeline = Timeline(side=8, capacity=8)
    for epoch in range(20):
        timeline.add(torch.rand(2, 3, 16, 16), epoch)
    assert len(timeline) <= 8 and timeline.labels[-1] == "ep 19"
    assert all(
        column.device.type == "cpu" and column.dtype == torch.uint8 for column in timeline.columns
    )
    restored = Timeline()
    restored.load_state_dict(timeline.state_dict())
    assert torch.equal(restored.picture(), timeline.picture())


def test_captions_fit_their_tiles_and_stay_legible_at_card_width():
    """Long class names are abbreviated to fit (never cut), and after scaling a 4-tile grid
    to TensorBoard's ~350-px card the glyphs are still >= 9 px tall."""
    names = ["triangle_with_a_long_name", "square"]
    out = Explanations(
        {"gradcam": torch.rand(4, 32, 32)},
        logits=torch.tensor([[5.0, 0.0]] * 4),
        targets=torch.zeros(4, dtype=torch.long),
    )
    figures = EpochFigures(torch.rand(4, 3, 32, 32), out, torch.tensor([1, 0, 1, 0]), names)
    tile = figures.picture.shape[-1]
    for text in figures.captions:
        assert render.text_width(text) <= tile - 2, text
        assert text.endswith(("ok", "X")) and "%" in text  # the end is never cut
    grid = figures.grids()["gradcam"].float() / 255
    rows = render.text_mask("Ag", torch.device("cpu")).amax(1) > 0.5
    glyph = int(rows.nonzero().max() - rows.nonzero().min() + 1)
    assert glyph * 350 / grid.shape[-1] >= 9


def test_the_timeline_labels_its_rows_and_epochs_once():
    timeline = Timeline(side=64)
    for epoch in range(3):
        timeline.add(torch.rand(2, 3, 16, 16), epoch)
    timeline.rows = ["#0\ncat", "#1\ndog"]
    picture = timeline.picture()
    plain = Timeline(side=64)
    plain.load_state_dict(timeline.state_dict())
    assert picture.shape[-1] > plain.picture().shape[-1]  # a first column of row labels
    assert picture.shape[-2] == plain.picture().shape[-2]  # one header row, no epN per tile


def test_grey_background_can_be_turned_off_and_dff_legend_gives_area_shares():
    images = torch.rand(3, 3, 16, 16)
    grey = EpochFigures(images, _explanations())
    colour = EpochFigures(images, _explanations(), grey=False)
    picture = colour.picture
    assert not torch.allclose(grey.tiles["gradcam"], colour.tiles["gradcam"])
    cold = _explanations()["gradcam"] * 0  # a map of zeros shows the picture itself, in colour
    tiles = render.method_tiles(cold, picture, concepts=False, signed=False, grey=False)
    assert torch.allclose(tiles, picture)
    legend = grey.grids()["dff"]
    assert legend.shape[1] > grey.grids()["gradcam"].shape[1] - 32  # legend lines below
    from lightning_saliency.viz.figures import concept_legend

    lines = concept_legend(None, 2, None, _explanations()["dff"])
    assert all("% of area" in line for line in lines)
    shares = [int(line.split("(")[1].split("%")[0]) for line in lines]
    assert abs(sum(shares) - 100) <= 1


def test_concept_colours_stay_clear_of_the_demo_patches_and_each_other():
    """The DFF palette avoids the pure red, green, blue and yellow of the demo's corner patches
    (a concept on the patch must not look like the patch), and its colours are distinct."""
    from lightning_saliency.demos.shapes import PATCH_COLORS

    palette = render.concept_palette(8, torch.device("cpu"))
    assert torch.cdist(palette, PATCH_COLORS).min() > 0.25
    pairwise = torch.cdist(palette, palette) + torch.eye(8) * 9
    assert pairwise.min() > 0.25


def test_concept_regions_are_outlined_in_their_colour():
    """Two concepts side by side: the pixels where one region meets the other (or fades out)
    are drawn in the concept's own colour at full opacity; the inside stays see-through."""
    concepts = torch.zeros(1, 2, 16, 16)
    concepts[0, 0, 4:12, 2:8] = 1.0
    concepts[0, 1, 4:12, 8:14] = 0.5
    picture = torch.full((1, 3, 16, 16), 0.5)
    tiles = render.concept_overlay(picture, concepts, alpha=0.5)[0]
    palette = render.concept_palette(2, torch.device("cpu"))
    assert torch.allclose(tiles[:, 4, 4], palette[0])  # top edge of concept 0
    assert torch.allclose(tiles[:, 8, 7], palette[0]) and torch.allclose(tiles[:, 8, 8], palette[1])
    inside = tiles[:, 8, 4]
    assert not torch.allclose(inside, palette[0]) and not torch.allclose(
        inside, picture[0, :, 0, 0]
    )
    assert torch.equal(tiles[:, 0, 0], picture[0, :, 0, 0])  # outside every region: the image


@pytest.mark.parametrize("width", [96, 300])
def test_colour_bar_labels_never_overlap(width):
    """At a narrow column (the overview's) the bar keeps its end values and drops the middle
    ``0`` rather than printing ``-0.012 0+0.012`` into one another."""
    bar = render.colour_bar(width, 0.012, True, torch.device("cpu"))
    inked = (bar[:, 12:].amax(dim=(0, 1)) > 0.5).tolist()  # columns holding glyph pixels
    spans, start = [], None
    for i, ink in enumerate([*inked, False]):
        if ink and start is None:
            start = i
        if not ink and start is not None:
            spans.append((start, i))
            start = None
    words = [spans[0]]
    for span in spans[1:]:  # glyphs of one word are at most 3 px apart
        if span[0] - words[-1][1] <= 3:
            words[-1] = (words[-1][0], span[1])
        else:
            words.append(span)
    assert len(words) == (2 if width == 96 else 3)
    assert all(b[0] - a[1] >= 8 for a, b in zip(words, words[1:]))  # clearly apart
