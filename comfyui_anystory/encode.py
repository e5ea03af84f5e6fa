"""One subject's reference photo to AnyStory's inputs with ComfyUI's own encoders (CLIP_VISION = FLUX.1 Redux's
SigLIP, VAE = FLUX's), as the diffusers pipeline's ``encode_subjects`` computes them: the photo is masked (grey
outside the subject, which SigLIP's normalisation and the VAE's [-1, 1] range both read as 0), SigLIP's patch
features go through the release's redux (9x9) and router (3x3) projections, and the VAE latent of the masked
photo at ``reference_size`` becomes the packed reference tokens, placed left of the image in RoPE.

Differences from the pipeline, by design of ComfyUI's encoders: the VAE gives its posterior mean (the pipeline
samples it), and SigLIP resizes with ComfyUI's bicubic/antialias. Segmentation is the user's (a MASK input).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from anystory.errors import InvalidInputError

from .conditioning import EncodedSubject


def _square(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``[b, c, h, w]`` resized (stretched, as the pipeline's preprocessing) to ``size`` x ``size``."""
    kwargs = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=(size, size), mode=mode, **kwargs)


def subject_mask(image: torch.Tensor, mask) -> torch.Tensor:
    """``[1, 1, H, W]`` in [0, 1] (1 = the subject); no mask: the whole photo."""
    h, w = image.shape[1:3]
    if mask is None:
        return torch.ones(1, 1, h, w)
    m = mask[:1].float()
    if m.dim() == 2:
        m = m[None]
    if not m.any():
        raise InvalidInputError("AnyStory subject: the subject mask is empty (it must mark the subject in the photo)")
    return F.interpolate(m[None], size=(h, w), mode="nearest")[0][None]


def encode_subject(anystory, vae, image: torch.Tensor, mask=None, reference_size: int = 512, **extra) -> EncodedSubject:
    """``image``: ComfyUI IMAGE ``[B, H, W, C]`` in [0, 1] (the first one is used); ``mask``: MASK of the subject."""
    if image.dim() != 4 or image.shape[-1] < 3:
        raise InvalidInputError(f"AnyStory subject: expected an IMAGE [B, H, W, 3], got {tuple(image.shape)}")
    if reference_size % 16:
        raise InvalidInputError(f"AnyStory subject: reference_size must be a multiple of 16, got {reference_size}")
    pixels = image[:1, ..., :3].float().movedim(-1, 1)  # [1, 3, H, W]
    m = subject_mask(image, mask)
    grey = pixels * m + 0.5 * (1 - m)

    clip = anystory.clip_vision
    features = clip.encode_image(grey.movedim(1, -1), crop=False)["last_hidden_state"]
    grid = int(round(features.shape[1] ** 0.5))
    patch = (F.adaptive_avg_pool2d(_square(m, clip.image_size, "nearest"), (grid, grid)) > 0).flatten(2).transpose(1, 2)
    with torch.no_grad():
        redux = anystory.redux(features.to(anystory.dtype), patch)
        router = anystory.router(features.to(anystory.dtype), patch)

    ref_mask = _square(m, reference_size, "nearest")
    ref_pixels = _square(pixels, reference_size, "bilinear") * ref_mask + 0.5 * (1 - ref_mask)
    latent = vae.encode(ref_pixels.clamp(0, 1).movedim(1, -1))
    latent = anystory.latent_format.process_in(latent.float().cpu())
    _, c, h, w = latent.shape
    packed = latent.view(1, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, (h // 2) * (w // 2), c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None] - w // 2  # the release's shift: the reference sits left of the image
    inside = (F.adaptive_avg_pool2d(ref_mask, (h // 2, w // 2)) > 0).flatten()
    return EncodedSubject(redux=redux.float().cpu(), router=router.float().cpu(), ref_latents=packed,
                          ref_ids=ids.flatten(0, 1), ref_mask=inside, **extra)
