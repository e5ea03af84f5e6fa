"""Background stage: train the background reference (``anystory/sdxl/background.py``), everything else frozen.

Each sample is a scene of the synthetic world whose caption does *not* name its backdrop ("a red star and a
blue moon", "two objects"), its subjects' references, and a background reference: another view of the same kind
of backdrop with no objects (``SyntheticWorld.background_reference``). So the backdrop can only come from the
reference. Routing is the ground truth (teacher routing, as in stage 1): the background's conditions act on the
scene's background pixels, where the router sends them at inference. Loss: the diffusion loss, its backdrop
positions weighted ``background_loss_weight`` times the objects' (the backdrop is what the reference is for), plus,
with ``x0_colour_weight`` > 0, a loss on the backdrop colour of the predicted clean image (:func:`x0_colour_loss`:
the diffusion loss barely rewards getting the backdrop's colour right, which is what the reference should give). Only the
``background.*`` parameters train, so the subjects' encoders and the router stay exactly the shipped model's
(subject fidelity and routing cannot change), and the stage's weights merge into a shipped file by adding keys.

    python -m anystory.training.background --config configs/miniature.yaml
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.formats import Record
from ..data.synthetic import caption_for, generic_caption_for
from ..sdxl.background import background_tensors, encode_background, with_background
from .data import SyntheticSource, choose_captions, images_to_tensor, records_batch, source_for, subject_count
from .diffusion import (decode_latents, diffusion_loss, encode_images, noisy_latents, predicted_clean, prediction_target,
                        text_conditioning, training_scheduler)
from .loop import STAGE_IDS, StageLoop, make_accelerator
from .stage1 import freeze_all, prepare_training
from .subject_step import one_hot_targets


def background_parameters(adapter) -> dict:
    return {f"anystory.{n}": p for n, p in adapter.named_parameters() if n.startswith("background.")}


def background_step(cfg: dict, pipe, source: SyntheticSource, scheduler, step: int, batch: int,
                    generator: torch.Generator, data_stage: str = "background", count: Optional[int] = None,
                    use_background: bool = True, measure_colour: bool = False,
                    t_range: Optional[tuple] = None) -> Dict[str, torch.Tensor]:
    """Losses of step ``step``'s batch, with (or, for comparison, without) the background reference; the backdrop
    colour loss is computed when it is weighted or ``measure_colour``, and added to ``loss`` when weighted;
    timesteps uniform in ``t_range`` (default: all)."""
    scfg = cfg["background"]
    rng = np.random.default_rng([int(cfg["seed"]), 8, step])
    count = count or subject_count(rng, scfg["subjects"])
    device, dtype = pipe.unet.device, pipe.unet.dtype
    records, backgrounds = [], []
    for p in range(step * batch, (step + 1) * batch):
        index = source.index(data_stage, p)
        sample = source.world.sample(index, count=count)
        scene = sample.scene
        records.append(Record(str(index), scene.image, scene.masks, caption_for(scene.identities, None),
                              generic_caption_for(count, None), [r.image for r in sample.references]))
        backgrounds.append(source.world.background_reference(scene.background, index))
    data = records_batch(pipe, records, device, dtype)
    pixels = images_to_tensor([r.image for r in records]).to(device)
    latents = encode_images(pipe, pixels)
    captions, dropped = choose_captions(records, rng.random(batch), float(scfg["generic_caption"]),
                                        float(scfg["drop_text"]))
    h, w = records[0].image.shape[:2]
    with torch.no_grad():
        embeds, added = text_conditioning(pipe, captions, dropped, h, w)
    encoded = pipe.encode_subjects(**data.tensors)
    conditioned = count
    if use_background:
        parts = [background_tensors(pipe, image, device, dtype) for image in backgrounds]
        encoded = with_background(encoded, encode_background(
            pipe, torch.cat([p["pixels"] for p in parts]), torch.cat([p["clip_pixels"] for p in parts])))
        conditioned += 1
    drop_sem = float(scfg.get("drop_semantic", 0.0))
    if drop_sem > 0:  # the unconditional half of CFG at inference: blank-image semantic tokens, references kept
        drop = torch.from_numpy(rng.random(batch) < drop_sem).to(device)[:, None, None, None]
        encoded["semantic_tokens"] = torch.where(drop, encoded["semantic_uncond_tokens"], encoded["semantic_tokens"])
    lat_hw = tuple(latents.shape[-2:])
    adapter = pipe.anystory
    pipe.start_anystory_call(adapter.conditioning(**encoded, background=use_background,
                                       scales=torch.ones(conditioned, device=device),
                                       reference_scales=torch.ones(conditioned, device=device), latent_hw=lat_hw,
                                       forced_maps=one_hot_targets(data.targets, lat_hw).to(latents.dtype)))
    try:
        noisy, noise, t = noisy_latents(scheduler, latents, generator, t_range=t_range, total=batch)
        offset = float(scfg.get("offset_noise", 0.0))
        if offset > 0:  # the noise's per-channel mean hides the backdrop colour that x_t leaks at high t
            noise = noise + offset * torch.randn(noise.shape[:2], generator=generator)[..., None, None].to(noise)
            noisy = scheduler.add_noise(latents, noise, t)
        pred = pipe.unet(noisy, t, embeds, added_cond_kwargs=added).sample
        target = prediction_target(scheduler, latents, noise, t)
        loss = diffusion_loss(scheduler, pred, target, t, float(scfg["snr_gamma"]),
                              backdrop_weight(data.targets, lat_hw, float(scfg.get("background_loss_weight", 1.0))))
        out = {"diffusion": loss, "loss": loss}
        colour_weight = float(scfg.get("x0_colour_weight", 0.0))
        if colour_weight > 0 or measure_colour:
            out["x0_colour"] = x0_colour_loss(pipe, scheduler, noisy, pred, t, pixels, data.targets[:, -1:],
                                              int(scfg.get("x0_max_t", scheduler.config.num_train_timesteps)))
        if colour_weight > 0:
            out["loss"] = loss + colour_weight * out["x0_colour"]
        return out
    finally:
        pipe.start_anystory_call()


def backdrop_weight(targets: torch.Tensor, hw, weight: float) -> Optional[torch.Tensor]:
    """``[B, 1, h, w]`` loss weights from the ground truth ``[B, N+1, H, W]``: ``weight`` on the backdrop, 1 on
    objects, normalised to mean 1 per sample; ``None`` for weight 1."""
    if weight == 1:
        return None
    backdrop = one_hot_targets(targets, hw)[:, -1:]
    w = 1 + (weight - 1) * backdrop
    return w / w.mean(dim=(2, 3), keepdim=True)


def backdrop_colour(pixels: torch.Tensor, backdrop: torch.Tensor) -> torch.Tensor:
    """``[B, 3]`` mean colour of ``pixels`` ``[B, 3, H, W]`` over the ``backdrop`` mask ``[B, 1, H, W]``."""
    backdrop = backdrop.to(pixels.dtype)
    return (pixels * backdrop).sum(dim=(2, 3)) / backdrop.sum(dim=(2, 3)).clamp_min(1)


def x0_colour_loss(pipe, scheduler, noisy: torch.Tensor, pred: torch.Tensor, t: torch.Tensor,
                   pixels: torch.Tensor, backdrop: torch.Tensor, max_t: int) -> torch.Tensor:
    """L1 between the mean backdrop colour of the decoded predicted clean image and the target scene's (``pixels``
    in [-1, 1], ``backdrop`` the ground-truth mask at image resolution), averaged over the batch; samples at
    timesteps ``>= max_t`` count 0 (there the predicted image is mostly noise amplified by 1/sqrt(alpha_bar)).
    A mean colour, not per-pixel: the reference is another view of the backdrop (its own light and pattern),
    so only its colour is the target's; and it is the colour the background study's match measures."""
    keep = t < max_t
    if not bool(keep.any()):
        return pred.sum() * 0
    decoded = decode_latents(pipe, predicted_clean(scheduler, noisy[keep], pred[keep], t[keep]))
    mask = backdrop[keep].float()
    if mask.shape[-2:] != decoded.shape[-2:]:
        mask = F.interpolate(mask, size=decoded.shape[-2:], mode="nearest")
    error = (backdrop_colour(decoded, mask) - backdrop_colour(pixels[keep].float(), mask)).abs().mean(dim=1)
    return error.sum() / len(t)


@torch.no_grad()
def evaluate_background(cfg: dict, pipe, batches: int = 3, t_range: Optional[tuple] = None) -> dict:
    """Held-out diffusion loss, and backdrop colour error of the predicted clean image (:func:`x0_colour_loss`),
    with and without the background reference (same scenes, noise and timesteps; timesteps within ``t_range``)."""
    source = source_for(cfg, "background", "heldout")
    scheduler = training_scheduler(pipe)
    out = {}
    for use in (True, False):
        losses, colours = [], []
        for k in range(batches):
            gen = torch.Generator().manual_seed(1000 + k)
            step = background_step(cfg, pipe, source, scheduler, k, 8, gen, data_stage="heldout", count=1 + k % 3,
                                   use_background=use, measure_colour=True, t_range=t_range)
            losses.append(float(step["diffusion"]))
            colours.append(float(step["x0_colour"]))
        out["with_background" if use else "without_background"] = float(np.mean(losses))
        out["colour_with_background" if use else "colour_without_background"] = float(np.mean(colours))
    return out


def train_background(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["background"]
    if pipe.anystory is None:
        raise ValueError("the background stage needs the stage-2 AnyStory weights loaded (run stage2 first)")
    source = source_for(cfg, "background")
    if not isinstance(source, SyntheticSource):
        raise ValueError("the background stage trains on the synthetic world only (data.background is not read): "
                         "a lab's dataset has no background references")
    acc = make_accelerator(cfg, "background")
    if acc.num_processes > 1:
        raise ValueError("the background stage runs on one process")
    prepare_training(cfg, pipe, acc)
    if pipe.anystory.background is None:  # seeded: the down projections start random, so a rebuild is the same run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg["seed"]) + STAGE_IDS["background"])
            pipe.anystory.add_background(int(scfg["rank"]), bool(scfg.get("gate", False)),
                                         int(scfg.get("token_rank", 0)), int(scfg.get("ip_rank", 0)))
    pipe.anystory.register_to_config(background_start=float(scfg.get("start", 0.0)))  # inference only: not trained
    freeze_all(pipe)
    params = background_parameters(pipe.anystory)
    for p in params.values():
        p.requires_grad_(True)
    pipe.anystory.eval()  # routing is forced (teacher) anyway; nothing else in the adapter trains
    scheduler = training_scheduler(pipe)
    loop = StageLoop(cfg, "background", params, acc, log)

    def step():
        out = background_step(cfg, pipe, source, scheduler, loop.step, loop.batch_size, loop.generator())
        loop.update(out["loss"], **{k: v.detach() for k, v in out.items() if k != "loss"})

    before = loop.run(step, before=lambda: evaluate_background(cfg, pipe))
    freeze_all(pipe)
    after = evaluate_background(cfg, pipe)
    log(f"[background] held-out diffusion loss with the background reference {after['with_background']:.4f}, "
        f"without {after['without_background']:.4f}"
        + (f" (before training, with: {before['with_background']:.4f})" if before else "")
        + f"; backdrop colour error of the predicted image with {after['colour_with_background']:.4f}, "
          f"without {after['colour_without_background']:.4f}"
        + (f" (before training, with: {before['colour_with_background']:.4f})" if before else ""))
    return {"heldout_before": before, "heldout_after": after, "seconds": loop.seconds}


if __name__ == "__main__":
    from anystory.training.runner import run_stages

    raise SystemExit(run_stages(only=("background",)))
