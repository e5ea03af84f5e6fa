"""Layout: ``Subject(region=...)`` confines a subject's routing to a part of the output.

The router still decides *within* the region; outside it the subject's routing logit is ``-inf`` in every layer
(SDXL: ``AnyStoryState.routing_regions``; FLUX: the ``closed`` argument of ``router_flux.routing_map``), so it
gets no positions there and, by the routing guarantees (docs/architecture.md, "What routing guarantees"), acts
nowhere there.

A region is either

* a **box** ``(x0, y0, x1, y1)`` in **fractions of the output** width and height, each in [0, 1] with
  ``x0 < x1`` and ``y0 < y1`` (resolution-free, so one layout serves every output size and a storyboard's shots);
  numbers above 1 are refused as pixel coordinates, naming the conversion; or
* a **mask** (PIL image, array or file, read by :func:`anystory.images.read_mask`) of the output's size, checked
  when the size is known (the pipeline call), never stretched: a stretched mask would misplace the subject.

Each layer's grid then takes the region by nearest resizing (``attention_processors._resize_map``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import InvalidInputError
from .images import ImageLike, read_mask

Box = Tuple[float, float, float, float]
Region = Union[Box, np.ndarray]


def _is_box(region) -> bool:
    if isinstance(region, (list, tuple)) and len(region) == 4:
        return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in region)
    return False


def check_region(region: Optional[Union[Sequence[float], ImageLike]], label: str) -> Optional[Region]:
    """A validated region: ``None``, a box of four floats, or a boolean mask; ``InvalidInputError`` naming the
    problem otherwise."""
    if region is None:
        return None
    if isinstance(region, (list, tuple)) and not _is_box(region):
        raise InvalidInputError(f"{label}: region box must be four numbers (x0, y0, x1, y1) as fractions of the "
                                f"output size, got {region!r}")
    if _is_box(region):
        box = tuple(float(v) for v in region)
        if not all(math.isfinite(v) for v in box):
            raise InvalidInputError(f"{label}: region box must be finite numbers, got {box}")
        if any(v > 1 for v in box):
            raise InvalidInputError(f"{label}: region box {box} looks like pixels; give (x0, y0, x1, y1) as fractions "
                                    "of the output size in [0, 1] (e.g. x / width)")
        if any(v < 0 for v in box):
            raise InvalidInputError(f"{label}: region box {box} has a negative coordinate; fractions lie in [0, 1]")
        x0, y0, x1, y1 = box
        if not (x0 < x1 and y0 < y1):
            raise InvalidInputError(f"{label}: region box {box} is empty; it needs x0 < x1 and y0 < y1")
        return box
    mask = read_mask(region, f"{label} region")
    if not mask.any():
        raise InvalidInputError(f"{label}: region mask is empty (all background); it must mark where the subject goes")
    return mask


def parse_region_text(text: Optional[str], label: str) -> Optional[Box]:
    """A box typed as ``"x0, y0, x1, y1"`` (the app's field); blank is no region."""
    if text is None or not str(text).strip():
        return None
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise InvalidInputError(f"{label}: region {text!r} must be four numbers x0, y0, x1, y1 (fractions of the "
                                "output size, e.g. 0, 0, 0.5, 1 for the left half)") from None
    return check_region(values, label)


def region_pixels(region: Optional[Region], height: int, width: int, label: str) -> np.ndarray:
    """The region as a boolean ``[height, width]`` mask of the output (everywhere when ``None``)."""
    if region is None:
        return np.ones((height, width), dtype=bool)
    if isinstance(region, tuple):
        x0, y0, x1, y1 = region
        c0, c1 = int(round(x0 * width)), int(round(x1 * width))
        r0, r1 = int(round(y0 * height)), int(round(y1 * height))
        out = np.zeros((height, width), dtype=bool)
        out[r0:r1, c0:c1] = True
        if not out.any():
            raise InvalidInputError(f"{label}: region box {region} covers no pixel of the {width}x{height} output")
        return out
    if region.shape != (height, width):
        h, w = region.shape
        raise InvalidInputError(f"{label}: region mask size {w}x{h} does not match the output size {width}x{height}; "
                                "region masks are not resized (a stretched mask would misplace the subject).")
    return region


def routing_regions(prepared: Sequence, height: int, width: int, device=None) -> Optional[torch.Tensor]:
    """``[N, height, width]`` float (1 = the subject may go there) for prepared subjects, or ``None`` when no
    subject has a region (the router alone decides, exactly as before)."""
    regions = [getattr(p, "region", None) for p in prepared]
    if all(r is None for r in regions):
        return None
    masks = [region_pixels(r, height, width, f"subject {i}" + (f" ({p.name})" if p.name else ""))
             for i, (r, p) in enumerate(zip(regions, prepared))]
    return torch.from_numpy(np.stack(masks)).float().to(device)


def closed_at_grid(regions: Optional[torch.Tensor], grid: Tuple[int, int]) -> Optional[torch.Tensor]:
    """``[1, N, h*w]`` bool, True where a subject may not go, at an image-token grid (FLUX's routing input)."""
    if regions is None:
        return None
    small = torch.nn.functional.interpolate(regions[None], size=grid, mode="nearest")
    return (small < 0.5).flatten(2)
