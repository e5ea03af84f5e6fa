"""What the demo page shows beside the routing maps: a colour key with thumbnails, and per subject a colour
chosen to differ from the subject's own dominant colour (a green subject is not drawn in green).

The maps themselves are drawn by :mod:`anystory.visualize` (core code draws them too); its names are
re-exported here so ``anystory.app.visualize`` keeps offering them.
"""
from __future__ import annotations

import base64
import html
import io
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .colours import pick_colours
from ..visualize import (BACKGROUND_COLOR, PALETTE, Color, _colors, routing_colormap, routing_overlay,  # noqa: F401
                         side_by_side, subject_colors, subject_overlays, subject_shares)

def cielab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, [..., 3]) -> CIELAB (D65): distances there follow what the eye sees."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.2126, 0.0193], [0.3576, 0.7152, 0.1192], [0.1805, 0.0722, 0.9505]])
    xyz = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 216 / 24389, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def dominant_color(image: Image.Image, mask: Optional[np.ndarray] = None) -> Color:
    """The most common colour of the subject (inside the boolean ``mask``): the mean of the fullest
    4-level-per-channel bin."""
    small = image.convert("RGB")
    scale = min(1.0, 96 / max(small.size))
    size = (max(1, round(small.width * scale)), max(1, round(small.height * scale)))
    pixels = np.asarray(small.resize(size, Image.BILINEAR), dtype=np.int64).reshape(-1, 3)
    if mask is not None:
        inside = Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
        keep = np.asarray(inside.resize(size, Image.NEAREST)) > 127
        if keep.any():
            pixels = pixels[keep.reshape(-1)]
    bins = (pixels // 64) @ np.array([16, 4, 1])
    fullest = np.bincount(bins, minlength=64).argmax()
    return tuple(int(v) for v in pixels[bins == fullest].mean(axis=0).round())


def contrasting_colors(dominant: Sequence[Color], palette: Sequence[Color] = PALETTE) -> List[Color]:
    """One distinct palette colour per subject, CIEDE2000 >= 25 from each other and from the subject's own
    dominant colour (see :mod:`anystory.app.colours`)."""
    return pick_colours(dominant, palette)


def thumbnail_uri(image: Image.Image, mask: Optional[np.ndarray] = None, size: int = 40) -> str:
    """A small PNG data URI of the subject (outside ``mask`` white), for the colour key."""
    rgb = image.convert("RGB")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape == (rgb.height, rgb.width):
            rgb = Image.fromarray(np.where(m[..., None], np.asarray(rgb), 255).astype(np.uint8))
    rgb.thumbnail((size, size), Image.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def legend_html(names: Sequence[str], shares: Optional[Sequence[float]] = None,
                colors: Optional[Sequence[Color]] = None, thumbnails: Optional[Sequence[Optional[str]]] = None) -> str:
    """A colour key for the overlay: per subject its thumbnail (a data URI, when given) beside its colour swatch,
    its name, and its share of the image when known."""
    colors = _colors(len(names), colors)
    items = []
    for i, (name, (r, g, b)) in enumerate(zip(names, colors)):
        label = html.escape(name or f"subject {i + 1}")
        if shares is not None and i < len(shares):
            label += f" &mdash; {100 * shares[i]:.0f}% of the image"
        thumb = thumbnails[i] if thumbnails is not None and i < len(thumbnails) else None
        thumb_html = (f'<img src="{html.escape(thumb)}" alt="{html.escape(name or "")}" class="anystory-legend-thumb" '
                      f'style="width:40px;height:40px;object-fit:contain;margin-right:.35em;'
                      f'border:3px solid rgb({r},{g},{b});border-radius:4px">') if thumb else ""
        items.append(f'<span class="anystory-legend-item" '
                     f'style="display:inline-flex;align-items:center;margin-right:1em">{thumb_html}'
                     f'<span style="display:inline-block;width:1em;height:1em;margin-right:.35em;'
                     f'background:rgb({r},{g},{b});border:1px solid #0006"></span>{label}</span>')
    if shares is not None and len(shares) > len(names):
        items.append('<span class="anystory-legend-item anystory-legend-background" style="display:inline-flex;'
                     'align-items:center;margin-right:1em"><span style="display:inline-block;width:1em;height:1em;'
                     'margin-right:.35em;border:1px dashed #0006"></span>'
                     f"uncoloured: background &mdash; {100 * shares[len(names)]:.0f}%</span>")
    return '<div class="anystory-legend">' + "".join(items) + "</div>"


def display_copy(image: Image.Image, min_side: int = 384) -> Tuple[Image.Image, str]:
    """A copy for the page: a small image enlarged by a whole factor with nearest-neighbour (sharp pixels, no
    invented detail), and a caption with its real size. Downloads keep the original."""
    w, h = image.size
    factor = max(1, -(-min_side // max(1, min(w, h))))
    if factor == 1:
        return image, f"{w}x{h}"
    return image.resize((w * factor, h * factor), Image.NEAREST), f"{w}x{h} (shown {factor}x, nearest-neighbour)"


def save_png(image: Image.Image, directory: str, name: str) -> str:
    """Write ``image`` as ``directory/name.png`` (for download buttons) and return the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.png")
    image.save(path, format="PNG")
    return path
