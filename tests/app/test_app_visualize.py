"""Routing-map overlays: one colour per subject, exactly where the router sent it; what the demo shows of them."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from anystory.app.visualize import (BACKGROUND_COLOR, PALETTE, cielab, contrasting_colors, display_copy, dominant_color,
                                legend_html, routing_colormap, routing_overlay, save_png, side_by_side, subject_colors,
                                subject_overlays, subject_shares, thumbnail_uri)


def _maps():
    """[3, 4, 4]: subject 0 top-left 2x2, subject 1 bottom-right 2x2, background elsewhere."""
    m = torch.zeros(3, 4, 4)
    m[0, :2, :2] = 1
    m[1, 2:, 2:] = 1
    m[2] = 1 - m[0] - m[1]
    return m


def test_colors_are_distinct_for_many_subjects():
    for n in (1, 4, 8, 12):
        colors = subject_colors(n)
        assert len(colors) == n and len(set(colors)) == n
        assert BACKGROUND_COLOR not in colors


def test_overlay_colours_each_subject_region_and_leaves_background():
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    out = np.asarray(routing_overlay(image, _maps(), alpha=1.0))
    red, blue = subject_colors(2)
    assert out.shape == (32, 32, 3)
    assert (out[:16, :16] == red).all()          # subject 0: top-left quarter (nearest upsampling, 8 px per cell)
    assert (out[16:, 16:] == blue).all()         # subject 1
    assert (out[:16, 16:] == 128).all() and (out[16:, :16] == 128).all()  # background: untouched image


def test_overlay_blends_fractional_maps_in_proportion():
    image = Image.new("RGB", (2, 2), (0, 0, 0))
    m = torch.zeros(2, 1, 1)
    m[0] = 0.5
    m[1] = 0.5
    out = np.asarray(routing_overlay(image, m, alpha=1.0)).astype(int)
    expected = np.round(np.array(subject_colors(1)[0]) * 0.5).astype(int)
    assert np.abs(out[0, 0] - expected).max() <= 1


def test_fixed_colours_per_subject():
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    out = np.asarray(routing_overlay(image, _maps(), alpha=1.0, colors=[(1, 2, 3), (4, 5, 6)]))
    assert (out[:16, :16] == (1, 2, 3)).all() and (out[16:, 16:] == (4, 5, 6)).all()
    assert "rgb(4,5,6)" in legend_html(["a", "b"], colors=[(1, 2, 3), (4, 5, 6)])
    with pytest.raises(ValueError, match="1 colours for 2 subjects"):
        routing_overlay(image, _maps(), colors=[(1, 2, 3)])


def test_colormap_and_shares():
    cmap = np.asarray(routing_colormap(_maps(), size=(8, 8)))
    red, blue = subject_colors(2)
    assert (cmap[0, 0] == red).all() and (cmap[7, 7] == blue).all() and (cmap[0, 7] == BACKGROUND_COLOR).all()
    assert subject_shares(_maps()) == pytest.approx([0.25, 0.25, 0.5])


@pytest.mark.parametrize("bad", [torch.zeros(1, 4, 4), torch.zeros(4, 4), torch.full((2, 2, 2), float("nan"))])
def test_bad_maps_are_rejected(bad):
    with pytest.raises(ValueError, match="routing maps"):
        routing_overlay(Image.new("RGB", (8, 8)), bad)


def test_legend_names_subjects_with_colours_and_escapes_html():
    text = legend_html(["<cat>", ""], shares=[0.25, 0.25, 0.5])
    red = subject_colors(1)[0]
    assert "&lt;cat&gt;" in text and "<cat>" not in text
    assert f"rgb({red[0]},{red[1]},{red[2]})" in text
    assert "subject 2" in text and "25%" in text and "background" in text


def test_side_by_side_and_png_download(tmp_path):
    a, b = Image.new("RGB", (10, 10), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    row = side_by_side([a, b], gap=2)
    assert row.size == (10 + 2 + 10, 10)
    path = save_png(row, str(tmp_path / "dl"), "overlay")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == row.size


# ---- legend colours against each subject's own colour, per-subject overlays, display copies ------------------------
def _blob(color, size=40):
    """A subject of one colour on white, and its mask."""
    arr = np.full((size, size, 3), 255, np.uint8)
    arr[10:30, 10:30] = color
    mask = np.zeros((size, size), bool)
    mask[10:30, 10:30] = True
    return Image.fromarray(arr), mask


def test_dominant_colour_is_the_subjects_not_the_background():
    image, mask = _blob((30, 170, 45))
    assert dominant_color(image, mask) == (30, 170, 45)
    assert dominant_color(image) == (255, 255, 255)  # without the mask, white covers most of it


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_each_subject_is_keyed_in_a_colour_far_from_its_own(n):
    for own in (PALETTE[:n], PALETTE[-n:], PALETTE[n - 1::-1]):  # subjects coloured like the slot palette's own keys
        chosen = contrasting_colors(list(own))
        assert len(set(chosen)) == n and all(c in PALETTE for c in chosen)
        assert all(c != o for c, o in zip(chosen, own))
    green, red, blue = (30, 170, 45), (215, 35, 35), (35, 85, 225)
    chosen = contrasting_colors([green, red, blue])
    lab = lambda c: cielab(np.array(c, dtype=float))  # noqa: E731
    for own, key in zip([green, red, blue], chosen):  # every key at least as far as the slot palette's worst case
        assert np.linalg.norm(lab(own) - lab(key)) > 60, (own, key)


def test_many_subjects_still_get_distinct_colours():
    chosen = contrasting_colors([(200, 30, 30)] * 10)
    assert len(set(chosen)) == 10


def test_one_overlay_per_subject_colours_only_that_subject():
    image = Image.new("RGB", (32, 32), (128, 128, 128))
    first, second = subject_overlays(image, _maps(), alpha=1.0, colors=[(1, 2, 3), (4, 5, 6)])
    a, b = np.asarray(first), np.asarray(second)
    assert (a[:16, :16] == (1, 2, 3)).all() and (a[16:, 16:] == 128).all()
    assert (b[16:, 16:] == (4, 5, 6)).all() and (b[:16, :16] == 128).all()


def test_legend_shows_each_subjects_thumbnail_beside_its_colour():
    image, mask = _blob((30, 170, 45))
    uri = thumbnail_uri(image, mask)
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as thumb:
        assert max(thumb.size) <= 40
    text = legend_html(["frog", "cup"], colors=[(1, 2, 3), (4, 5, 6)], thumbnails=[uri, None])
    assert text.count("<img") == 1 and uri in text and "rgb(1,2,3)" in text
    assert text.index(uri) < text.index("frog")  # the thumbnail comes first, then the swatch and the name


def test_small_images_are_enlarged_with_sharp_pixels_and_their_real_size():
    rng = np.random.default_rng(0)
    small = Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
    big, caption = display_copy(small, min_side=384)
    assert big.size == (64 * 12, 32 * 12)  # aspect kept, a whole factor
    assert caption == "64x32 (shown 12x, nearest-neighbour)"
    blocks = np.asarray(big).reshape(32, 12, 64, 12, 3)
    assert (blocks == np.asarray(small)[:, None, :, None]).all()  # every pixel a 12x12 block: no blur
    large = Image.new("RGB", (512, 400))
    same, caption = display_copy(large, min_side=384)
    assert same is large and caption == "512x400"


def test_mask_preview_shows_the_mask_a_run_would_use(tmp_path):
    from anystory.app.inputs import InputError, SubjectSlot
    from anystory.app.mask_preview import cutout, preview
    from anystory.subjects import AlphaOrWholeImageSegmenter

    star = "assets/examples/red_striped_star.png"
    picture, note = preview(SubjectSlot(star), AlphaOrWholeImageSegmenter())
    alpha = np.asarray(Image.open(star))[..., 3] > 0
    assert note.startswith("Mask: automatic (alpha)") and "Upload or draw a mask to replace it" in note
    assert f"{100 * alpha.mean():.0f}% of the image" in note
    assert picture.size == alpha.shape[::-1]
    mask = np.zeros(alpha.shape, np.uint8)
    mask[:40, :40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    picture, note = preview(SubjectSlot(star, mask=str(tmp_path / "m.png")), AlphaOrWholeImageSegmenter())
    assert note.startswith("Mask: uploaded mask") and "replace" not in note
    drawn = Image.new("RGBA", alpha.shape[::-1], (0, 0, 0, 0))
    drawn.paste((255, 0, 0, 255), (0, 0, 20, 20))
    _, note = preview(SubjectSlot(star, drawn={"background": None, "layers": [drawn]}), AlphaOrWholeImageSegmenter())
    assert note.startswith("Mask: drawn mask")
    assert preview(SubjectSlot(), AlphaOrWholeImageSegmenter()) == (None, "")
    with pytest.raises(InputError, match="Subject 3 image: file not found"):
        preview(SubjectSlot("missing.png"), AlphaOrWholeImageSegmenter(), index=2)
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    cut = np.asarray(cutout(rgb, np.eye(4, dtype=bool)))
    assert (cut[0, 0] == (10, 20, 30)).all() and not (cut[0, 1] == (10, 20, 30)).all()


def test_a_mask_of_0_and_255_selects_the_subject_too():
    image, mask = _blob((35, 85, 225))
    assert dominant_color(image, (mask * 255).astype(np.uint8)) == (35, 85, 225)
