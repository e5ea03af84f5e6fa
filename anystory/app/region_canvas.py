"""A subject's region drawn on a canvas of the output's shape: the strokes' bounding box becomes the region.

The canvas has the output's aspect ratio (its long side fixed for the page), white with a faint grid in quarters,
so a box drawn on it is the same fraction of the output whatever the output's pixel size. The region is the box
``(x0, y0, x1, y1)`` around every stroke, in fractions (:func:`anystory.app.inputs.drawn_region`): a rough scribble
or a filled rectangle give the box the user means, and the typed "x0, y0, x1, y1" field stays the precise
alternative (typed text wins; a drawing fills the field in).
Whatever set the field, drawing or typing, the canvas is then remade with that box on its grid (outlined in the
slot's colour, lightly filled) in place of the strokes: a scribble was shown as a scribble, not as the region it
became. When the output size changes the canvas is remade at the new shape with the same box (strokes not yet
turned into a box are scaled onto it), so a region survives as the same fractions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from ..errors import InvalidInputError
from ..regions import Box, parse_region_text
from .inputs import drawn_region, editor_layers

#: The canvas's long side in pixels: big enough to draw on, small enough beside the subject's other fields.
CANVAS_SIDE = 256
GRID_COLOR = (225, 225, 225)
#: The region box: its outline's width in canvas pixels, and how much of the slot's colour tints its inside.
BOX_LINE = 3
BOX_TINT = 0.2


def canvas_size(width: int, height: int, side: int = CANVAS_SIDE) -> Tuple[int, int]:
    """(w, h) with the output's aspect ratio and the long side ``side``."""
    width, height = max(1, int(width)), max(1, int(height))
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def grid_image(size: Tuple[int, int]) -> Image.Image:
    """White with faint lines at the quarters: the background the user draws regions on."""
    w, h = size
    pixels = np.full((h, w, 3), 255, dtype=np.uint8)
    for k in (1, 2, 3):
        pixels[:, min(w - 1, k * w // 4)] = GRID_COLOR
        pixels[min(h - 1, k * h // 4), :] = GRID_COLOR
    return Image.fromarray(pixels)


def box_image(size: Tuple[int, int], box: Box, color: Tuple[int, int, int]) -> Image.Image:
    """The grid with ``box`` (fractions) tinted inside and outlined in ``color``: the region as the canvas shows it."""
    w, h = size
    pixels = np.asarray(grid_image(size)).astype(np.float32)
    x0, y0 = min(w - 1, max(0, round(box[0] * w))), min(h - 1, max(0, round(box[1] * h)))
    x1, y1 = min(w, max(x0 + 1, round(box[2] * w))), min(h, max(y0 + 1, round(box[3] * h)))  # ends exclusive
    rgb = np.asarray(color, dtype=np.float32)
    pixels[y0:y1, x0:x1] = (1 - BOX_TINT) * pixels[y0:y1, x0:x1] + BOX_TINT * rgb
    line = min(BOX_LINE, x1 - x0, y1 - y0)
    for rows, cols in ((slice(y0, y0 + line), slice(x0, x1)), (slice(y1 - line, y1), slice(x0, x1)),
                       (slice(y0, y1), slice(x0, x0 + line)), (slice(y0, y1), slice(x1 - line, x1))):
        pixels[rows, cols] = rgb
    return Image.fromarray(pixels.round().astype(np.uint8))


def region_canvas(width, height, previous: Optional[dict] = None, box: Optional[Box] = None,
                  color: Tuple[int, int, int] = (230, 25, 75)) -> dict:
    """The editor value of a region canvas for a ``width`` x ``height`` output: with ``box``, the grid showing it
    (no strokes); else the grid with ``previous``'s strokes (if any) scaled onto it."""
    size = canvas_size(float(width or 1), float(height or 1))
    if box is not None:
        background = box_image(size, box, color)
        return {"background": background, "layers": [], "composite": background.copy()}
    background = grid_image(size)
    layers = [layer.resize(size, Image.NEAREST) for layer in editor_layers(previous)]
    composite = background.copy()
    for layer in layers:
        composite.paste(layer, (0, 0), layer)
    return {"background": background, "layers": layers, "composite": composite}


def typed_box(text: Optional[str]) -> Tuple[bool, Optional[Box]]:
    """``(readable, box)`` of the Region field's text: blank reads as no box; a half-typed or wrong text is not
    readable (the canvas then stays as it is; Generate names the problem)."""
    try:
        return True, parse_region_text(text, "Region")
    except InvalidInputError:
        return False, None


def region_text(box: Optional[Box]) -> str:
    """The typed form of a box, as the Region field shows and reads it; blank for no region."""
    return "" if box is None else ", ".join(f"{v:g}" for v in box)


def drawn_region_text(value: Optional[dict]) -> Optional[str]:
    """What the Region field shows after a stroke: the drawn box; None (leave the field as the user left it) when
    nothing is drawn, as after the canvas is remade for a new output size, or when the strokes cannot be read."""
    try:
        box = drawn_region(value, "Region")
    except InvalidInputError:
        return None
    return None if box is None else region_text(box)
