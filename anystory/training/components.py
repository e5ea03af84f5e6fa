"""The miniature's SDXL-shaped components, built in code from the config (before any training)."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler

from ..sdxl.tiny_sdxl import TinySpec, tiny_sdxl_components
from ..tokenizer import offline_clip_tokenizer


def tiny_spec(cfg: dict) -> TinySpec:
    spec = dict(cfg["model"]["tiny_spec"])
    for key in ("block_out_channels", "transformer_layers_per_block", "attention_head_dim", "vae_channels"):
        if key in spec:
            spec[key] = tuple(spec[key])
    return TinySpec(**spec)


def build_components(cfg: dict) -> dict:
    """``tiny_sdxl_components`` at the config's size, with shorter tokenizers (captions are short) and a VAE
    without the mid-block attention, so it is fully convolutional and can be trained on small crops; the scheduler
    with the config's entries (a v-prediction, zero-terminal-SNR miniature is a scheduler config)."""
    spec = tiny_spec(cfg)
    comps = tiny_sdxl_components(seed=int(cfg["seed"]), spec=spec)
    length = int(cfg["model"]["tokenizer_max_length"])
    comps["tokenizer"] = offline_clip_tokenizer(model_max_length=length)
    comps["tokenizer_2"] = offline_clip_tokenizer(model_max_length=length, pad_token="!")
    vae_config = {k: v for k, v in comps["vae"].config.items() if not k.startswith("_")}
    vae_config.update(cfg["model"].get("vae", {}) or {"mid_block_add_attention": False})
    torch.manual_seed(int(cfg["seed"]) + 1)
    comps["vae"] = AutoencoderKL.from_config(vae_config)
    entries = cfg["model"].get("scheduler") or {}
    comps["scheduler"] = EulerDiscreteScheduler.from_config(comps["scheduler"].config, **entries)
    return comps


def anystory_config(cfg: dict) -> dict:
    return dict(cfg["model"]["anystory"])
