"""Routing maps made visible: one colour per subject over the generated image.

The router decides, per latent position, which subject (or the background) may act there. Showing that
decision over the picture is how a user checks that "the cat" really went where the cat is. Maps arrive as
``[N+1, h, w]`` (channel N = background) at latent resolution and may be fractional (the pipeline averages the
one-hot maps of all cross-attention layers), so each subject's colour is blended in proportion to its share.
Upsampling is nearest-neighbour on purpose: the latent grid the router works on stays visible.

A subject's colour in the key is chosen to differ from the subject's own dominant colour (a green subject is not
drawn in green), and every subject also gets an overlay of its own, so overlapping or small regions stay readable.
"""
from __future__ import annotations

import base64
import colorsys
import html
import io
import itertools
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image

Color = Tuple[int, int, int]

#: Colours that stay distinguishable from each other (and for common colour-vision deficiencies, the first 4).
PALETTE: Tuple[Color, ...] = (
    (230, 25, 75),    # red
    (0, 130, 200),    # blue
    (255, 190, 0),    # amber
    (60, 180, 75),    # green
    (145, 30, 180),   # purple
    (70, 220, 220),   # cyan
    (240, 50, 230),   # magenta
    (128, 80, 0),     # brown
)
BACKGROUND_COLOR: Color = (40, 40, 40)


def subject_colors(n: int) -> List[Color]:
    """``n`` distinct colours: the palette first, then evenly spaced hues."""
    colors = list(PALETTE[:n])
    extra = n - len(colors)
    for k in range(extra):
        r, g, b = colorsys.hsv_to_rgb((k + 0.5) / extra, 0.85, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


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
    """One distinct palette colour per subject, as far as possible from that subject's own dominant colour.

    Maximises the smallest CIELAB distance over subjects (then the sum): every subject's region stays visible
    over the subject itself. Exhaustive for up to 4 subjects, greedy beyond; palette order breaks ties.
    """
    n = len(dominant)
    if n == 0:
        return []
    colors = list(palette) if n <= len(palette) else subject_colors(n)
    dist = np.linalg.norm(cielab(np.array(dominant))[:, None] - cielab(np.array(colors))[None], axis=-1)  # [n, K]
    if n <= 4:
        def score(pick):
            d = [dist[i, k] for i, k in enumerate(pick)]
            return round(min(d), 6), sum(d)

        return [tuple(colors[k]) for k in max(itertools.permutations(range(len(colors)), n), key=score)]
    picks: dict = {}
    for i in np.argsort(dist.max(axis=1)):  # subjects with the fewest good options pick first
        free = [k for k in range(len(colors)) if k not in picks.values()]
        picks[int(i)] = max(free, key=lambda k: dist[i, k])
    return [tuple(colors[picks[i]]) for i in range(n)]


def _as_maps(maps: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    arr = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, dtype=np.float32)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3 or arr.shape[0] < 2:
        raise ValueError(f"routing maps must be [N+1, h, w] with at least one subject, got shape {tuple(arr.shape)}")
    if not np.isfinite(arr).all():
        raise ValueError("routing maps contain NaN or infinite values")
    return np.clip(arr, 0.0, 1.0)


def _upsample(maps: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """[K, h, w] -> [K, H, W] nearest-neighbour (``size`` is PIL's (W, H))."""
    w, h = size
    rows = (np.arange(h) * maps.shape[1] // h).clip(0, maps.shape[1] - 1)
    cols = (np.arange(w) * maps.shape[2] // w).clip(0, maps.shape[2] - 1)
    return maps[:, rows][:, :, cols]


def _colors(n: int, colors: Optional[Sequence[Color]]) -> List[Color]:
    if colors is None:
        return subject_colors(n)
    if len(colors) != n:
        raise ValueError(f"{len(colors)} colours for {n} subjects")
    return [tuple(int(v) for v in c) for c in colors]


def routing_colormap(maps: Union[torch.Tensor, np.ndarray], size: Optional[Tuple[int, int]] = None,
                     colors: Optional[Sequence[Color]] = None) -> Image.Image:
    """The maps alone: each position coloured by its subjects' shares, the background dark grey."""
    arr = _as_maps(maps)
    if size is not None:
        arr = _upsample(arr, size)
    n = arr.shape[0] - 1
    palette = np.array(_colors(n, colors) + [BACKGROUND_COLOR], dtype=np.float32)  # [N+1, 3]
    total = arr.sum(axis=0, keepdims=True)
    weights = arr / np.where(total > 0, total, 1.0)
    rgb = np.einsum("khw,kc->hwc", weights, palette)
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8))


def routing_overlay(image: Image.Image, maps: Union[torch.Tensor, np.ndarray], alpha: float = 0.55,
                    colors: Optional[Sequence[Color]] = None) -> Image.Image:
    """``image`` with subject i's colour blended in where the router sent subject i (``maps``: [N+1, h, w]).

    The background channel adds no colour, so whatever stays uncoloured is where no subject acts. ``colors``
    (one per subject) keeps a character's colour fixed across frames whose casts differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    arr = _upsample(_as_maps(maps), image.size)
    n = arr.shape[0] - 1
    subjects = arr[:n]
    palette = np.array(_colors(n, colors), dtype=np.float32)
    share = subjects.sum(axis=0).clip(0.0, 1.0)[..., None]  # [H, W, 1]
    color = np.einsum("khw,kc->hwc", subjects, palette) / np.maximum(share, 1e-6)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    out = base * (1.0 - alpha * share) + color * (alpha * share)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def subject_overlays(image: Image.Image, maps: Union[torch.Tensor, np.ndarray], alpha: float = 0.55,
                     colors: Optional[Sequence[Color]] = None) -> List[Image.Image]:
    """One overlay per subject: only subject i's region coloured (in its legend colour), the rest untouched."""
    arr = _as_maps(maps)
    n = arr.shape[0] - 1
    colors = _colors(n, colors)
    return [routing_overlay(image, np.stack([arr[i], 1.0 - arr[i]]), alpha, colors=[colors[i]]) for i in range(n)]


def subject_shares(maps: Union[torch.Tensor, np.ndarray]) -> List[float]:
    """Fraction of the image each subject (then the background) was routed to."""
    arr = _as_maps(maps)
    return [float(v) for v in arr.reshape(arr.shape[0], -1).mean(axis=1)]


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
        items.append(f"<span>uncoloured: background &mdash; {100 * shares[len(names)]:.0f}%</span>")
    return '<div class="anystory-legend">' + "".join(items) + "</div>"


def side_by_side(images: Sequence[Image.Image], gap: int = 8, fill: Color = (255, 255, 255)) -> Image.Image:
    """Images in one row (heights matched to the first), e.g. output | overlay for a single download."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    h = images[0].height
    scaled = [im.convert("RGB") if im.height == h else
              im.convert("RGB").resize((max(1, round(im.width * h / im.height)), h), Image.NEAREST) for im in images]
    canvas = Image.new("RGB", (sum(im.width for im in scaled) + gap * (len(scaled) - 1), h), fill)
    x = 0
    for im in scaled:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


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
