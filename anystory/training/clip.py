"""Miniature stage "clip": a small CLIP, trained contrastively on the synthetic world, then frozen.

AnyStory's semantic path reads a frozen, pretrained CLIP image encoder. No such weights exist offline, so the
miniature pretrains its own pair the way CLIP was trained: the image encoder against ``text_encoder_2``
(the SDXL encoder with a projection), on reference views of random subjects and their names ("red striped
star"), with a symmetric InfoNCE loss. Same-name pairs in a batch all count as positives.

    python -m anystory.training.clip --config configs/miniature.yaml
"""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..subjects import Subject, prepare_subjects
from .config import stage_dir
from .data import indices, world_for
from .loop import StageLoop, make_accelerator


def clip_pixels(pipe, references, size: int) -> torch.Tensor:
    """CLIP pixel values of reference images, prepared as ``pipe.subject_tensors`` prepares CLIP's input:
    ``prepare_subjects`` (square crop on white), resized to the reference size ``size``, then the feature extractor."""
    images = [prepare_subjects([Subject(r)])[0].image.resize((size, size), Image.BICUBIC) for r in references]
    return pipe.feature_extractor(images=images, return_tensors="pt").pixel_values


def name_embeddings(pipe, names, device) -> torch.Tensor:
    """Unit-norm ``text_encoder_2`` embeddings of subject names, the text side of the CLIP pair."""
    tok = pipe.tokenizer_2(list(names), padding="max_length", max_length=pipe.tokenizer_2.model_max_length,
                           truncation=True, return_tensors="pt").input_ids.to(device)
    return F.normalize(pipe.text_encoder_2(tok).text_embeds, dim=-1)


def clip_batch(pipe, world, step: int, batch: int, device, size: int, split: str = "clip"):
    """(CLIP pixel values of reference views of random subjects, their names): :func:`clip_pixels`."""
    references, names = [], []
    for i in indices(split, step, batch):
        rng = np.random.default_rng([world.seed, i, 99])
        ident = world.pool[int(rng.integers(len(world.pool)))]
        references.append(world.reference(ident, i).image)
        names.append(ident.name)
    return clip_pixels(pipe, references, size).to(device), names


def contrastive_loss(pipe, pixels: torch.Tensor, names, logit_scale: torch.Tensor):
    """Symmetric InfoNCE between image and text embeddings; returns (loss, image->text top-1 accuracy)."""
    text = name_embeddings(pipe, names, pixels.device)
    image = F.normalize(pipe.image_encoder(pixels).image_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image @ text.T
    same = torch.tensor([[a == b for b in names] for a in names], dtype=torch.float32, device=pixels.device)
    target = same / same.sum(1, keepdim=True)
    loss = 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean())
    acc = same[torch.arange(len(names)), logits.argmax(1)].mean()
    return loss, acc


def train_clip(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["clip"]
    acc = make_accelerator(cfg)
    device = acc.device
    pipe.image_encoder.to(device).requires_grad_(True).train()
    pipe.text_encoder_2.to(device).requires_grad_(True).train()
    logit_scale = torch.nn.Parameter(torch.tensor(float(np.log(10.0)), device=device))
    params = {f"image_encoder.{n}": p for n, p in pipe.image_encoder.named_parameters()}
    params.update({f"text_encoder_2.{n}": p for n, p in pipe.text_encoder_2.named_parameters()})
    params["logit_scale"] = logit_scale
    loop = StageLoop(cfg, "clip", params, acc, log)
    world = world_for(cfg)
    size = int(cfg["model"]["anystory"].get("reference_size", 512))

    def step():
        pixels, names = clip_batch(pipe, world, loop.step, int(scfg["batch_size"]), device, size)
        with acc.autocast():
            loss, accuracy = contrastive_loss(pipe, pixels, names, logit_scale)
        loop.update(loss, accuracy=accuracy.item())

    loop.run(step, ema=False)  # the encoders are used as trained (EMA is not read here)
    pipe.image_encoder.eval().requires_grad_(False)
    pipe.text_encoder_2.eval().requires_grad_(False)
    with torch.no_grad():
        pixels, names = clip_batch(pipe, world_for(cfg, "heldout"), 0, 128, device, size, split="heldout")
        _, held_acc = contrastive_loss(pipe, pixels, names, logit_scale)
    log(f"[clip] held-out image->name top-1 accuracy {held_acc.item():.3f} (batch of 128)")
    os.makedirs(stage_dir(cfg, "clip"), exist_ok=True)
    return {"heldout_top1": held_acc.item(), "seconds": loop.seconds}


if __name__ == "__main__":
    from anystory.training.runner import run_stages

    raise SystemExit(run_stages(only=("clip",)))
