"""Batches for every stage, drawn from the synthetic world by step index (so resuming replays the same data).

References go through exactly what inference does - ``prepare_subjects`` (alpha channel = mask, square crop on
white) and ``pipe.subject_tensors`` - so the encoder is trained on what it will be given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import Sample, SyntheticWorld, WorldConfig
from ..subjects import Subject, prepare_subjects

#: Each stage draws from its own stream of world indices, far apart.
STREAM = {"vae": 0, "clip": 1, "base": 2, "stage1": 3, "stage2": 4, "heldout": 9}


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


def choose_captions(scenes, rng: np.random.Generator, generic: float, drop: float) -> tuple:
    """(captions, dropped): a scene's full caption, its generic one ("two objects on sand") or, for classifier-free
    guidance, nothing (the pipeline then uses zero embeddings, as SDXL does for an empty negative prompt)."""
    captions, dropped = [], []
    for s in scenes:
        u = rng.random()
        dropped.append(u < drop)
        captions.append("" if u < drop else (s.generic_caption if u < drop + generic else s.caption))
    return captions, torch.tensor(dropped)


def subject_count(rng: np.random.Generator, weights: Sequence[float]) -> int:
    p = np.asarray(weights, dtype=np.float64)
    return int(rng.choice(len(p), p=p / p.sum())) + 1


@dataclass
class SubjectBatch:
    samples: List[Sample]
    tensors: dict  # pixels [B, N, 3, R, R], masks [B, N, 1, R, R], clip_pixels [B, N+1, 3, r, r]
    targets: torch.Tensor  # [B, N+1, H, W] one-hot routing ground truth at image resolution


def subject_batch(pipe, world: SyntheticWorld, stage: str, step: int, batch: int, count: int, device,
                  dtype=torch.float32) -> SubjectBatch:
    samples = [world.sample(i, count=count) for i in indices(stage, step, batch)]
    parts = []
    for s in samples:
        prepared = prepare_subjects([Subject(r.image, name=r.identity.name) for r in s.references], pipe.max_subjects,
                                    pipe.segmenter)
        parts.append(pipe.subject_tensors(prepared, device, dtype))
    tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    targets = torch.from_numpy(np.stack([s.scene.routing_target() for s in samples])).to(device)
    return SubjectBatch(samples, tensors, targets)


def area_targets(targets: torch.Tensor, hw) -> torch.Tensor:
    """Ground-truth maps at a layer's resolution: the fraction of each cell that each class covers."""
    return F.adaptive_avg_pool2d(targets.float(), tuple(hw))
