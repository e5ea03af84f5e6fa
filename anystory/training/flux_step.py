"""One FLUX training step: the release's own forward on a noised image, its flow-matching loss, the router's loss.

Training runs exactly what ``AnyStoryFluxPipeline`` computes at inference (the same hooks and processors: redux
tokens appended to the text, the reference pass with the ``anystory_ref`` LoRA and its cached keys/values, the
router tokens through every block with the ``anystory_router`` LoRA), on one denoising step at a random noise
level. Every condition is on in that step (inference switches the redux tokens on in a window of the schedule;
the training step teaches them at every noise level).

Losses. The release ships no training code, so nothing here is the release's: the objective is FLUX's own
rectified flow (predict ``noise - x0`` at ``x_t = (1 - s) x0 + s noise``, ``s`` logit-normal, SD3's sampling).
The paper's router loss (SDXL) is an L2 between soft routing maps and the masks, with a background class; the
FLUX router has no background class (every image token goes to one subject) and its logits are unnormalised
products, so we take the cross-entropy of every routed block's logits against the subject that covers each
image token, on subject tokens only. Its hard map enters attention as a ``-inf`` mask, which carries no
gradient, so the router learns from this loss alone (the straight-through Gumbel trick of SDXL has nothing to
pass through here).

Routing during the step: one subject, no router (as the release: router on for >= 2). Several subjects: the
``flux_subject`` stage routes by the ground truth (image tokens of subject i see subject i's tokens, others
none), the ``flux_router`` stage lets the router decide, as inference does.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..routing import route_decision
from .data import choose_captions, images_to_tensor, subject_count
from .diffusion import subject_weights

#: the data stream (and ``data.<stage>`` entry) each FLUX stage reads: paired data as stage 1, multi-subject as 2
DATA_STAGE = {"flux_subject": "stage1", "flux_router": "stage2"}
#: an image token is a subject's when the subject covers more than this share of it (else it is left out)
TOKEN_COVER = 0.5


@torch.no_grad()
def encode_text(pipe, captions: List[str], max_length: int):
    """(prompt_embeds, pooled, text_ids) of FLUX's frozen text encoders."""
    embeds, pooled, ids = pipe.encode_prompt(prompt=list(captions), prompt_2=None, device=pipe.transformer.device,
                                             num_images_per_prompt=1, max_sequence_length=max_length)
    return embeds, pooled, ids


@torch.no_grad()
def encode_latents(pipe, images: List[np.ndarray]):
    """Packed clean latents ``[B, I, C]`` (the VAE posterior's mode), their position ids and the token grid."""
    vae = pipe.vae
    pixels = images_to_tensor(images).to(vae.device, vae.dtype)
    latents = (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    packed = pipe._pack_latents(latents, b, c, h, w)
    ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return packed.to(pipe.transformer.dtype), ids, (h // 2, w // 2)


def token_cover(target: np.ndarray, grid) -> torch.Tensor:
    """``[N+1, I]``: the share of each image token every class (subjects, background last) covers."""
    return F.adaptive_avg_pool2d(torch.from_numpy(target).float()[None], tuple(grid))[0].flatten(1)


def subject_labels(cover: torch.Tensor) -> torch.Tensor:
    """``[I]`` subject of each image token, ``-1`` where no subject covers more than :data:`TOKEN_COVER`."""
    share, label = cover[:-1].max(dim=0)
    return torch.where(share > TOKEN_COVER, label, torch.full_like(label, -1))


def truth_maps(cover: torch.Tensor) -> torch.Tensor:
    """``[N, I]`` 0/1 routing from the masks: each token to the class covering most of it (background: none)."""
    n = cover.shape[0] - 1
    return F.one_hot(cover.argmax(dim=0), n + 1)[:, :n].T.float()


def subject_miou(pred: torch.Tensor, labels: torch.Tensor, n: int) -> float:
    """Mean IoU over the subjects present, on subject tokens (``labels >= 0``); the FLUX router has no background."""
    keep = labels >= 0
    ious = []
    for c in range(n):
        p, g = (pred == c) & keep, labels == c
        union = (p | g).sum()
        if union > 0:
            ious.append(float((p & g).sum()) / float(union))
    return float(np.mean(ious)) if ious else float("nan")


def routing_terms(logits: List[torch.Tensor], labels: torch.Tensor):
    """Cross-entropy of every routed block's ``[1, N, I]`` logits on subject tokens, and the blocks' mean mIoU."""
    keep = labels >= 0
    losses, scores = [], []
    for block in logits:
        per_token = block[0].T  # [I, N]
        on = keep.to(per_token.device)
        losses.append(F.cross_entropy(per_token[on], labels.to(per_token.device)[on]))
        scores.append(subject_miou(route_decision(per_token.detach(), dim=1).cpu(), labels, block.shape[1]))
    return torch.stack(losses).mean(), float(np.mean(scores))


def sample_sigmas(generator: torch.Generator, total: int) -> torch.Tensor:
    """Noise levels of the global batch: logit-normal (SD3's ``logit_normal``, mean 0, std 1)."""
    return torch.sigmoid(torch.randn(total, generator=generator))


@dataclasses.dataclass
class StepInputs:
    """What one sample's forward needs besides its record."""

    latents: torch.Tensor  # [1, I, C]
    noise: torch.Tensor  # [1, I, C]
    sigma: float
    embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    img_ids: torch.Tensor
    grid: tuple
    reference_seed: int


def conditioned_prediction(pipe, scfg: dict, record, inputs: StepInputs, teacher: bool, use_router: bool = True,
                           maps: Optional[torch.Tensor] = None):
    """The transformer's prediction for one sample with its subjects, and the routed blocks' logits (``None``
    when the router does not run). ``teacher``: several subjects routed by the ground truth; ``use_router``
    False: not routed at all (every image token sees every subject); ``maps``: ``[N, I]`` 0/1, this routing
    forced instead (a study's controls)."""
    device = pipe.transformer.device
    prepared = pipe.check_subjects(record.references, "app")
    n = len(prepared)
    cond = pipe.conditioning_inputs(prepared, device, torch.Generator().manual_seed(inputs.reference_seed), steps=1,
                                    grid=inputs.grid, redux_scale=float(scfg["redux_scale"]), redux_start_at=0.0,
                                    redux_end_at=1.0, ref_start_at=0.0, ref_end_at=1.0, use_router=n > 1 and use_router)
    if n > 1 and teacher and maps is None:
        maps = truth_maps(token_cover(record.routing_target(), inputs.grid))
    if maps is not None:
        cond = dataclasses.replace(cond, forced_maps=maps.to(device), use_router=False)
    state = pipe.start_anystory_call(cond)
    routed = cond.use_router
    state.router_logits = [] if routed else None
    noisy = (1 - inputs.sigma) * inputs.latents + inputs.sigma * inputs.noise
    guidance = torch.full((1,), float(scfg["guidance"]), device=device)
    pred = pipe.transformer(hidden_states=noisy.to(pipe.transformer.dtype), timestep=torch.tensor([inputs.sigma],
                            device=device), guidance=guidance, pooled_projections=inputs.pooled,
                            encoder_hidden_states=inputs.embeds, txt_ids=inputs.text_ids, img_ids=inputs.img_ids,
                            return_dict=False)[0]
    logits, state.router_logits = state.router_logits, None
    return pred, logits


def token_weights(cover: torch.Tensor, object_weight: float) -> Optional[torch.Tensor]:
    """``[I, 1]`` loss weights, mean 1 (:func:`subject_weights` of the share of each image token subjects cover):
    the references carry nothing on the backdrop; None when the weight is 0."""
    weight = subject_weights(1.0 - cover[-1], object_weight, 0)
    return None if weight is None else weight[:, None]


def flow_loss(pred: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
              weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FLUX's rectified-flow loss: the predicted velocity against ``noise - x0``; ``weight`` (``[I, 1]`` or
    ``[B, I, 1]``, :func:`token_weights`) weighs image tokens."""
    target = (noise - latents).float()
    if weight is None:
        return F.mse_loss(pred.float(), target)
    return ((pred.float() - target) ** 2 * weight.to(target.device)).mean()


def sample_forward(pipe, scfg: dict, record, inputs: StepInputs, teacher: bool) -> Dict[str, torch.Tensor]:
    """One sample's losses (the routing loss when the router ran); ``teacher``: several subjects routed by the
    ground truth instead of the router."""
    pred, logits = conditioned_prediction(pipe, scfg, record, inputs, teacher)
    weight = token_weights(token_cover(record.routing_target(), inputs.grid), float(scfg.get("object_weight", 0.0)))
    out = {"diffusion": flow_loss(pred, inputs.latents, inputs.noise, weight)}
    if logits is not None:
        out["routing"], miou = routing_terms(logits, subject_labels(token_cover(record.routing_target(), inputs.grid)))
        out["miou"] = torch.tensor(miou)
    return out


def flux_step(cfg: dict, stage: str, pipe, source, step: int, batch: int, generator: torch.Generator,
              rows: Optional[slice] = None, count: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Mean losses of rows ``rows`` of step ``step``'s global batch of ``batch`` samples. Every draw is made for the
    global batch and sliced (reference noise by the sample's global position), so processes that split a batch
    compute what one process computes."""
    scfg = cfg[stage]
    rows = rows or slice(None)
    rng = np.random.default_rng([int(cfg["seed"]), 7 if stage == "flux_subject" else 8, step])
    count = count or subject_count(rng, scfg["subjects"])
    positions = list(range(step * batch, (step + 1) * batch))[rows]
    records = [source.record(DATA_STAGE.get(stage, stage), p, count) for p in positions]
    captions, dropped = choose_captions(records, rng.random(batch)[rows], float(scfg["generic_caption"]),
                                        float(scfg["drop_text"]))
    embeds, pooled, text_ids = encode_text(pipe, captions, int(cfg["flux"]["max_sequence_length"]))
    latents, img_ids, grid = encode_latents(pipe, [r.image for r in records])
    noise = torch.randn((batch, *latents.shape[1:]), generator=generator)[rows].to(latents)
    sigmas = sample_sigmas(generator, batch)[rows].tolist()
    parts = []
    for i, record in enumerate(records):
        inputs = StepInputs(latents[i:i + 1], noise[i:i + 1], sigmas[i], embeds[i:i + 1], pooled[i:i + 1], text_ids,
                            img_ids, grid, int(cfg["seed"]) * 1_000_003 + step * 1009 + positions[i])
        parts.append(sample_forward(pipe, scfg, record, inputs, teacher=stage == "flux_subject"))
    out = {k: torch.stack([p[k] for p in parts]).mean() for k in parts[0]}
    weight = float(scfg.get("routing_weight", 0.0))
    out["loss"] = out["diffusion"] + (weight * out["routing"] if "routing" in out else 0.0)
    return out
