"""Find the subjects in an image of the synthetic world (rendered or *generated*) without any model.

The world is built so this is easy and checkable: backgrounds are desaturated, every subject colour (both tones
of its texture) is strongly saturated. So a pixel belongs to an object when its chroma (max - min over RGB) is
high; objects are the connected components of that mask. The routing study uses it to locate what a model
actually drew, so that colour leakage and identity can be measured on generated images.
"""
from __future__ import annotations

from typing import List

import numpy as np
from scipy import ndimage

#: Chroma threshold: above every background's (<= ~55 with noise), below every subject tone (>= ~80).
CHROMA_THRESHOLD = 65.0


def chroma(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image, dtype=np.float32)[..., :3]
    return arr.max(axis=-1) - arr.min(axis=-1)


def foreground_mask(image: np.ndarray, threshold: float = CHROMA_THRESHOLD) -> np.ndarray:
    """Boolean ``[H, W]``: saturated pixels, with specks removed and holes filled."""
    fg = chroma(image) > threshold
    fg = ndimage.binary_opening(fg, structure=np.ones((2, 2), bool))
    return ndimage.binary_fill_holes(fg)


def find_objects(image: np.ndarray, min_area: int = 12, threshold: float = CHROMA_THRESHOLD) -> List[np.ndarray]:
    """Connected saturated regions of at least ``min_area`` pixels, largest first, as boolean masks."""
    labels, count = ndimage.label(foreground_mask(image, threshold))
    if count == 0:
        return []
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, count + 1))
    order = [i + 1 for i in np.argsort(-areas) if areas[i] >= min_area]
    return [labels == k for k in order]
