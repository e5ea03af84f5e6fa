"""Subjects: what a user hands the pipelines, validated and normalised in one place.

Both backbones (SDXL, FLUX) and the app call :func:`prepare_subjects`, so a bad image or mask gets the
same clear ``ValueError`` wherever it enters.

Mask policy: a mask must have the image's size. We reject a mismatch rather than resize it, because a
silently stretched mask routes a subject's identity to the wrong pixels.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]

#: Documented maximum number of subjects per call (both backbones).
MAX_SUBJECTS = 4


@dataclass
class Subject:
    """One subject to personalise.

    image: the reference photo (PIL image, HxWxC / HxW array, or a file path).
    mask: optional foreground mask of the same size (PIL, array or path); nonzero = subject.
          Without one, the pipeline's ``Segmenter`` decides (alpha channel, else the whole image).
    name: a label, used by the app and storyboard.
    scale: strength of the semantic (decoupled cross-attention) condition, eta in the paper.
    reference_scale: strength of the ReferenceNet (fine detail) condition.
    """

    image: ImageLike
    mask: Optional[ImageLike] = None
    name: str = ""
    scale: float = 1.0
    reference_scale: float = 1.0


@dataclass
class PreparedSubject:
    """A validated subject: RGB image on white outside the mask, cropped square around the subject."""

    image: Image.Image  # RGB, segmented (white outside the mask), square crop
    mask: np.ndarray  # bool, same size as ``image``
    name: str
    scale: float
    reference_scale: float
    mask_source: str = field(default="given")  # "given", "alpha", "whole-image" or a segmenter's name


class Segmenter:
    """Interface for automatic matting: return a boolean foreground mask for an RGB(A) image.

    ``name`` is reported (app, outputs) so a user knows where a mask came from.
    """

    name = "segmenter"

    def __call__(self, image: Image.Image) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError


class AlphaOrWholeImageSegmenter(Segmenter):
    """The offline fallback: the alpha channel when it carries a cut-out, else the whole image."""

    name = "alpha-or-whole-image"

    def __call__(self, image: Image.Image) -> np.ndarray:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            alpha = np.asarray(image.convert("RGBA"))[..., 3]
            fg = alpha > 127
            if fg.any() and not fg.all():
                self.last_source = "alpha"
                return fg
        self.last_source = "whole-image"
        return np.ones((image.height, image.width), dtype=bool)


def _load(value: ImageLike, what: str) -> Image.Image:
    if isinstance(value, (str, os.PathLike)):
        try:
            img = Image.open(value)
            img.load()
        except FileNotFoundError:
            raise ValueError(f"{what}: file not found: {value}") from None
        except Exception as e:  # PIL raises several types for unreadable files
            raise ValueError(f"{what}: cannot read image file {value}: {e}") from None
        return img
    if isinstance(value, np.ndarray):
        if value.ndim not in (2, 3) or value.size == 0:
            raise ValueError(f"{what}: array must be HxW or HxWxC and non-empty, got shape {value.shape}")
        arr = value
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        elif arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating):
                if not np.isfinite(arr).all():
                    raise ValueError(f"{what}: array contains NaN or infinite values")
                arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
            else:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim == 3 and arr.shape[2] not in (3, 4):
            raise ValueError(f"{what}: array must have 1, 3 or 4 channels, got {arr.shape[2]}")
        return Image.fromarray(arr)
    if isinstance(value, Image.Image):
        return value
    raise ValueError(f"{what}: expected a PIL image, numpy array or file path, got {type(value).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, 16-bit is rescaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "P"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _mask_array(mask: Image.Image) -> np.ndarray:
    if mask.mode in ("RGBA", "LA"):
        return np.asarray(mask)[..., -1] > 127
    arr = np.asarray(to_rgb(mask) if mask.mode not in ("L", "1") else mask.convert("L"))
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    return arr > 127


def _check_scale(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{what} must be finite, got {v}")
    if v < 0:
        raise ValueError(f"{what} must be >= 0, got {v}")
    return v


def square_crop_box(mask: np.ndarray, expand: float = 1.04) -> tuple:
    """Square box around the mask's bounding box, enlarged by ``expand`` (may extend past the image)."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    side = max(y1 - y0, x1 - x0) * expand
    half = side / 2.0
    return (int(round(cx - half)), int(round(cy - half)), int(round(cx + half)), int(round(cy + half)))


def segment_and_crop(image: Image.Image, mask: np.ndarray, expand: float = 1.04):
    """White out the background, then crop a square around the subject (padding with white)."""
    arr = np.asarray(image).copy()
    arr[~mask] = 255
    box = square_crop_box(mask, expand)
    seg = Image.fromarray(arr).crop(box)  # PIL pads out-of-bounds with black: repaint it white
    m = Image.fromarray(mask.astype(np.uint8) * 255).crop(box)
    inside = Image.new("L", image.size, 255).crop(box)
    seg = Image.composite(seg, Image.new("RGB", seg.size, (255, 255, 255)), inside)
    return seg, np.asarray(m) > 127


def prepare_subjects(
    subjects: Optional[Sequence[Subject]],
    max_subjects: int = MAX_SUBJECTS,
    segmenter: Optional[Segmenter] = None,
    expand: float = 1.04,
) -> list:
    """Validate every subject and return :class:`PreparedSubject` objects; raise ``ValueError`` naming the problem."""
    if subjects is None:
        return []
    if isinstance(subjects, Subject):
        subjects = [subjects]
    subjects = list(subjects)
    if len(subjects) > max_subjects:
        raise ValueError(f"Too many subjects: got {len(subjects)}, the maximum is {max_subjects}.")
    segmenter = segmenter or AlphaOrWholeImageSegmenter()
    out = []
    for i, s in enumerate(subjects):
        label = f"subject {i}" + (f" ({s.name})" if getattr(s, "name", "") else "")
        if not isinstance(s, Subject):
            raise ValueError(f"{label}: expected anystory.Subject, got {type(s).__name__}")
        scale = _check_scale(s.scale, f"{label}: scale")
        ref_scale = _check_scale(s.reference_scale, f"{label}: reference_scale")
        raw = _load(s.image, f"{label} image")
        if raw.width == 0 or raw.height == 0:
            raise ValueError(f"{label} image has zero size ({raw.width}x{raw.height}).")
        if s.mask is not None:
            m = _load(s.mask, f"{label} mask")
            if m.size != raw.size:
                raise ValueError(
                    f"{label}: mask size {m.width}x{m.height} does not match image size {raw.width}x{raw.height}; "
                    "masks are not resized (a stretched mask would misplace the subject)."
                )
            mask, source = _mask_array(m), "given"
        else:
            mask = np.asarray(segmenter(raw), dtype=bool)
            source = getattr(segmenter, "last_source", None) or segmenter.name
            if mask.shape != (raw.height, raw.width):
                raise ValueError(f"{label}: segmenter {segmenter.name} returned a mask of shape {mask.shape}")
        if not mask.any():
            raise ValueError(f"{label}: mask is empty (all zero); it must mark the subject.")
        seg, seg_mask = segment_and_crop(to_rgb(raw), mask, expand)
        out.append(PreparedSubject(seg, seg_mask, s.name, scale, ref_scale, source))
    return out
