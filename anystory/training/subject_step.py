"""One training step with subjects: encode the references, condition the UNet, return the losses.

Stage 1 routes by the ground truth ("teacher routing": each subject's conditions act inside its own mask,
exactly the regime inference puts them in) and learns the encoder from the diffusion loss. Stage 2 lets the
router decide (straight-through Gumbel-softmax in ``adapter.train()``) and adds the routing loss on its soft maps.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .data import area_targets, choose_captions, images_to_tensor, subject_batch, subject_count
from .diffusion import (diffusion_loss, encode_images, noisy_latents, prediction_target, subject_weights,
                        text_conditioning)
from .routing import router_miou, routing_loss


def one_hot_targets(targets: torch.Tensor, hw) -> torch.Tensor:
    """``[B, K, H, W]`` ground truth -> one-hot at ``hw`` (the class covering most of each cell)."""
    frac = F.adaptive_avg_pool2d(targets.float(), tuple(hw))
    return F.one_hot(frac.argmax(1), targets.shape[1]).movedim(-1, 1).float()


def dilated_targets(targets: torch.Tensor, radius: int) -> torch.Tensor:
    """Ground truth ``[B, N+1, H, W]`` (background last) with every subject's mask grown by ``radius`` pixels (a
    square max filter) and the background what no subject covers. Teacher routing to the exact mask hands the UNet
    each subject's outline, so the encoder never has to carry shape: the conditions learn to fill the routed region
    (docs/experiments/miniature-diagnosis.md, 2.11). A wider region makes the reference say where its outline is."""
    if radius <= 0:
        return targets
    subjects = F.max_pool2d(targets[:, :-1].float(), 2 * radius + 1, stride=1, padding=radius)
    background = (1 - subjects.amax(1, keepdim=True)).clamp(min=0)
    return torch.cat([subjects, background], 1).to(targets.dtype)


def target_weights(targets: torch.Tensor, hw, object_weight: float) -> Optional[torch.Tensor]:
    """``[B, 1, h, w]`` loss weights from the routing ground truth ``[B, N+1, H, W]`` (background last): cells
    covered by subjects weigh more, as in the base stage (``object_weight``); None when it is 0. Without them
    the backdrop, most of every scene, dominates the loss that teaches the encoder who a subject is."""
    return subject_weights(area_targets(targets[:, :-1].sum(1, keepdim=True), hw), object_weight, (1, 2, 3))


def semantic_alignment_loss(pipe, semantic_tokens: torch.Tensor, samples) -> torch.Tensor:
    """MSE between each subject's semantic tokens ``[B, N, T, D]`` and the prompt embeddings of its name alone
    (positions 1..T, after the start token; frozen text encoders). The decoupled cross-attention starts from the text
    projections, so tokens near a name's embeddings act on the UNet as the name in the prompt does: the base's own
    knowledge of a shape, reached from a reference instead of a word. Needs every reference's ``name``."""
    b, n, t, _ = semantic_tokens.shape
    names = [ref.name for s in samples for ref in s.references]
    if len(names) != b * n or not all(names):
        raise ValueError("stage1.semantic_alignment needs every subject's name (the records' references[i].name); "
                         "set it to 0 for data without names")
    with torch.no_grad():
        embeds = pipe.encode_prompt(names, device=semantic_tokens.device, num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    target = embeds[:, 1:1 + t].reshape(b, n, t, -1)
    return F.mse_loss(semantic_tokens.float(), target.float())


def subject_step(cfg: dict, stage: str, pipe, source, scheduler, step: int, batch: int, generator: torch.Generator,
                 teacher_routing: bool, routing_weight: float = 0.0, count: int = None,
                 data_stage: str = None, rows: Optional[slice] = None) -> Dict[str, torch.Tensor]:
    """Losses of rows ``rows`` (default: all) of step ``step``'s global batch of ``batch`` samples. Every random
    draw is made for the global batch and sliced, so processes that split a batch compute what one process would
    (up to the router's Gumbel noise, drawn per process)."""
    scfg = cfg[stage]
    rows = rows or slice(None)
    rng = np.random.default_rng([int(cfg["seed"]), 4 if stage == "stage1" else 5, step])
    count = count or subject_count(rng, scfg["subjects"])
    device = pipe.unet.device
    data = subject_batch(pipe, source, data_stage or stage, step, batch, count, device, pipe.unet.dtype, rows)
    scenes = data.samples
    latents = encode_images(pipe, images_to_tensor([s.image for s in scenes]).to(device))
    captions, dropped = choose_captions(scenes, rng.random(batch)[rows], float(scfg["generic_caption"]),
                                        float(scfg["drop_text"]))
    h, w = scenes[0].image.shape[:2]
    with torch.no_grad():
        embeds, added = text_conditioning(pipe, captions, dropped, h, w)
    adapter = pipe.anystory
    encoded = pipe.encode_subjects(**data.tensors)
    alignment_weight = float(scfg.get("semantic_alignment", 0.0))
    alignment = semantic_alignment_loss(pipe, encoded["semantic_tokens"], scenes) if alignment_weight else None
    drop_sem = float(scfg.get("drop_semantic", 0.0))
    if drop_sem > 0:  # the unconditional half of CFG at inference: blank-image semantic tokens, references kept
        drop = torch.from_numpy(rng.random(batch)[rows] < drop_sem).to(device)[:, None, None, None]
        encoded["semantic_tokens"] = torch.where(drop, encoded["semantic_uncond_tokens"], encoded["semantic_tokens"])
    lat_hw = tuple(latents.shape[-2:])
    regions = dilated_targets(data.targets, int(scfg.get("routing_dilation", 0)))  # where each subject is routed
    pipe.start_anystory_call(adapter.conditioning(
        **encoded,
        scales=torch.ones(count, device=device), reference_scales=torch.ones(count, device=device),
        latent_hw=lat_hw,
        forced_maps=one_hot_targets(regions, lat_hw).to(latents.dtype) if teacher_routing else None,
        collect_soft_maps=not teacher_routing,
    ))
    try:
        noisy, noise, t = noisy_latents(scheduler, latents, generator, total=batch, rows=rows)
        pred = pipe.unet(noisy, t, embeds, added_cond_kwargs=added).sample
        target = prediction_target(scheduler, latents, noise, t)
        weight = target_weights(data.targets, lat_hw, float(scfg.get("object_weight", 0.0)))
        diff = diffusion_loss(scheduler, pred, target, t, float(scfg["snr_gamma"]), weight)
        out = {"diffusion": diff, "loss": diff}
        if alignment is not None:
            out.update(alignment=alignment, loss=diff + alignment_weight * alignment)
        if not teacher_routing:
            route = routing_loss(pipe.anystory_state, regions)
            per_layer = router_miou(pipe.anystory_state, regions)
            out.update(routing=route, loss=out["loss"] + routing_weight * route,
                       miou=torch.tensor(float(np.mean(list(per_layer.values())))))
        return out
    finally:
        if not (torch.is_grad_enabled() and pipe.unet.is_gradient_checkpointing):
            pipe.start_anystory_call()  # else backward re-runs the layers and needs the conditions: the next step resets
