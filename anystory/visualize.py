"""Routing maps made visible: one colour per subject over the generated image.

The router decides, per latent position, which subject (or the background) may act there. Showing that
decision over the picture is how a user checks that "the cat" really went where the cat is. Maps arrive as
``[N+1, h, w]`` (channel N = background) at latent resolution and may be fractional (the pipeline averages the
one-hot maps of all cross-attention layers), so each subject's colour is blended in proportion to its share.
Upsampling is nearest-neighbour on purpose: the latent grid the router works on stays visible.

Core code (``anystory.generate``, training's tracking, benchmarks) and the app both draw maps with this module;
the app's page-only pieces (colour key, thumbnails, colours chosen against each subject) are in
:mod:`anystory.app.visualize`.
"""
from __future__ import annotations

import colorsys
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
    (220, 190, 255),  # lavender (magenta was 21 CIEDE2000 from purple)
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
