"""The region canvas: a box drawn on a canvas of the output's shape becomes the subject's region."""
import numpy as np
import pytest
from PIL import Image

from anystory.app.generate_tab import SLOT_FIELDS, slots_from_values
from anystory.app.inputs import InputError, SubjectSlot, collect_subjects, drawn_region
from anystory.app.region_canvas import CANVAS_SIDE, canvas_size, drawn_region_text, region_canvas, typed_box
from anystory.subjects import AlphaOrWholeImageSegmenter

STAR = "assets/examples/red_striped_star.png"


def _draw(value, box, color=(230, 25, 75, 255)):
    """``value`` with one more layer holding a filled rectangle at pixel ``box`` (x0, y0, x1, y1), end exclusive."""
    w, h = value["background"].size
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    layer.paste(color, box)
    return dict(value, layers=list(value["layers"]) + [layer])


def test_the_canvas_has_the_output_shape_and_a_faint_grid():
    assert canvas_size(128, 128) == (CANVAS_SIDE, CANVAS_SIDE)
    assert canvas_size(1024, 512) == (CANVAS_SIDE, CANVAS_SIDE // 2)
    assert canvas_size(96, 160) == (round(CANVAS_SIDE * 96 / 160), CANVAS_SIDE)
    value = region_canvas(1024, 512)
    pixels = np.asarray(value["background"])
    assert value["layers"] == [] and pixels.shape == (CANVAS_SIDE // 2, CANVAS_SIDE, 3)
    assert (pixels[5, 5] == 255).all() and (pixels[5, CANVAS_SIDE // 2] < 255).all()  # a quarter line
    assert drawn_region(value, "Subject 1") is None and drawn_region(None, "Subject 1") is None


def test_a_drawn_box_becomes_the_region_in_fractions_of_the_output():
    value = _draw(region_canvas(1024, 512), (0, 32, 128, 128))  # the left half, lower three quarters
    assert drawn_region(value, "Subject 1") == (0.0, 0.25, 0.5, 1.0)
    scribble = _draw(_draw(region_canvas(64, 64), (64, 64, 70, 70)), (120, 100, 128, 192))  # two strokes: their box
    assert drawn_region(scribble, "s") == (0.25, 0.25, 0.5, 0.75)
    assert drawn_region_text(value) == "0, 0.25, 0.5, 1"
    assert drawn_region_text(region_canvas(64, 64)) is None  # an empty canvas leaves the typed field alone


def test_a_new_output_size_keeps_the_drawn_region():
    value = _draw(region_canvas(128, 128), (64, 0, 256, 128))  # the right half, upper half
    wide = region_canvas(256, 128, value)
    assert wide["background"].size == (CANVAS_SIDE, CANVAS_SIDE // 2) and len(wide["layers"]) == 1
    assert drawn_region(wide, "s") == drawn_region(value, "s") == (0.25, 0.0, 1.0, 0.5)


def test_the_slot_takes_typed_text_first_then_the_drawing():
    drawn = _draw(region_canvas(128, 128), (0, 0, 128, 256))
    values = [STAR, None, None, "cat", 1.0, 1.0, "", drawn,
              STAR, None, None, "dog", 1.0, 1.0, "0.5, 0, 1, 1", drawn,
              STAR, None, None, "owl", 1.0, 1.0, " ", None]
    assert len(values) == 3 * len(SLOT_FIELDS)
    subjects, _ = collect_subjects(slots_from_values(values), 4, AlphaOrWholeImageSegmenter())
    assert [s.region for s in subjects] == [(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0), None]
    speck = _draw(region_canvas(128, 128), (3, 3, 4, 4))  # one pixel of 256: still a box, 1/256 wide
    (subject,), _ = collect_subjects([SubjectSlot(STAR, region_drawn=speck)], 4, AlphaOrWholeImageSegmenter())
    assert subject.region == pytest.approx((0.012, 0.012, 0.016, 0.016))
    odd = dict(drawn, layers=drawn["layers"] + [Image.new("RGBA", (10, 10), (255, 0, 0, 255))])
    with pytest.raises(InputError, match="Subject 1 \\(cat\\): the region canvas's layers differ in size"):
        collect_subjects([SubjectSlot(STAR, name="cat", region_drawn=odd)], 4, AlphaOrWholeImageSegmenter())


def test_a_region_is_shown_as_a_box_on_the_grid_in_place_of_the_strokes():
    """Issue 30: after drawing or typing, the canvas shows the region itself: outlined in the slot's colour and
    tinted inside, on the same grid, at the same fractions whatever the output's shape."""
    color = (0, 130, 200)
    drawn = _draw(region_canvas(128, 128), (10, 10, 20, 200))
    value = region_canvas(256, 128, drawn, box=(0.5, 0.0, 1.0, 0.5), color=color)
    assert value["layers"] == []  # the scribble gives way to its box
    pixels = np.asarray(value["background"]).astype(int)
    assert pixels.shape == (CANVAS_SIDE // 2, CANVAS_SIDE, 3)
    h, w = pixels.shape[:2]
    assert (pixels[0, w // 2] == color).all() and (pixels[h // 2 - 1, w - 1] == color).all()  # the outline
    inside = pixels[h // 8, 3 * w // 4 - 5]
    assert (inside != 255).any() and (np.abs(inside - 255) < 60).all()  # lightly tinted, the grid still shows
    assert (pixels[3 * h // 4 + 3, w // 4 + 3] == 255).all() and (pixels[h // 8, w // 8] == 255).all()  # outside
    assert (np.asarray(value["composite"]) == pixels).all()
    assert drawn_region(value, "s") is None  # the box lives in the Region field, which the canvas only shows


def test_typed_text_reads_as_a_box_blank_as_none_and_half_typed_as_unreadable():
    assert typed_box("0, 0, 0.5, 1") == (True, (0.0, 0.0, 0.5, 1.0))
    assert typed_box("") == (True, None) and typed_box(None) == (True, None)
    assert typed_box("0, 0, 0.5") == (False, None) and typed_box("0, 0, 0.5, x") == (False, None)
