"""Colour: how alike the colours of an output and the subject's photos are, with no model weights at all.

Embedding = the square root of the image's joint RGB histogram (8 bins per channel, 512 cells, normalised to sum
1), L2-normalised; the cosine of two such vectors is the Bhattacharyya coefficient of the two colour
distributions (1 = the same colours in the same proportions, 0 = no colour in common). Columns as every fidelity
metric: ``colour`` (mean over the comparison set) and ``colour_ref`` (the reference alone).

Why it exists: DINO and CLIP need weights from the hub; this needs none, so a machine with no network and no
weights still scores a run (the README's offline quickstart). It is a weak signal: it sees palette, not shape or
identity (a red car and a red apple match), and the whole picture's background counts. It is opt-in
(``--metrics colour``), never a default, and its numbers are not comparable with DINO or CLIP-I.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from PIL import Image

from .base import Embedder, EmbeddingMetric

BINS = 8
#: Images are binned at this long side: the histogram barely moves, the cost stays small for large photos.
SIDE = 256


def colour_histogram(image: Image.Image, bins: int = BINS) -> np.ndarray:
    """The image's joint RGB histogram, ``bins`` per channel, as fractions of its pixels: ``[bins ** 3]``."""
    rgb = image.convert("RGB")
    rgb.thumbnail((SIDE, SIDE), Image.BILINEAR)
    cells = np.asarray(rgb, dtype=np.int64).reshape(-1, 3) * bins // 256
    index = (cells[:, 0] * bins + cells[:, 1]) * bins + cells[:, 2]
    return np.bincount(index, minlength=bins ** 3).astype(np.float64) / len(index)


class ColourHistogramEmbedder(Embedder):
    key = "colour_hist"

    def __init__(self, bins: int = BINS):
        self.bins = bins
        self.key = f"colour_hist:{bins}"

    def load(self) -> None:
        """Nothing to load."""

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        rows = [np.sqrt(colour_histogram(im, self.bins)) for im in images]
        return np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.bins ** 3), np.float32)

    def describe(self) -> Dict[str, str]:
        return {"model": f"RGB histogram, {self.bins}^3 bins, Bhattacharyya coefficient", "label": "colour",
                "weights": "none"}


class ColourMetric(EmbeddingMetric):
    def __init__(self, bins: int = BINS, batch_size: int = 16):
        super().__init__("colour", ColourHistogramEmbedder(bins), batch_size)

    def describe(self) -> Dict[str, str]:
        return dict(super().describe(), definition="Bhattacharyya coefficient of the joint RGB histograms of the "
                                                   "output and the subject's photos (palette only, no weights)")
