"""The shipped miniature AnyStory: SDXL-shaped, trained from scratch by us on the synthetic world, CPU-sized.

It lives in ``assets/miniature/`` as an ordinary diffusers folder plus our AnyStory weights, and is loaded by
the very calls that load real SDXL: ``AnyStorySDXLPipeline.from_pretrained`` + ``load_anystory_weights``.
Rebuild it from nothing with ``python -m anystory.training --config configs/miniature.yaml``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .pipeline_sdxl import AnyStorySDXLPipeline

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # anystory/sdxl/ -> repository
MINIATURE_DIR = os.path.join(_REPO, "assets", "miniature")
REQUIRED = ("model_index.json", "anystory.safetensors", "anystory_config.json")
REBUILD = "python -m anystory.training --config configs/miniature.yaml"


def missing_files(path: Optional[str] = None) -> list:
    path = path or MINIATURE_DIR
    return [f for f in REQUIRED if not os.path.isfile(os.path.join(path, f))]


def miniature_available(path: Optional[str] = None) -> bool:
    return not missing_files(path)


def load_miniature(device: str = "cpu", path: Optional[str] = None) -> AnyStorySDXLPipeline:
    """The miniature as an :class:`AnyStorySDXLPipeline` on ``device`` (float32), ready to call with subjects."""
    path = path or MINIATURE_DIR
    missing = missing_files(path)
    if missing:
        raise FileNotFoundError(f"The AnyStory miniature is not installed at {path} (missing: {', '.join(missing)}). "
                                f"Rebuild it with `{REBUILD}` (its time on a CPU: docs/experiments/miniature.md).")
    pipe = AnyStorySDXLPipeline.from_pretrained(path, dtype=torch.float32)
    pipe.load_anystory_weights(path)
    return pipe.to(device)
