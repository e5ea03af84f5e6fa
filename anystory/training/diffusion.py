"""The denoising objective shared by the base model and both AnyStory stages: SDXL's epsilon prediction, or the
v-prediction the scheduler's config names (``prediction_type``), as diffusers' own training scripts read it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def training_scheduler(pipe) -> DDPMScheduler:
    """The forward (noising) process of the pipeline's own scheduler: same betas, same timesteps."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` in [-1, 1] -> scaled latents, as the pipeline's VAE decode expects them."""
    vae = pipe.vae
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`encode_images`, differentiable: scaled latents -> ``[B, 3, H, W]`` pixels (float32)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample.float()


def predicted_clean(scheduler: DDPMScheduler, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The clean latents a prediction implies at timestep ``t``: :func:`noisy_latents`'s noising inverted
    (DDPM's formula for epsilon, ``sqrt(a) x_t - sqrt(1 - a) v`` for v), in float32."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
    if prediction_type(scheduler) == "v_prediction":
        return alpha_bar.sqrt() * noisy.float() - (1 - alpha_bar).sqrt() * pred.float()
    return (noisy.float() - (1 - alpha_bar).sqrt() * pred.float()) / alpha_bar.sqrt()


def predicted_noise(scheduler: DDPMScheduler, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise a prediction implies (itself for epsilon, ``sqrt(a) v + sqrt(1 - a) x_t`` for v): one scale on
    which models of either kind compare."""
    if prediction_type(scheduler) == "v_prediction":
        alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[t].float().view(-1, 1, 1, 1)
        return alpha_bar.sqrt() * pred.float() + (1 - alpha_bar).sqrt() * noisy.float()
    return pred


def prediction_type(scheduler: DDPMScheduler) -> str:
    kind = scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"training supports prediction_type 'epsilon' or 'v_prediction', the scheduler says {kind!r}")
    return kind


def prediction_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output: the noise, or the velocity ``sqrt(a) noise - sqrt(1 - a) x0``."""
    if prediction_type(scheduler) == "v_prediction":
        return scheduler.get_velocity(latents, noise, t)
    return noise


def text_conditioning(pipe, captions: Sequence[str], dropped: Optional[torch.Tensor], height: int, width: int):
    """(prompt_embeds, added_cond_kwargs) through ``encode_prompt`` itself, differentiable; dropped captions become
    zeros, exactly the unconditional input SDXL's pipeline uses when no negative prompt is given."""
    device = pipe.unet.device
    embeds, _, pooled, _ = pipe.encode_prompt(list(captions), device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    if dropped is not None and dropped.any():
        keep = (~dropped).to(device, embeds.dtype)
        embeds = embeds * keep[:, None, None]
        pooled = pooled * keep[:, None]
    proj = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), embeds.dtype, text_encoder_projection_dim=proj)
    added = {"text_embeds": pooled, "time_ids": time_ids.to(device).expand(len(captions), -1)}
    return embeds, added


def noisy_latents(scheduler: DDPMScheduler, latents: torch.Tensor, generator: torch.Generator,
                  t_range: Optional[tuple] = None, total: Optional[int] = None, rows: Optional[slice] = None):
    """(noisy latents, noise, timesteps) with uniform timesteps (or within ``t_range``).

    With ``total`` and ``rows``, ``latents`` are rows ``rows`` of a global batch of ``total``: timesteps and noise
    are drawn for the whole global batch and sliced, so each process gets what a single process would."""
    lo, hi = t_range or (0, scheduler.config.num_train_timesteps)
    total, rows = total or latents.shape[0], rows or slice(None)
    t = torch.randint(lo, hi, (total,), generator=generator)[rows].to(latents.device)
    noise = torch.randn((total, *latents.shape[1:]), generator=generator)[rows].to(latents.device, latents.dtype)
    return scheduler.add_noise(latents, noise, t), noise, t


def subject_weights(share: torch.Tensor, object_weight: float, dims) -> Optional[torch.Tensor]:
    """Loss weights from ``share`` (how much of each position subjects cover): ``1 + object_weight`` x share,
    normalised to mean 1 over ``dims``. Subjects cover a few percent of a scene, so a plain loss spends itself on
    the backdrop; None when the weight is 0 (the plain loss)."""
    if not object_weight:
        return None
    weight = 1.0 + object_weight * share
    return weight / weight.mean(dim=dims, keepdim=True)


def diffusion_loss(scheduler: DDPMScheduler, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor,
                   snr_gamma: float = 0.0, pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MSE to :func:`prediction_target`; with ``snr_gamma`` > 0, Min-SNR weighting (Hang et al. 2023), which
    trains faster; ``pixel_weight`` (``[B, 1, h, w]``, mean 1 per sample) weights latent positions."""
    error = F.mse_loss(pred.float(), target.float(), reduction="none")
    per_sample = (error if pixel_weight is None else error * pixel_weight.float()).mean(dim=(1, 2, 3))
    if snr_gamma and snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(scheduler, t, snr_gamma)
    return per_sample.mean()


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """``min(SNR, gamma) / SNR`` for epsilon. For v, whose loss is ``(SNR + 1)`` x the clean-latent loss,
    ``min(SNR + 1, gamma) / (SNR + 1)``: the paper's ``min(SNR, gamma) / (SNR + 1)`` would weigh the pure-noise
    steps of a zero-terminal-SNR schedule 0, and those are the steps where the prompt alone must place the
    subjects."""
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t].float()
    snr = alpha_bar / (1 - alpha_bar)
    if prediction_type(scheduler) == "v_prediction":
        return torch.clamp(snr + 1, max=snr_gamma) / (snr + 1)
    return torch.clamp(snr, max=snr_gamma) / snr
