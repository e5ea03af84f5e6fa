"""CLIP-T: prompt fidelity as cosine between the CLIP text embedding of the prompt and the whole output.

Raw cosine (not x100, not x2.5), as DreamBooth reports it; the prompt is the zero-shot prompt the method was
given. Always the whole image, also for multi-subject entries (the prompt describes the whole scene).
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

from .base import BatchContext, Metric, ScoreItem
from .openclip_embedder import OpenClipEmbedder


class ClipTextMetric(Metric):
    name = "clip_t"

    def __init__(self, embedder: OpenClipEmbedder):
        self.embedder = embedder

    @property
    def columns(self) -> List[str]:
        return [self.name]

    def load(self) -> None:
        self.embedder.load()

    def remedy(self) -> str:
        return self.embedder.remedy

    def describe(self) -> Dict[str, str]:
        return dict(self.embedder.describe(), metric=self.name, protocol="cosine(prompt, whole image)")

    def score(self, items: Sequence[ScoreItem], ctx: BatchContext) -> List[Dict[str, object]]:
        images = ctx.embed(self.embedder, [it.full_image for it in items])
        texts = self.embedder.embed_texts([it.prompt for it in items])
        return [{self.name: math.nan if v is None else float(v.astype("float64") @ t.astype("float64"))}
                for v, t in zip(images, texts)]
