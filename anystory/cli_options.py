"""The command-line options several commands share, declared once: a flag means the same thing, takes the same
values and says the same in ``--help`` in the CLI, the demo, eval, the benchmarks and the training tools.

Each ``add_*`` adds one group to a parser; a command keeps only its own defaults (a benchmark that needs a GPU
defaults ``--device`` to ``cuda``). Per-model numbers come from :mod:`anystory.presets`.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .presets import MINIATURE, PRESETS

DEVICES = ("cpu", "cuda")
SHAPES = ("tiny", "real")


_NAMES = {"flux": "FLUX", "sdxl": "SDXL", "miniature": "the miniature"}


def _by_model(field: str, fmt: str = "{}") -> str:
    """``25 for FLUX, 30 for SDXL, 20 for the miniature``: a preset field per model, for ``--help``."""
    return ", ".join(f"{fmt.format(getattr(PRESETS[kind], field))} for {name}" for kind, name in _NAMES.items())


def add_device(p: argparse.ArgumentParser, default: Optional[str] = None,
               choices: Optional[Sequence[str]] = None) -> None:
    """``--device``: the torch device; ``default`` None: CUDA when torch finds a GPU, else the CPU."""
    if default is None:
        import torch

        default = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default, choices=list(choices) if choices else None, help="torch device")


def add_vram(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--vram``: the FLUX memory preset (``anystory/flux/low_vram.py``)."""
    from .flux.low_vram import VRAM

    p.add_argument("--vram", default=default, choices=VRAM,
                   help="FLUX GPU memory preset: 40 bf16 on the GPU, 24 8-bit + model offload, 16 4-bit + model "
                        "offload; auto: from the GPU's memory (the choice is shown)")


def add_weights(p: argparse.ArgumentParser, default: Optional[str] = None, backbones: str = "SDXL",
                without: str = "") -> None:
    """``--anystory-weights`` and ``--base-model``: which AnyStory weights, on which base model; ``without``: what
    runs when no weights are given."""
    p.add_argument("--anystory-weights", default=default,
                   help=f"AnyStory {backbones} weights (folder or file)" + (f"; none: {without}" if without else ""))
    p.add_argument("--base-model", default=None, help=f"{backbones} base model, hub id or folder")


def add_generation(p: argparse.ArgumentParser) -> None:
    """``--steps``, ``--guidance``, ``--height``, ``--width`` of a pipeline call; None: the model's preset."""
    p.add_argument("--steps", type=int, default=None, help=f"denoising steps; None: {_by_model('steps')}")
    p.add_argument("--guidance", type=float, default=None,
                   help=f"CFG scale; None: {_by_model('guidance', '{:g}')}")
    size = f"{PRESETS['flux'].size} for FLUX, the native size of SDXL and the miniature"
    p.add_argument("--height", type=int, default=None, help=f"image height in pixels; None: {size}")
    p.add_argument("--width", type=int, default=None, help=f"image width in pixels; None: {size}")


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same result)")


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def add_miniature_sampling(p: argparse.ArgumentParser, required: bool = False) -> None:
    """The miniature studies' model and sampling: ``--model`` (a miniature folder), ``--classifier``, ``--steps``,
    ``--guidance`` (the miniature's preset) and ``--threads``."""
    if required:
        p.add_argument("--model", required=True, help="a miniature folder")
    else:
        p.add_argument("--model", default=None, help="miniature folder (default: assets/miniature)")
    p.add_argument("--classifier", default=None,
                   help="identity classifier weights (default: <model>/identity_classifier.safetensors)")
    p.add_argument("--steps", type=int, default=MINIATURE.steps, help="denoising steps (the miniature's preset)")
    p.add_argument("--guidance", type=float, default=MINIATURE.guidance, help="CFG scale (the miniature's preset)")
    add_threads(p)


def add_config(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """``--config``: a YAML training config; required unless the command has a ``default``."""
    p.add_argument("--config", default=default, required=default is None,
                   help="YAML training config, e.g. configs/miniature.yaml")


def add_shape(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--shape", default=default, choices=SHAPES,
                   help="tiny: the tiny test components (seconds on a CPU); real: the real models' shapes (random "
                        "weights)")


def add_subject_count(p: argparse.ArgumentParser, default: int = 2) -> None:
    p.add_argument("--subjects", type=int, default=default, help="subjects per call")


def add_shard_options(p: argparse.ArgumentParser) -> None:
    """``--format`` and ``--per-shard`` of a written dataset (``anystory/data/shards.py``)."""
    from .data.shards import FORMATS

    p.add_argument("--format", choices=FORMATS, default="tar", help="dataset format")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
