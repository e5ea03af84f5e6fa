"""CLIP-I: subject fidelity as cosine of CLIP image embeddings (output vs the subject's real photos)."""
from __future__ import annotations

from .base import EmbeddingMetric
from .openclip_embedder import OpenClipEmbedder


class ClipImageMetric(EmbeddingMetric):
    def __init__(self, embedder: OpenClipEmbedder, batch_size: int = 16):
        super().__init__("clip_i", embedder, batch_size)
