"""FLUX stage "flux_base": the tiny FLUX base learns the synthetic world before any subject stage.

The SDXL miniature trains its text-to-image base (``base``) before AnyStory's stages. The tiny FLUX base built in
code is random, and a base that cannot denoise leaves a subject path nothing subject-specific to learn: any
reference then lowers the loss as generic extra capacity (docs/training-flux.md, "Tiny-scale proof"). This stage
trains every weight of the transformer (text encoders and VAE frozen, as they are random and fixed functions of
their inputs) on the world's scenes and captions with FLUX's rectified-flow objective (``flux_step``'s), no
subjects. FLUX.1-dev comes trained, so the stage runs only with ``flux.base: tiny``; the later stages load its EMA
transformer.

    python -m anystory.training --config configs/flux_tiny.yaml --stages flux_base --set flux_base.steps=2000
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import stage_dir
from .data import choose_captions, indices, world_for
from .flux_step import encode_latents, encode_text, flow_loss, sample_sigmas, token_cover, token_weights
from .loop import StageLoop, TrainedModules, make_accelerator

WEIGHTS = "transformer.safetensors"


def trained_base_path(cfg: dict) -> str:
    return os.path.join(stage_dir(cfg, "flux_base"), WEIGHTS)


def load_trained_base(cfg: dict, transformer) -> bool:
    """Load the ``flux_base`` stage's transformer (strictly) when the stage has written it; False if not."""
    path = trained_base_path(cfg)
    if not os.path.isfile(path):
        return False
    transformer.load_state_dict(load_file(path), strict=True)
    return True


def save_trained_base(cfg: dict, transformer) -> str:
    path = trained_base_path(cfg)
    save_file({k: v.detach().contiguous().cpu() for k, v in transformer.state_dict().items()}, path)
    return path


def flux_base_step(cfg: dict, pipe, world, step: int, batch: int, generator: torch.Generator,
                   rows: Optional[slice] = None, split: str = "flux_base") -> Dict[str, torch.Tensor]:
    """Rows ``rows`` of step ``step``'s global batch: scenes with their captions (full, generic or dropped), one
    noise level each, the plain transformer's velocity against ``noise - x0``. Draws are made for the global batch
    and sliced, so processes that split a batch compute what one process computes."""
    scfg = cfg["flux_base"]
    rows = rows or slice(None)
    rng = np.random.default_rng([int(cfg["seed"]), 9, step])
    scenes = [world.scene(i) for i in indices(split, step, batch)[rows]]
    captions, _ = choose_captions(scenes, rng.random(batch)[rows], float(scfg["generic_caption"]),
                                  float(scfg["drop_text"]))
    embeds, pooled, text_ids = encode_text(pipe, captions, int(cfg["flux"]["max_sequence_length"]))
    latents, img_ids, grid = encode_latents(pipe, [s.image for s in scenes])
    noise = torch.randn((batch, *latents.shape[1:]), generator=generator)[rows].to(latents)
    sigmas = sample_sigmas(generator, batch)[rows].to(latents)
    noisy = (1 - sigmas[:, None, None]) * latents + sigmas[:, None, None] * noise
    pipe.start_anystory_call()  # the base alone: no subject conditioning is active
    guidance = torch.full_like(sigmas, float(scfg["guidance"]))
    pred = pipe.transformer(hidden_states=noisy, timestep=sigmas, guidance=guidance, pooled_projections=pooled,
                            encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
    weights = [token_weights(token_cover(s.routing_target(), grid), float(scfg["object_weight"])) for s in scenes]
    loss = flow_loss(pred, latents, noise, None if weights[0] is None else torch.stack(weights))
    return {"diffusion": loss, "loss": loss}


@torch.no_grad()
def heldout_loss(cfg: dict, pipe) -> Optional[float]:
    """Mean loss on fixed held-out scenes (the held-out world), noise and noise levels."""
    batches = int(cfg["flux_base"]["heldout_batches"])
    if not batches:
        return None
    world = world_for(cfg, "heldout")
    return float(np.mean([flux_base_step(cfg, pipe, world, k, 8, torch.Generator().manual_seed(2000 + k),
                                         split="heldout")["loss"].item() for k in range(batches)]))


def train_flux_base(cfg: dict, pipe, log=print) -> dict:
    if cfg["flux"]["base"] != "tiny":
        raise ValueError("flux_base trains the tiny FLUX base built in code (flux.base: tiny); "
                         f"{cfg['flux']['base']!r} comes trained: leave flux_base.steps at 0")
    from .flux_stages import freeze_all

    acc = make_accelerator(cfg, "flux_base")
    pipe.to(acc.device)
    freeze_all(pipe)
    params = {f"transformer.{n}": p.requires_grad_(True) for n, p in pipe.transformer.named_parameters()}
    world = world_for(cfg)
    step = TrainedModules(lambda k, micro, gen: flux_base_step(cfg, pipe, world, k, loop.global_batch, gen,
                                                               rows=loop.rows(micro)), transformer=pipe.transformer)
    loop = StageLoop(cfg, "flux_base", params, acc, log, module=step)
    before = loop.run(before=lambda: heldout_loss(cfg, pipe))
    freeze_all(pipe)
    after = heldout_loss(cfg, pipe)
    if after is not None:
        log(f"[flux_base] held-out loss {after:.4f}" + (f" (before {before:.4f})" if before is not None else ""))
    return {"heldout_before": before, "heldout_after": after, "seconds": loop.seconds}
