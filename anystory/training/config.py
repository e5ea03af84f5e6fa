"""Training configuration: one YAML file describes every stage (see ``configs/miniature.yaml``).

:class:`TrainingConfig` is the typed form: a dataclass per stage and per top-level group, built from the YAML and
the ``--set`` overrides; a key that no dataclass declares, at any depth, and a value of the wrong type are errors
naming their full path. Each section also reads as a dict (``cfg["stage2"]["lr"]``, ``.get``; typed_config.py).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

import yaml

from ..presets import MINIATURE
from .flux_config import (FLUX_ROUTER, FLUX_STAGES, FLUX_SUBJECT, RELEASE_STAGES, FluxBaseConfig, FluxModelConfig,
                          FluxStageConfig)
from .typed_config import Section, StageConfig, build, merge, refuse_unknown, section

STAGES = ("vae", "clip", "base", "stage1", "stage2", "background", "export")


@dataclass
class DataConfig(Section):
    """Dataset folders / shards / URLs per stage (anystory/data/formats.py); None = the synthetic world."""

    stage1: Optional[str] = None
    stage2: Optional[str] = None
    heldout: Optional[str] = None
    resolution: Optional[int] = None


@dataclass
class ModelConfig(Section):
    """The miniature's architecture (``tiny_spec``: TinySpec's fields) and AnyStory's sizes (``anystory``: the
    SDXL adapter's constructor arguments); with ``base_model`` set only ``anystory`` and ``save_dtype`` apply."""

    tiny_spec: Dict[str, Any] = field(default_factory=dict)
    tokenizer_max_length: int = 77
    anystory: Dict[str, Any] = field(default_factory=dict)
    save_dtype: str = "float32"
    vae: Optional[Dict[str, Any]] = None  # AutoencoderKL config entries over the tiny VAE's (None: no mid attention)
    scheduler: Optional[Dict[str, Any]] = None  # EulerDiscreteScheduler config entries over the tiny one's


@dataclass
class VaeConfig(StageConfig):
    basis_images: int = 512  # images whose 4x4 patches give the PCA encoder (pca_encoder.py)
    whiten: float = 0.5
    object_weight: float = 0.0  # subject pixels weigh 1 + object_weight in the decoder's L1 (0: a plain L1)


@dataclass
class DiffusionStageConfig(StageConfig):
    """What the denoising stages share (``base``): caption drop-out and the Min-SNR loss weight."""

    drop_text: float = 0.1  # share of empty captions (classifier-free guidance)
    generic_caption: float = 0.15  # share of captions that name a subject's class, not its looks
    snr_gamma: float = 5.0


@dataclass
class BaseStageConfig(DiffusionStageConfig):
    """``base``: the text-to-image model; subjects can weigh more than the backdrop in its loss."""

    object_weight: float = 0.0  # latent cells weigh 1 + object_weight x (their share of subject pixels)


@dataclass
class SubjectStageConfig(DiffusionStageConfig):
    """What the stages with subjects share."""

    subjects: List[float] = field(default_factory=lambda: [0.5, 0.3, 0.2])  # weights of 1, 2, ... subjects
    drop_semantic: float = 0.1  # share of samples without the semantic tokens
    object_weight: float = 0.0  # latent cells weigh 1 + object_weight x (their share of subject pixels)


@dataclass
class Stage1Config(SubjectStageConfig):
    train_unet: bool = False  # also fine-tune the UNet; off in every shipped config (stage1.py says why)
    semantic_alignment: float = 0.0  # weight of the semantic tokens' pull toward their subject's name (subject_step.py)
    routing_dilation: int = 0  # pixels each subject's routed region grows by (subject_step.dilated_targets)


@dataclass
class TrajectoryConfig(Section):
    """``stage2.trajectory``: the routers retrained on the model's own sampling trajectories (trajectory.py)."""

    classifier: str = ""  # the identity classifier that labels the drawn objects (required)
    samples: int = 240
    iterations: int = 600
    lr: float = 1e-3
    batch_size: int = 16
    first_index: int = 100_000  # first training-world scene sampled
    sample_steps: int = MINIATURE.steps  # the miniature's sampling (anystory/presets.py)
    guidance: float = MINIATURE.guidance
    seed: int = 0
    logit_adjustment_tau: Optional[float] = None  # the retrained routers' own background logit adjustment
    combine_weight: Optional[float] = None  # keep stage 2's routers, add the trajectory routers' logits with it


@dataclass
class Stage2Config(SubjectStageConfig):
    routing_weight: float = 0.1
    routing_dilation: int = 0  # pixels each subject's routed region grows by (subject_step.dilated_targets)
    logit_adjustment_tau: float = 1.0  # inference background logit adjustment: tau x log(prior ratio)
    logit_adjustment_tau_single: Optional[float] = None  # its tau for a call with one subject (None: the same)
    single_region: bool = False  # inference: one connected region per subject
    subject_gap: int = 0  # inference: latent positions of background kept between two subjects (sdxl/router.py)
    trajectory: Optional[TrajectoryConfig] = None


@dataclass
class BackgroundConfig(SubjectStageConfig):
    """The background reference (anystory/sdxl/background.py); steps 0 = not trained, the weights ship without it."""

    rank: int = 4
    gate: bool = False  # a learned log-scale per attention layer
    token_rank: int = 0  # a low-rank correction of its semantic tokens
    ip_rank: int = 0  # rank of its own corrections of the semantic key/value projections (0: the subjects')
    offset_noise: float = 0.0  # std of a per-sample, per-channel constant added to the training noise
    start: float = 0.0  # the background_start stored with the weights (inference: mean latent in the first latent)
    background_loss_weight: float = 1.0  # the loss's weight on backdrop pixels
    x0_colour_weight: float = 0.0  # backdrop-colour loss on the predicted clean image, at timesteps below x0_max_t
    x0_max_t: int = 1000


@dataclass
class TrainingConfig(Section):
    """A whole training config (``configs/*.yaml``)."""

    backbone: str = "sdxl"  # "flux": the FLUX stages
    seed: int = 0
    threads: int = 1  # CPU threads; on a shared CPU one busy thread beats two oversubscribed ones
    work_dir: str = "runs/miniature"
    export_dir: str = "assets/miniature"
    mixed_precision: Optional[str] = None  # "no" / "bf16" / "fp16"; None = the accelerate launch config's
    frozen_dtype: Optional[str] = None  # "bf16" / "fp16": UNet (when not trained), VAE, text and image encoders
    gradient_checkpointing: bool = False  # activations recomputed in backward (stages 1-2, FLUX stages)
    find_unused_parameters: bool = True  # DDP: the ReferenceNet's layers after its last self-attention get no grad
    trackers: Union[str, List[str]] = "auto"  # TensorBoard (+ W&B when set up); see tracking.py
    sample_every: int = 0  # stages 1-2: a held-out sample + routing map to the trackers every N steps (0 = never)
    log_every: int = 10
    save_every: int = 100
    data: DataConfig = field(default_factory=DataConfig)
    world: Dict[str, Any] = field(default_factory=dict)  # WorldConfig's fields (anystory/data/synthetic.py)
    model: ModelConfig = field(default_factory=ModelConfig)
    base_model: Optional[str] = None  # a diffusers folder or hub id; None = build the miniature (vae/clip/base)
    image_encoder: Optional[str] = None  # with base_model: its CLIP image encoder (None: load_sdxl_base's default)
    vae: VaeConfig = section(VaeConfig, steps=1000, batch_size=8, lr=2e-3)
    clip: StageConfig = section(StageConfig, steps=400, batch_size=64, lr=1e-3)
    base: BaseStageConfig = section(BaseStageConfig, steps=1000, batch_size=16, lr=1e-3, ema=0.99)
    stage1: Stage1Config = section(Stage1Config, steps=500, batch_size=12, lr=5e-4, generic_caption=0.6)
    stage2: Stage2Config = section(Stage2Config, steps=300, batch_size=12, lr=1e-3, subjects=[0.2, 0.4, 0.4],
                                   generic_caption=0.6, drop_text=0.0, drop_semantic=0.0)
    background: BackgroundConfig = section(BackgroundConfig, steps=0, batch_size=12, lr=2e-3,
                                           subjects=[0.3, 0.4, 0.3], generic_caption=0.5)
    flux: FluxModelConfig = field(default_factory=FluxModelConfig)
    flux_base: FluxBaseConfig = field(default_factory=FluxBaseConfig)
    flux_subject: FluxStageConfig = FLUX_SUBJECT
    flux_router: FluxStageConfig = FLUX_ROUTER


def _open_keys(cfg: TrainingConfig) -> None:
    """The free-form mappings' keys against what receives them as keyword arguments."""
    from ..data.synthetic import WorldConfig
    from ..sdxl.adapter_sdxl import AnyStorySDXLAdapter
    from ..sdxl.tiny_sdxl import TinySpec

    refuse_unknown(cfg.world, list(WorldConfig.__dataclass_fields__), "world")
    refuse_unknown(cfg.model.tiny_spec, list(TinySpec.__dataclass_fields__), "model.tiny_spec")
    adapter = list(inspect.signature(AnyStorySDXLAdapter.__init__).parameters)[4:]  # after unet config, layers, dim
    refuse_unknown(cfg.model.anystory, adapter, "model.anystory")


def _check_values(cfg: TrainingConfig) -> None:
    if cfg.backbone not in ("sdxl", "flux"):
        raise ValueError(f"backbone must be 'sdxl' or 'flux', got {cfg.backbone!r}")
    for stage in ("stage1", "stage2", "background") + RELEASE_STAGES:
        probs = cfg[stage].subjects
        if not probs or any(p < 0 for p in probs) or sum(probs) <= 0 or len(probs) > 4:
            raise ValueError(f"{stage}.subjects must be 1-4 non-negative weights for 1, 2, ... subjects, got {probs}")
    for name, value in (("stage1.routing_dilation", cfg.stage1.routing_dilation),
                        ("stage2.routing_dilation", cfg.stage2.routing_dilation), ("stage2.subject_gap", cfg.stage2.subject_gap)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if cfg.stage2.trajectory is not None and not cfg.stage2.trajectory.classifier:
        raise ValueError("stage2.trajectory.classifier: required (the identity classifier's safetensors file)")


def build_config(data: Mapping, overrides: Optional[Mapping] = None) -> TrainingConfig:
    """A :class:`TrainingConfig` from ``data`` (the YAML's mapping) with ``overrides`` (same shape) over it."""
    cfg = build(TrainingConfig, merge(data, overrides))
    _open_keys(cfg)
    _check_values(cfg)
    return cfg


def load_config(path: str, overrides: Optional[Mapping] = None) -> TrainingConfig:
    """Read ``path`` over the defaults; ``overrides`` (e.g. ``{"stage1": {"steps": 5}}``) win over both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must be a mapping, got {type(data).__name__}")
    try:
        return build_config(data, overrides)
    except ValueError as e:
        raise ValueError(f"training config {path}: {e}") from None


def stages_of(cfg: Mapping) -> tuple:
    """The stages a config's backbone runs, in order."""
    return FLUX_STAGES if cfg["backbone"] == "flux" else STAGES


def stage_dir(cfg: Mapping, stage: str) -> str:
    return os.path.join(cfg["work_dir"], stage)
