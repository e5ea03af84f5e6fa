"""Every hub id AnyStory loads from, and the one check of whether the hub is switched off.

Defined here once so the app, the CLI, eval, training and the pipelines cannot drift apart. Nothing here imports
torch or diffusers: the app reads it before it decides which model to load.
"""
from __future__ import annotations

import os

#: SDXL base model (the paper's backbone).
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
#: IP-Adapter's ViT-H/14 image encoder, the paper's CLIP (penultimate layer, 257 tokens): (repo, subfolder).
SDXL_IMAGE_ENCODER = ("h94/IP-Adapter", "models/image_encoder")
#: The FLUX backbone and the Redux model whose SigLIP and image embedder the release builds on.
FLUX_BASE = "black-forest-labs/FLUX.1-dev"
FLUX_REDUX = "black-forest-labs/FLUX.1-Redux-dev"
#: The authors' released FLUX weights.
FLUX_ANYSTORY_REPO = "Junjie96/AnyStory"
FLUX_ANYSTORY_FILE = "anystory_flux.bin"
#: Matting for subjects given without a mask, as the authors cut their references out.
BIREFNET = "ZhengPeng7/BiRefNet"

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read at call time."""
    return any(os.environ.get(k, "0").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
