"""Subjects: what a user hands the pipelines, validated and normalised in one place.

Both backbones (SDXL, FLUX) and the app call :func:`prepare_subjects`, so a bad image or mask gets the
same clear ``ValueError`` wherever it enters.

Images and masks are read by the one rule of :mod:`anystory.images` (EXIF orientation, array dtypes and ranges,
mask foreground relative to the mask's own range). Mask policy: a mask must have the image's size. We reject a mismatch rather than resize it, because a
silently stretched mask routes a subject's identity to the wrong pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .errors import InvalidInputError, check_number
from .images import ImageLike, read_image, read_mask, to_rgb
from .regions import check_region

__all__ = ["MAX_SUBJECTS", "MAX_SCALE", "AlphaOrWholeImageSegmenter", "PreparedSubject", "Segmenter", "Subject",
           "prepare_subjects", "square_crop_box", "segment_and_crop", "to_rgb"]

#: Documented maximum number of subjects per call (both backbones).
MAX_SUBJECTS = 4
#: Documented range of ``scale`` and ``reference_scale``: [0, MAX_SCALE] (larger values only saturate or overflow).
MAX_SCALE = 10.0


@dataclass
class Subject:
    """One subject to personalise.

    image: the reference photo (PIL image, HxWxC / HxW array, or a file path), read by :func:`anystory.images.read_image`.
    mask: optional foreground mask of the same size (PIL, array or path), read by :func:`anystory.images.read_mask`.
          Without one, the pipeline's ``Segmenter`` decides (alpha channel, else the whole image).
    name: a label, used by the app and storyboard.
    scale: strength of the semantic (decoupled cross-attention) condition, eta in the paper; in [0, MAX_SCALE].
    reference_scale: strength of the ReferenceNet (fine detail) condition; in [0, MAX_SCALE].
    region: optional layout, where in the output the subject may be routed: a box (x0, y0, x1, y1) in fractions
            of the output size, or a mask of the output's size (:mod:`anystory.regions`).
    """

    image: ImageLike
    mask: Optional[ImageLike] = None
    name: str = ""
    scale: float = 1.0
    reference_scale: float = 1.0
    region: Optional[object] = None


@dataclass
class PreparedSubject:
    """A validated subject: RGB image on white outside the mask, cropped square around the subject."""

    image: Image.Image  # RGB, segmented (white outside the mask), square crop
    mask: np.ndarray  # bool, same size as ``image``
    name: str
    scale: float
    reference_scale: float
    mask_source: str = field(default="given")  # "given", "alpha", "whole-image" or a segmenter's name
    region: Optional[object] = None  # a box of fractions or a bool mask (anystory.regions), None = anywhere


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


def as_subject_list(subjects) -> list:
    """``subjects`` as a list of :class:`Subject`: one Subject, image, array or path is one subject (as diffusers
    takes a single ``ip_adapter_image``), and a list may mix Subjects with bare images."""
    if subjects is None:
        return []
    if isinstance(subjects, (Subject, Image.Image, np.ndarray, str, os.PathLike)):
        subjects = [subjects]
    try:
        items = list(subjects)
    except TypeError:
        raise InvalidInputError(f"subjects: expected a Subject, an image, a path or a list of them, got "
                         f"{type(subjects).__name__}") from None
    out = []
    for i, s in enumerate(items):
        if isinstance(s, (Image.Image, np.ndarray, str, os.PathLike)):
            s = Subject(s)
        elif not isinstance(s, Subject):
            raise InvalidInputError(f"subject {i}: expected anystory.Subject, a PIL image, an array or a file path, got "
                             f"{type(s).__name__}")
        out.append(s)
    return out


def prepare_subjects(
    subjects,
    max_subjects: int = MAX_SUBJECTS,
    segmenter: Optional[Segmenter] = None,
    expand: float = 1.04,
) -> list:
    """Validate every subject and return :class:`PreparedSubject` objects; raise ``InvalidInputError`` naming the
    problem.

    ``subjects``: a list of :class:`Subject` (or of images / paths), or a single one (see :func:`as_subject_list`).
    Images and masks are read by :mod:`anystory.images`' one rule.
    """
    subjects = as_subject_list(subjects)
    if len(subjects) > max_subjects:
        raise InvalidInputError(f"Too many subjects: got {len(subjects)}, the maximum is {max_subjects}.")
    segmenter = segmenter or AlphaOrWholeImageSegmenter()
    out = []
    for i, s in enumerate(subjects):
        label = f"subject {i}" + (f" ({s.name})" if isinstance(s.name, str) and s.name else "")
        scale = check_number(s.scale, f"{label}: scale", 0.0, MAX_SCALE)
        ref_scale = check_number(s.reference_scale, f"{label}: reference_scale", 0.0, MAX_SCALE)
        raw = read_image(s.image, f"{label} image")
        if s.mask is not None:
            mask = read_mask(s.mask, f"{label} mask")
            if mask.shape != (raw.height, raw.width):
                h, w = mask.shape
                raise InvalidInputError(
                    f"{label}: mask size {w}x{h} does not match image size {raw.width}x{raw.height}; "
                    "masks are not resized (a stretched mask would misplace the subject)."
                )
            source = "given"
        else:
            mask = np.asarray(segmenter(raw), dtype=bool)
            source = getattr(segmenter, "last_source", None) or segmenter.name
            if mask.shape != (raw.height, raw.width):
                raise ValueError(f"{label}: segmenter {segmenter.name} returned a mask of shape {mask.shape}")
        if not mask.any():
            raise InvalidInputError(f"{label}: mask is empty (all background); it must mark the subject.")
        seg, seg_mask = segment_and_crop(to_rgb(raw), mask, expand)
        out.append(PreparedSubject(seg, seg_mask, s.name, scale, ref_scale, source,
                                   region=check_region(getattr(s, "region", None), label)))
    return out
