"""Copy-paste score: how much closer an output is to the *reference photo* than to the subject itself.

    copy_paste_<base> = cos(output, reference) - mean_{p in other real photos} cos(output, p)

with embeddings of a subject-fidelity metric (``base``: DINO, CLIP-I or face-ID). The other real photos are the
subject's photos except the reference (and except the scored photo itself for the real-images oracle).

Reading it: a method that renders the subject anew (new pose, light, background) sits near 0, as another real
photo of the subject does (the ``real-images`` row); one that pastes the reference sits high, up to
``1 - mean cos(reference, other photos)`` for the reference returned unchanged (the ``copy-reference`` row).
Fidelity metrics reward both behaviours alike; this one separates them. NaN when the subject has no other photo.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from .base import BatchContext, EmbeddingMetric, Metric, ScoreItem, nanmean_or_nan


class CopyPasteMetric(Metric):
    def __init__(self, base: EmbeddingMetric):
        self.base = base
        self.name = f"copy_paste_{base.name}"

    @property
    def columns(self) -> List[str]:
        return [self.name]

    def load(self) -> None:
        self.base.load()

    def remedy(self) -> str:
        return self.base.remedy()

    def describe(self) -> Dict[str, str]:
        return dict(self.base.describe(), metric=self.name,
                    definition=f"cos(out, reference) - mean cos(out, other real photos), {self.base.name} embeddings")

    def score(self, items: Sequence[ScoreItem], ctx: BatchContext) -> List[Dict[str, object]]:
        rows = []
        for item, vector in zip(items, ctx.embed(self.base.embedder, [it.image for it in items])):
            others = item.other_photos()
            to_ref = self.base.similarities(vector, [item.subject.reference])[0]
            to_others = nanmean_or_nan(self.base.similarities(vector, others))
            rows.append({self.name: float(to_ref - to_others)})
        return rows
