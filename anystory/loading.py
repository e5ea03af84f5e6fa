"""Loading models by hub id or local path, with errors that say what is missing and what to do."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from .pipeline_sdxl import DEFAULT_IMAGE_ENCODER, AnyStorySDXLPipeline

DEFAULT_SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


class ModelUnavailableError(RuntimeError):
    """A model could not be loaded (not on disk and no network to fetch it)."""


def _explain(what: str, source: str, err: Exception) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{what} could not be loaded from '{source}': {type(err).__name__}: {err}. "
        "Pass a local folder, or run once with network access so the hub files are cached."
    )


def load_sdxl_anystory(anystory_weights: str, base_model: str = DEFAULT_SDXL_BASE,
                       image_encoder: Tuple[str, Optional[str]] = DEFAULT_IMAGE_ENCODER,
                       device: str = "cpu", dtype: Optional[torch.dtype] = None) -> AnyStorySDXLPipeline:
    """SDXL base (hub id or folder) + CLIP image encoder + our AnyStory weights (folder or file).

    ``image_encoder``: (hub id or folder, subfolder or None). Weights that do not fit the base UNet are refused
    here, naming the first mismatching tensor (``anystory.adapter_fit``)."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    if not os.path.exists(anystory_weights):  # before the base model's minutes of loading
        raise ModelUnavailableError(f"AnyStory weights not found at '{anystory_weights}' (a folder with "
                                    "anystory.safetensors and anystory_config.json)")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    encoder_id, subfolder = image_encoder
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_id, subfolder=subfolder or "", torch_dtype=dtype)
    except Exception as e:
        raise _explain("The CLIP image encoder", f"{encoder_id}/{subfolder or ''}", e) from e
    try:
        pipe = AnyStorySDXLPipeline.from_pretrained(base_model, image_encoder=encoder,
                                                    feature_extractor=CLIPImageProcessor(), torch_dtype=dtype)
    except Exception as e:
        raise _explain("The SDXL base model", base_model, e) from e
    pipe.load_anystory_weights(anystory_weights)
    return pipe.to(device)


def load_default_pipeline(device: str = "cpu") -> AnyStorySDXLPipeline:
    """The shipped miniature: what runs fully offline when no other model is configured."""
    from .miniature import load_miniature

    return load_miniature(device=device)
