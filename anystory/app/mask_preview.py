"""The mask a subject will be generated with, shown before generating: where it comes from and what it covers.

A subject's mask is resolved exactly as a run resolves it (:func:`anystory.app.inputs.collect_subjects`: an
uploaded mask, else strokes drawn in the editor, else automatic matting: BiRefNet, the alpha channel or the whole
image), so what the preview shows is what the pipeline will receive. The picture keeps the subject and fades the
rest to a light checkerboard, the usual "cut-out" look of image editors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from PIL import Image

from .inputs import SubjectSlot, collect_subjects
from ..subjects import to_rgb


def cutout(image: Image.Image, mask: np.ndarray, cell: int = 8) -> Image.Image:
    """``image`` inside ``mask``; outside it a faded checkerboard so the mask's edge is plain to see."""
    rgb = np.asarray(to_rgb(image), dtype=np.float32)  # a cut-out's transparent area on white
    m = np.asarray(mask, dtype=bool)
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask {m.shape[::-1]} and image {rgb.shape[1::-1]} differ in size")
    cell = max(2, min(rgb.shape[:2]) // 16 or cell)
    ys, xs = np.indices(m.shape) // cell
    checker = np.where(((ys + xs) % 2 == 0)[..., None], 235.0, 205.0)
    faded = 0.25 * rgb + 0.75 * checker
    return Image.fromarray(np.where(m[..., None], rgb, faded).round().astype(np.uint8))


def preview(slot: SubjectSlot, segmenter, index: int = 0) -> Tuple[Optional[Image.Image], str]:
    """(cut-out picture, one line naming the mask's source and coverage) for subject slot ``index`` (0-based);
    (None, "") when the slot has no image. Bad input raises :class:`~anystory.app.inputs.InputError` with the
    run's own message."""
    if slot.image is None:
        return None, ""
    (subject,), (source,) = collect_subjects([SubjectSlot()] * index + [slot], index + 1, segmenter)
    mask = np.asarray(subject.mask, dtype=bool)
    where = source.split(": ", 1)[-1]
    note = f"Mask: {where}, {100 * mask.mean():.0f}% of the image."
    if where.startswith("automatic"):
        note += " Upload or draw a mask to replace it."
    return cutout(subject.image, mask), note
