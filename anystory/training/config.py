"""Training configuration: one YAML file describes every stage (see ``configs/miniature.yaml``)."""
from __future__ import annotations

import copy
import os
from typing import Any, Dict

import yaml

STAGES = ("vae", "clip", "base", "stage1", "stage2", "background", "export")

DEFAULTS: Dict[str, Any] = {
    "seed": 0,
    "threads": 1,  # CPU threads; on a shared CPU one busy thread beats two oversubscribed ones
    "work_dir": "runs/miniature",
    "export_dir": "assets/miniature",
    "mixed_precision": None,  # "no" / "bf16" / "fp16"; None = the accelerate launch config's (else "no")
    "frozen_dtype": None,  # "bf16" / "fp16": UNet (when not trained), VAE, text and image encoders in half precision
    "gradient_checkpointing": False,  # UNet and ReferenceNet recompute activations in backward (stages 1-2)
    "find_unused_parameters": True,  # DDP: the ReferenceNet's layers after its last self-attention get no gradient
    "trackers": "auto",  # TensorBoard (+ W&B when set up); see anystory/training/tracking.py
    "sample_every": 0,  # stages 1-2: log a held-out sample + routing map to the trackers every N steps (0 = never)
    "data": {"stage1": None, "stage2": None, "heldout": None, "resolution": None},  # None = the synthetic world
    "world": {},
    "model": {
        "tiny_spec": {},
        "tokenizer_max_length": 77,
        "anystory": {},
        "save_dtype": "float32",
    },
    "base_model": None,  # a diffusers folder or hub id; None = build the miniature (vae/clip/base stages)
    # object_weight: subject pixels weigh 1 + object_weight in the decoder's L1 (0: a plain L1)
    "vae": {"steps": 1000, "batch_size": 8, "lr": 2e-3, "basis_images": 512, "whiten": 0.5, "object_weight": 0.0},
    "clip": {"steps": 400, "batch_size": 64, "lr": 1e-3},
    "base": {"steps": 1000, "batch_size": 16, "lr": 1e-3, "drop_text": 0.1, "generic_caption": 0.15,
             "snr_gamma": 5.0, "ema": 0.99},
    "stage1": {"steps": 500, "batch_size": 12, "lr": 5e-4, "subjects": [0.5, 0.3, 0.2], "drop_text": 0.1,
               "generic_caption": 0.6, "drop_semantic": 0.1, "snr_gamma": 5.0, "ema": 0.0, "gradient_accumulation": 1},
    "stage2": {"steps": 300, "batch_size": 12, "lr": 1e-3, "subjects": [0.2, 0.4, 0.4], "routing_weight": 0.1,
               "generic_caption": 0.6, "drop_text": 0.0, "snr_gamma": 5.0, "ema": 0.0, "gradient_accumulation": 1},
    # the background reference (anystory/sdxl/background.py): steps 0 = not trained, the weights ship without it
    # gate: a learned log-scale per attention layer; token_rank: a low-rank correction of its semantic tokens;
    # ip_rank: rank of its own corrections of the semantic key/value projections (0: the subjects' projections);
    # offset_noise: std of a per-sample, per-channel constant added to the training noise (0: none);
    # start: the background_start stored with the weights (inference: the reference's mean latent in the first latent);
    # background_loss_weight: the loss's weight on backdrop pixels; x0_colour_weight: weight of the backdrop-colour
    # loss on the predicted clean image, at timesteps below x0_max_t
    "background": {"steps": 0, "batch_size": 12, "lr": 2e-3, "rank": 4, "gate": False, "token_rank": 0, "ip_rank": 0,
                   "offset_noise": 0.0, "start": 0.0,
                   "background_loss_weight": 1.0, "x0_colour_weight": 0.0, "x0_max_t": 1000,
                   "subjects": [0.3, 0.4, 0.3],
                   "generic_caption": 0.5, "drop_text": 0.1, "drop_semantic": 0.1, "snr_gamma": 5.0, "ema": 0.0,
                   "gradient_accumulation": 1},
    "log_every": 10,
    "save_every": 100,
}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str, overrides: Dict[str, Any] | None = None) -> dict:
    """Read ``path`` over the defaults; ``overrides`` (e.g. ``{"stage1": {"steps": 5}}``) win over both."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config {path} not found")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"training config {path} must be a mapping, got {type(data).__name__}")
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"training config {path}: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = _merge(_merge(DEFAULTS, data), overrides or {})
    for stage in ("stage1", "stage2", "background"):
        probs = cfg[stage]["subjects"]
        if not probs or any(p < 0 for p in probs) or sum(probs) <= 0 or len(probs) > 4:
            raise ValueError(f"{stage}.subjects must be 1-4 non-negative weights for 1, 2, ... subjects, got {probs}")
    return cfg


def stage_dir(cfg: dict, stage: str) -> str:
    return os.path.join(cfg["work_dir"], stage)
