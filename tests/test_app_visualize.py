"""Routing-map overlays: one colour per subject, exactly where the router sent it."""
import numpy as np
import pytest
import torch
from PIL import Image

from anystory.visualize import (BACKGROUND_COLOR, legend_html, routing_colormap, routing_overlay, save_png,
                                side_by_side, subject_colors, subject_shares)


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
