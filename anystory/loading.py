"""The one place models are loaded (app, CLI, eval, training): by hub id or local path, with errors that say what
is missing and what to do. Hub ids come from :mod:`anystory.hub`."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .errors import ModelUnavailableError
from .hub import FLUX_ANYSTORY_REPO, FLUX_BASE, FLUX_REDUX, SDXL_BASE, SDXL_IMAGE_ENCODER
from .sdxl.pipeline_sdxl import AnyStorySDXLPipeline
from .weights import anystory_files


def model_unavailable(what: str, source: str, err: Exception) -> ModelUnavailableError:
    """The error for ``what`` failing to load from ``source``: the cause, and what to do about it."""
    return ModelUnavailableError(
        f"{what} could not be loaded from '{source}': {type(err).__name__}: {err}. "
        "Pass a local folder, or run once with network access so the hub files are cached."
    )


def load_sdxl_base(base_model: Optional[str] = None, image_encoder: Optional[Sequence[Optional[str]]] = None,
                   dtype: Optional[torch.dtype] = None) -> AnyStorySDXLPipeline:
    """SDXL base (hub id or folder) + CLIP image encoder, without AnyStory weights (training starts here).

    ``image_encoder``: (hub id or folder, subfolder or None); None takes the paper's encoder."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    base_model = base_model or SDXL_BASE
    encoder_id, subfolder = image_encoder or SDXL_IMAGE_ENCODER
    dtype = dtype or torch.float32
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_id, subfolder=subfolder or "",
                                                                torch_dtype=dtype)
    except Exception as e:
        raise model_unavailable("The CLIP image encoder", f"{encoder_id}/{subfolder or ''}", e) from e
    try:
        return AnyStorySDXLPipeline.from_pretrained(base_model, image_encoder=encoder,
                                                    feature_extractor=CLIPImageProcessor(), torch_dtype=dtype)
    except Exception as e:
        raise model_unavailable("The SDXL base model", base_model, e) from e


def load_sdxl_anystory(anystory_weights: str, base_model: Optional[str] = None,
                       image_encoder: Optional[Sequence[Optional[str]]] = None,
                       device: str = "cpu", dtype: Optional[torch.dtype] = None) -> AnyStorySDXLPipeline:
    """SDXL base (hub id or folder) + CLIP image encoder + our AnyStory weights (folder or file).

    Weights that do not fit the base UNet are refused here, naming the first mismatching tensor
    (``anystory.sdxl.adapter_fit``)."""
    try:
        anystory_files(anystory_weights)  # before the base model's minutes of loading
    except FileNotFoundError as e:
        reason = str(e).removeprefix("AnyStory weights: ")
        raise ModelUnavailableError(f"AnyStory weights not found at '{anystory_weights}': {reason}") from None
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    pipe = load_sdxl_base(base_model, image_encoder, dtype)
    pipe.load_anystory_weights(anystory_weights)
    return pipe.to(device)


def load_flux_release(anystory: Optional[str] = None, flux: Optional[str] = None, redux: Optional[str] = None,
                      torch_dtype: torch.dtype = torch.bfloat16, quantization: str = "none", **kwargs):
    """The authors' FLUX release (hub ids or local paths; None takes the released ones), unplaced: the caller
    moves it or offloads it (``anystory.flux.low_vram.apply_offload``)."""
    from .flux import AnyStoryFluxPipeline

    return AnyStoryFluxPipeline.from_released(flux=flux or FLUX_BASE, redux=redux or FLUX_REDUX,
                                              anystory=anystory or FLUX_ANYSTORY_REPO, torch_dtype=torch_dtype,
                                              quantization=quantization, **kwargs)


def load_miniature(device: str = "cpu", path: Optional[str] = None) -> AnyStorySDXLPipeline:
    """The shipped miniature (trained by us, in ``assets/miniature``): what runs fully offline."""
    from .sdxl.miniature import load_miniature as _load

    return _load(device=device, path=path)


def load_default_pipeline(device: str = "cpu") -> AnyStorySDXLPipeline:
    """The model used when none is configured: the shipped miniature."""
    return load_miniature(device=device)
