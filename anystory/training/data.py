"""Batches for every stage, drawn by step index (so resuming replays the same data).

Stages 1-2 read a *source*: the synthetic world in memory (default), or a dataset on disk or in object storage
(``data.stage1`` / ``data.stage2`` in the config; layout in :mod:`anystory.data.formats`). Step ``k`` of a
stage with global batch ``G`` reads positions ``k*G .. k*G+G-1`` among the samples with the step's subject
count (modulo their number); each process decodes only its own rows. References go through exactly what
inference does - ``prepare_subjects`` (mask or alpha channel, square crop on white) and ``pipe.subject_tensors``
- so the encoder is trained on what it will be given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.formats import Dataset, Record
from ..data.synthetic import Sample, SyntheticWorld, WorldConfig
from ..subjects import Subject, prepare_subjects

#: Each stage draws from its own stream of world indices, far apart.
STREAM = {"vae": 0, "clip": 1, "base": 2, "stage1": 3, "stage2": 4, "background": 5, "flux_base": 6, "heldout": 9}


def world_for(cfg: dict, split: str = "train") -> SyntheticWorld:
    """The training world, or the held-out world (another seed) that the routing study measures on."""
    seed = int(cfg["seed"]) + (7919 if split == "heldout" else 0)
    return SyntheticWorld(seed, WorldConfig(**cfg["world"]))


def indices(stage: str, step: int, batch: int) -> List[int]:
    start = STREAM[stage] * 10_000_000 + step * batch
    return list(range(start, start + batch))


def images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images -> ``[B, 3, H, W]`` in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def choose_captions(scenes, draws: Sequence[float], generic: float, drop: float) -> tuple:
    """(captions, dropped): a scene's full caption, its generic one ("two objects on sand") or, for classifier-free
    guidance, nothing (the pipeline then uses zero embeddings, as SDXL does for an empty negative prompt).
    ``draws``: one uniform number per scene (drawn for the whole global batch, so every process agrees)."""
    captions, dropped = [], []
    for s, u in zip(scenes, draws):
        dropped.append(u < drop)
        captions.append("" if u < drop else (s.generic_caption if u < drop + generic else s.caption))
    return captions, torch.tensor(dropped)


def subject_count(rng: np.random.Generator, weights: Sequence[float]) -> int:
    p = np.asarray(weights, dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum())) + 1


def record_from_sample(sample: Sample, key: str = "") -> Record:
    scene = sample.scene
    return Record(key, scene.image, scene.masks, scene.caption, scene.generic_caption,
                  [Subject(r.image, name=r.identity.name) for r in sample.references])


class SyntheticSource:
    """The synthetic world as a source: position ``p`` of a stage is world index ``STREAM[stage] * 10^7 + p``."""

    def __init__(self, world: SyntheticWorld):
        self.world = world

    @staticmethod
    def index(stage: str, position: int) -> int:
        return STREAM[stage] * 10_000_000 + position

    def sample(self, stage: str, position: int, count: int) -> Sample:
        return self.world.sample(self.index(stage, position), count=count)

    def record(self, stage: str, position: int, count: int) -> Record:
        return record_from_sample(self.sample(stage, position, count))


class DatasetSource:
    """A dataset in the layout of :mod:`anystory.data.formats` (folder, tar or parquet shards, any fsspec URL)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def record(self, stage: str, position: int, count: int) -> Record:
        return self.dataset.record_with(count, position)


def source_for(cfg: dict, stage: str, split: str = "train"):
    """Where ``stage`` reads its samples: ``data.<stage>`` (``data.heldout`` for ``split="heldout"``) when set,
    else the synthetic world. Returns ``None`` for a held-out split of real data with no ``data.heldout``."""
    data = cfg.get("data") or {}
    path = data.get("heldout" if split == "heldout" else stage)
    if path:
        return DatasetSource(Dataset.open(str(path), resolution=data.get("resolution")))
    if split == "heldout" and any(data.get(s) for s in ("stage1", "stage2")):
        return None
    return SyntheticSource(world_for(cfg, split))


@dataclass
class SubjectBatch:
    samples: List[Record]
    tensors: dict  # pixels [B, N, 3, R, R], masks [B, N, 1, R, R], clip_pixels [B, N+1, 3, r, r]
    targets: torch.Tensor  # [B, N+1, H, W] one-hot routing ground truth at image resolution


def subject_batch(pipe, source, stage: str, step: int, batch: int, count: int, device,
                  dtype=torch.float32, rows: Optional[slice] = None) -> SubjectBatch:
    """Rows ``rows`` (default: all) of step ``step``'s global batch of ``batch`` samples with ``count`` subjects."""
    positions = range(step * batch, (step + 1) * batch)[rows or slice(None)]
    return records_batch(pipe, [source.record(stage, p, count) for p in positions], device, dtype)


def records_batch(pipe, samples: Sequence[Record], device, dtype=torch.float32) -> SubjectBatch:
    """The batch of these records: their references through inference's preparation, and routing targets."""
    parts = []
    for s in samples:
        prepared = prepare_subjects(s.references, pipe.max_subjects, pipe.segmenter)
        parts.append(pipe.subject_tensors(prepared, device, dtype))
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    targets = torch.from_numpy(np.stack([s.routing_target() for s in samples])).to(device)
    return SubjectBatch(samples, tensors, targets)


def area_targets(targets: torch.Tensor, hw) -> torch.Tensor:
    """Ground-truth maps at a layer's resolution: the fraction of each cell that each class covers."""
    return F.adaptive_avg_pool2d(targets.float(), tuple(hw))
