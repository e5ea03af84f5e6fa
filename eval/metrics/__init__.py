"""Metrics behind one interface (:class:`~eval.metrics.base.Metric`), built from the run's settings."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .base import BatchContext, Embedder, EmbeddingMetric, Metric, MetricUnavailable, ScoreItem
from .clip_image import ClipImageMetric
from .clip_text import ClipTextMetric
from .colour import ColourMetric
from .copy_paste import CopyPasteMetric
from .dino import DEFAULT_DINO_MODEL, DinoEmbedder, DinoMetric
from .face_id import FaceIdMetric, face_embedder
from ..protocols import dino_model_name
from .openclip_embedder import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, OpenClipEmbedder

METRIC_NAMES = ("clip_i", "clip_t", "dino", "face_id", "copy_paste", "colour")
#: Computed only when asked for by name (``--metrics``): colour needs no weights but sees only the palette.
OPT_IN_METRICS = ("colour",)
COPY_PASTE_BASES = ("dino", "clip_i", "face_id")


@dataclass
class MetricSettings:
    names: Optional[Sequence[str]] = None  # None: every metric but the opt-in ones (a bench's own: eval.run)
    clip_model: str = DEFAULT_CLIP_MODEL
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED
    dino_model: str = DEFAULT_DINO_MODEL
    face_backend: str = "auto"
    clip_activation: str = "auto"
    device: str = "cpu"
    weights_dir: Optional[str] = None
    batch_size: int = 16


def build_metrics(s: MetricSettings) -> List[Metric]:
    """The requested metrics (not loaded yet); copy-paste gets one column per fidelity metric it can build on."""
    if s.names is None:
        s = replace(s, names=tuple(n for n in METRIC_NAMES if n not in OPT_IN_METRICS))
    unknown = sorted(set(s.names) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRIC_NAMES)}")
    metrics: List[Metric] = []
    clip = None
    if {"clip_i", "clip_t"} & set(s.names):
        clip = OpenClipEmbedder(s.clip_model, s.clip_pretrained, s.device, s.weights_dir, s.batch_size,
                                s.clip_activation)
    by_name: Dict[str, EmbeddingMetric] = {}
    if "clip_i" in s.names:
        by_name["clip_i"] = ClipImageMetric(clip, s.batch_size)
    if "dino" in s.names:
        dino = DinoEmbedder(dino_model_name(s.dino_model), True, s.device, s.weights_dir, s.batch_size)
        by_name["dino"] = DinoMetric(dino, s.batch_size)
    if "face_id" in s.names:
        embedder, note = face_embedder(s.face_backend, s.weights_dir, s.device)
        by_name["face_id"] = FaceIdMetric(embedder, s.batch_size, note)
    for name in ("clip_i", "dino", "face_id"):
        if name in by_name:
            metrics.append(by_name[name])
    if "clip_t" in s.names:
        metrics.append(ClipTextMetric(clip))
    if "copy_paste" in s.names:
        metrics += [CopyPasteMetric(by_name[b]) for b in COPY_PASTE_BASES if b in by_name]
    if "colour" in s.names:
        metrics.append(ColourMetric(batch_size=s.batch_size))
    return metrics


def load_metrics(metrics: Sequence[Metric]) -> Tuple[List[Metric], Dict[str, str]]:
    """Load each metric; ``(usable, {name: reason})`` - one that cannot load is reported, the others still run."""
    usable, unavailable = [], {}
    for m in metrics:
        try:
            m.load()
        except MetricUnavailable as e:
            unavailable[m.name] = str(e)
        else:
            usable.append(m)
    return usable, unavailable


def what_to_do(metrics: Sequence[Metric], unavailable: Dict[str, str]) -> str:
    """One line for the metrics that could not load: what to install, which file to put where (each once)."""
    fixes = [m.remedy() or f"{m.name}: {unavailable[m.name]}" for m in metrics if m.name in unavailable]
    return "; ".join(dict.fromkeys(fixes))


__all__ = ["BatchContext", "ClipImageMetric", "ClipTextMetric", "ColourMetric", "CopyPasteMetric", "DinoEmbedder",
           "DinoMetric", "Embedder", "EmbeddingMetric", "FaceIdMetric", "METRIC_NAMES", "Metric", "MetricSettings",
           "MetricUnavailable", "OPT_IN_METRICS", "OpenClipEmbedder", "ScoreItem", "build_metrics", "face_embedder",
           "load_metrics", "what_to_do"]
