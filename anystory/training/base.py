"""Miniature stage "base" (stage 0): the text-to-image model AnyStory is added to, trained from scratch.

UNet and both text encoders learn SDXL's epsilon objective on synthetic scenes with their captions (full,
generic "two objects on sand", or dropped for classifier-free guidance); the VAE and the image encoder stay
frozen. EMA weights are what the later stages and the export use.

    python -m anystory.training.base --config configs/miniature.yaml
"""
from __future__ import annotations

import numpy as np
import torch

from .data import choose_captions, images_to_tensor, indices, world_for
from .diffusion import (diffusion_loss, encode_images, noisy_latents, prediction_target, subject_weights,
                        text_conditioning, training_scheduler)
from .loop import StageLoop, make_accelerator


def base_step(cfg: dict, pipe, world, scheduler, step: int, batch: int, generator: torch.Generator,
              stage: str = "base") -> torch.Tensor:
    scfg = cfg["base"]
    rng = np.random.default_rng([int(cfg["seed"]), 3, step])
    scenes = [world.scene(i) for i in indices(stage, step, batch)]
    latents = encode_images(pipe, images_to_tensor([s.image for s in scenes]))
    captions, dropped = choose_captions(scenes, rng.random(len(scenes)), float(scfg["generic_caption"]), float(scfg["drop_text"]))
    h, w = scenes[0].image.shape[:2]
    embeds, added = text_conditioning(pipe, captions, dropped, h, w)
    noisy, noise, t = noisy_latents(scheduler, latents, generator)
    pred = pipe.unet(noisy, t, embeds, added_cond_kwargs=added).sample
    weight = object_weights(scenes, latents.shape[-2:], float(scfg.get("object_weight", 0.0)))
    target = prediction_target(scheduler, latents, noise, t)
    return diffusion_loss(scheduler, pred, target, t, float(scfg["snr_gamma"]), weight)


def object_weights(scenes, size, object_weight: float):
    """``[B, 1, h, w]`` loss weights, mean 1 per sample (:func:`subject_weights` of each latent cell's share of
    subject pixels): without them the model learns colour (many pixels) long before shape (a few boundary
    pixels); None when the weight is 0."""
    if not object_weight:
        return None
    masks = torch.from_numpy(np.stack([s.masks.any(axis=0) for s in scenes]).astype(np.float32))[:, None]
    return subject_weights(torch.nn.functional.adaptive_avg_pool2d(masks, tuple(size)), object_weight, (1, 2, 3))


def train_base(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["base"]
    acc = make_accelerator(cfg)
    pipe.to(acc.device)
    for name in ("vae", "image_encoder"):
        getattr(pipe, name).requires_grad_(False).eval()
    params = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name).requires_grad_(True).train()
        params.update({f"{name}.{n}": p for n, p in module.named_parameters()})
    loop = StageLoop(cfg, "base", params, acc, log)
    world = world_for(cfg)
    scheduler = training_scheduler(pipe)

    def step():
        with acc.autocast():
            loss = base_step(cfg, pipe, world, scheduler, loop.step, int(scfg["batch_size"]), loop.generator())
        loop.update(loss, diffusion=loss.item())

    loop.run(step)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).requires_grad_(False).eval()
    with torch.no_grad():
        held = world_for(cfg, "heldout")
        gen = torch.Generator().manual_seed(0)
        losses = [base_step(cfg, pipe, held, scheduler, k, 16, gen, stage="heldout").item() for k in range(4)]
    log(f"[base] held-out diffusion loss {np.mean(losses):.4f}")
    return {"heldout_diffusion_loss": float(np.mean(losses)), "seconds": loop.seconds}


if __name__ == "__main__":
    from anystory.training.runner import run_stages

    raise SystemExit(run_stages(only=("base",)))
