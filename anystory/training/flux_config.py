"""The FLUX stages' configuration: the typed sections :class:`~anystory.training.config.TrainingConfig` takes in,
and the stage names.

``backbone: flux`` in a training config runs :data:`FLUX_STAGES` instead of the SDXL stages (``configs/flux.yaml``,
``configs/flux_tiny.yaml``). ``train`` lists what a stage trains (:data:`PARTS`); everything else stays frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ..hub import FLUX_BASE, FLUX_REDUX
from .typed_config import Section, StageConfig, section

FLUX_STAGES = ("flux_base", "flux_subject", "flux_router")
#: the stages that train the release's weights (``anystory_flux.bin``); ``flux_base`` trains the tiny base model
RELEASE_STAGES = FLUX_STAGES[1:]

#: trainable parts of the released weights; "router" names its three parts at once
PARTS = ("ref", "redux", "router_lora", "router_embedder", "routing_map")
ALIASES = {"router": ("router_lora", "router_embedder", "routing_map")}


@dataclass
class FluxModelConfig(Section):
    """``flux``: the model the FLUX stages train on."""

    base: str = FLUX_BASE  # a diffusers folder / hub id, or "tiny" (built in code, tests)
    redux: str = FLUX_REDUX  # SigLIP and the Redux projection the release builds on
    init_from: Optional[str] = None  # a released anystory_flux.bin (file, folder or hub id) to fine-tune
    rank: int = 128  # the release's rank (fresh start only; a loaded file keeps its own)
    lora_bias: bool = False  # fresh start: lora_B biases on the two transformer LoRAs
    dtype: str = "float32"  # the whole pipeline's dtype ("bfloat16" at full size; trained weights stay float32)
    save_dtype: str = "float32"
    max_sequence_length: int = 512
    reference_size: int = 512  # the release's reference resolution (base "tiny": its own, 32)
    single_blocks: int = 2  # base "tiny" only: single blocks of the tiny transformer


@dataclass
class FluxBaseConfig(StageConfig):
    """``flux_base``: the tiny FLUX base learns the synthetic world from its captions before the subject stages
    (the SDXL miniature's ``base``). Off by default (steps 0): FLUX.1-dev comes trained."""

    steps: int = 0
    batch_size: int = 8
    lr: float = 1e-3
    ema: float = 0.99
    guidance: float = 3.5  # the guidance embedding's input while the base learns (the subject stages' value)
    generic_caption: float = 0.15
    drop_text: float = 0.1
    object_weight: float = 0.0  # image tokens weigh 1 + object_weight x (their share of subject pixels)
    heldout_batches: int = 4


@dataclass
class FluxStageConfig(StageConfig):
    """``flux_subject`` / ``flux_router``: one FLUX stage (the loop's keys, the step's and what it trains)."""

    subjects: List[float] = field(default_factory=lambda: [0.6, 0.3, 0.1])  # weights of 1, 2, ... subjects
    train: List[str] = field(default_factory=lambda: ["ref", "redux"])  # PARTS / ALIASES
    routing_weight: float = 0.0
    object_weight: float = 0.0  # image tokens weigh 1 + object_weight x (their share of subject pixels)
    redux_scale: float = 1.0
    guidance: float = 3.5
    generic_caption: float = 0.3
    drop_text: float = 0.1
    heldout_batches: int = 4  # held-out batches of 4 measured before and after the stage


#: the subject path: reference LoRA and Redux projection; one subject mostly, several routed by the masks
FLUX_SUBJECT = section(FluxStageConfig)
#: the router: its LoRA, token embedder and routing-map projections; several subjects, routed by the router
FLUX_ROUTER = section(FluxStageConfig, subjects=[0.0, 0.6, 0.4], train=["router"], routing_weight=1.0)


def trained_parts(names) -> tuple:
    """The config's ``train`` list, aliases expanded; unknown names are an error naming the known ones."""
    out = []
    for name in names or ():
        for part in ALIASES.get(name, (name,)):
            if part not in PARTS:
                raise ValueError(f"unknown trainable part {name!r}; choose from {', '.join(PARTS + tuple(ALIASES))}")
            if part not in out:
                out.append(part)
    return tuple(out)
