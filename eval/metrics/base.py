"""The one interface every metric implements, and the shared machinery for embedding metrics.

A :class:`Metric` scores a batch of :class:`ScoreItem` (an image region, its prompt and its subject) and
returns one dict of columns per item. Embedding metrics (CLIP-I, DINO, face-ID) sit on an :class:`Embedder`;
real photos are embedded once per run and cached, and a batch's generated images are embedded once per
embedder even when several metrics use them (CLIP-I and CLIP-T share one CLIP), through :class:`BatchContext`.

A metric whose model cannot be loaded raises :class:`MetricUnavailable` from ``load()``: the harness reports
it as not computed, with the reason, and runs the others. Nothing is ever scored by a stand-in model.
"""
from __future__ import annotations

import abc
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from anystory.errors import MetricUnavailable
from anystory.images import read_rgb

from ..loaders.base import SubjectRef

RANDOM_INIT = "RANDOM INIT (test-only; scores are meaningless)"


def load_rgb(path: str) -> Image.Image:
    """An image file as RGB by the project's one image rule (EXIF orientation first, transparency on white)."""
    return read_rgb(path, os.path.basename(path))


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (x / norm).astype(np.float32)


@dataclass
class ScoreItem:
    """One scored unit: ``image`` is the subject's region (the whole image when no region is known),
    ``full_image`` the whole output (for text alignment). Either is ``None`` when the file was unreadable.
    ``exclude`` names a real photo that must not count in any comparison (the real-images oracle: a photo
    is never compared with itself). ``comparison`` is the protocol's comparison set (``eval.protocols``);
    without one, every real photo of the subject (DreamBooth)."""

    image: Optional[Image.Image]
    full_image: Optional[Image.Image]
    prompt: str
    subject: SubjectRef
    exclude: Optional[str] = None
    comparison: Optional[Sequence[str]] = None

    def comparison_set(self) -> List[str]:
        photos = self.subject.real_photos if self.comparison is None else self.comparison
        return [p for p in photos if p != self.exclude]

    def other_photos(self) -> List[str]:
        """The subject's real photos except the reference and the excluded photo (copy-paste's set)."""
        return [p for p in self.subject.other_photos if p != self.exclude]


class Embedder(abc.ABC):
    """Images -> L2-normalised float32 rows; a row is NaN where the image has nothing to embed (no face).
    ``remedy``: after a failed ``load()``, the one thing to do about it (what to install, which file to put where)."""

    key: str = ""
    remedy: str = ""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model; raise :class:`MetricUnavailable` with the reason when it cannot be had."""

    @abc.abstractmethod
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        ...

    @abc.abstractmethod
    def describe(self) -> Dict[str, str]:
        """``model`` (architecture), ``weights`` (hub id / path / RANDOM_INIT) and anything else worth recording."""


class BatchContext:
    """Per-batch memo: each embedder sees each image once, whichever metrics ask for it."""

    def __init__(self):
        self._memo: Dict[tuple, np.ndarray] = {}

    def embed(self, embedder: Embedder, images: Sequence[Optional[Image.Image]]) -> List[Optional[np.ndarray]]:
        todo = [im for im in images if im is not None and (embedder.key, id(im)) not in self._memo]
        unique = list({id(im): im for im in todo}.values())
        if unique:
            vectors = embedder.embed_images(unique)
            for im, v in zip(unique, vectors):
                self._memo[embedder.key, id(im)] = v
        return [None if im is None else self._memo[embedder.key, id(im)] for im in images]


class Metric(abc.ABC):
    name: str = ""

    @property
    @abc.abstractmethod
    def columns(self) -> List[str]:
        ...

    @abc.abstractmethod
    def load(self) -> None:
        ...

    @abc.abstractmethod
    def describe(self) -> Dict[str, str]:
        ...

    @abc.abstractmethod
    def score(self, items: Sequence[ScoreItem], ctx: BatchContext) -> List[Dict[str, object]]:
        ...

    def remedy(self) -> str:
        """After a failed ``load()``: what to install or which file to put where ("" when unknown)."""
        return ""


class PhotoCache:
    """Embeddings of real photos (references and comparison sets), computed once per run per embedder."""

    def __init__(self, embedder: Embedder, batch_size: int = 16):
        self.embedder, self.batch_size = embedder, batch_size
        self._vectors: Dict[str, np.ndarray] = {}
        self.unreadable: Dict[str, str] = {}

    def get(self, paths: Sequence[str]) -> np.ndarray:
        missing = [p for p in dict.fromkeys(paths) if p not in self._vectors]
        for start in range(0, len(missing), self.batch_size):
            chunk, images = missing[start:start + self.batch_size], []
            for p in chunk:
                try:
                    images.append(load_rgb(p))
                except Exception as e:  # a broken photo is reported, the rest still count
                    self.unreadable[p] = f"{type(e).__name__}: {e}"
                    warnings.warn(f"real photo unreadable, left out of comparisons: {p} ({e})")
                    images.append(None)
            readable = [im for im in images if im is not None]
            vectors = iter(self.embedder.embed_images(readable) if readable else [])
            for p, im in zip(chunk, images):
                self._vectors[p] = next(vectors) if im is not None else None
        dim = next((v.shape[-1] for v in self._vectors.values() if v is not None), 1)
        nan = np.full(dim, np.nan, np.float32)
        return np.stack([nan if self._vectors[p] is None else self._vectors[p] for p in paths]) if paths else \
            np.zeros((0, dim), np.float32)


def nanmean_or_nan(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


class EmbeddingMetric(Metric):
    """Subject fidelity by embedding similarity.

    ``<name>``: mean cosine between the output and the protocol's comparison set (DreamBooth: every real photo
    of the subject, the reference included, as published; the photo itself excluded for the real-images
    oracle). ``<name>_ref``: cosine to the reference photo alone.
    """

    def __init__(self, name: str, embedder: Embedder, batch_size: int = 16):
        self.name, self.embedder = name, embedder
        self.photos = PhotoCache(embedder, batch_size)

    @property
    def columns(self) -> List[str]:
        return [self.name, f"{self.name}_ref"]

    def load(self) -> None:
        self.embedder.load()

    def remedy(self) -> str:
        return self.embedder.remedy

    def describe(self) -> Dict[str, str]:
        return dict(self.embedder.describe(), metric=self.name)

    def similarities(self, vector: Optional[np.ndarray], paths: Sequence[str]) -> np.ndarray:
        if vector is None or not len(paths):
            return np.full(len(paths), np.nan)
        return self.photos.get(paths).astype(np.float64) @ vector.astype(np.float64)

    def score(self, items: Sequence[ScoreItem], ctx: BatchContext) -> List[Dict[str, object]]:
        rows = []
        for item, vector in zip(items, ctx.embed(self.embedder, [it.image for it in items])):
            rows.append({
                self.name: nanmean_or_nan(self.similarities(vector, item.comparison_set())),
                f"{self.name}_ref": float(self.similarities(vector, [item.subject.reference])[0]),
            })
        return rows
