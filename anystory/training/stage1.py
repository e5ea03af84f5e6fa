"""Stage 1: train the subject encoder on paired data (reference view -> target scene).

Trained: the ReferenceNet (initialised from the UNet), the semantic QFormer and the decoupled key/value
projections of every cross-attention layer. Frozen: UNet, VAE, text encoders, CLIP image encoder, router.
``stage1.train_unet: true`` would also fine-tune the UNet; every shipped config leaves it off (the default): with
SDXL as in the paper, and in the miniature because a tuned UNet forgets how to draw from text alone.
Routing is the ground truth (teacher routing), so the encoder learns in the regime inference uses it in.

    python -m anystory.training.stage1 --config configs/miniature.yaml
"""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from .components import anystory_config
from .data import source_for
from .diffusion import training_scheduler
from .loop import StageLoop, TrainedModules, make_accelerator
from .subject_step import subject_step


def stage1_parameters(adapter) -> dict:
    keep = ("reference_net.", "semantic_qformer.", "layer_conditioning.")
    params = {}
    for n, p in adapter.named_parameters():
        if n.startswith(keep[:2]) or (n.startswith(keep[2]) and (".to_k_sem." in n or ".to_v_sem." in n)):
            params[f"anystory.{n}"] = p
    return params


def freeze_all(pipe) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder", "anystory"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)


def evaluate(cfg: dict, stage: str, pipe, batches: int = 3, teacher_routing: bool = True):
    """Losses on fixed held-out batches (same scenes, noise and timesteps every time): comparable across runs.
    ``None`` when the stage trains on a dataset and the config names no ``data.heldout``."""
    source = source_for(cfg, stage, "heldout")
    if source is None:
        return None
    scheduler = training_scheduler(pipe)
    rows = []
    with torch.no_grad(), mixed_autocast(pipe):
        for k in range(batches):
            gen = torch.Generator().manual_seed(1000 + k)
            torch.manual_seed(2000 + k)  # Gumbel noise
            out = subject_step(cfg, stage, pipe, source, scheduler, k, 8, gen, teacher_routing,
                               float(cfg["stage2"]["routing_weight"]), count=1 + k % 3, data_stage="heldout")
            rows.append({key: float(v) for key, v in out.items()})
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}


def mixed_autocast(pipe):
    """Autocast to the frozen components' half precision when they have one (``frozen_dtype``), outside training
    steps (held-out losses, samples) as inside them."""
    low = pipe.unet.dtype
    if pipe.anystory is None or low == pipe.anystory.dtype:
        return nullcontext()
    return torch.autocast(pipe.unet.device.type, dtype=low)


def prepare_training(cfg: dict, pipe, acc) -> None:
    """Device and memory settings both stages share: frozen components' dtype, gradient checkpointing of the UNet
    and the ReferenceNet."""
    pipe.to(acc.device)
    if cfg.get("frozen_dtype"):  # frozen components in bf16 / fp16 (half their memory); trained ones stay fp32
        dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}.get(cfg["frozen_dtype"], cfg["frozen_dtype"]))
        frozen = ["vae", "text_encoder", "text_encoder_2", "image_encoder"]
        if not cfg["stage1"].get("train_unet"):
            frozen.append("unet")
        for name in frozen:
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).to(dtype)
    if cfg.get("gradient_checkpointing"):
        from .checkpointing import enable

        enable(pipe)


def sampler(cfg: dict, stage: str, pipe):
    """What the loop calls every ``sample_every`` steps: a held-out sample and its routing map, for the trackers."""
    from .tracking import routing_sample

    held = source_for(cfg, stage, "heldout")
    source, key = (held, "heldout") if held is not None else (source_for(cfg, stage), stage)
    counts = [n + 1 for n, w in enumerate(cfg[stage]["subjects"]) if w > 0]
    records = [source.record(key, 0, n) for n in sorted({counts[0], counts[-1]})]

    def images():
        with mixed_autocast(pipe):
            return {f"{stage}/sample_{len(r.references)}_subjects": routing_sample(pipe, r) for r in records}

    return images


def train_stage1(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["stage1"]
    acc = make_accelerator(cfg, "stage1")
    pipe.to(acc.device)
    if pipe.anystory is None:
        torch.manual_seed(int(cfg["seed"]))
        pipe.init_anystory(**anystory_config(cfg))
    prepare_training(cfg, pipe, acc)
    freeze_all(pipe)
    params = stage1_parameters(pipe.anystory)
    modules = {"anystory": pipe.anystory}
    if scfg.get("train_unet"):  # off in the shipped configs (the docstring says why)
        params.update({f"unet.{n}": p for n, p in pipe.unet.named_parameters()})
        modules["unet"] = pipe.unet
    for p in params.values():
        p.requires_grad_(True)
    pipe.anystory.train()
    source = source_for(cfg, "stage1")
    scheduler = training_scheduler(pipe)
    step = TrainedModules(lambda step, micro, gen: subject_step(
        cfg, "stage1", pipe, source, scheduler, step, loop.global_batch, gen, teacher_routing=True,
        rows=loop.rows(micro)), **modules)
    loop = StageLoop(cfg, "stage1", params, acc, log, module=step)
    if cfg.get("sample_every"):
        loop.images = sampler(cfg, "stage1", pipe)
    before = loop.run(before=lambda: evaluate(cfg, "stage1", pipe))
    freeze_all(pipe)
    pipe.anystory.eval()
    after = evaluate(cfg, "stage1", pipe)
    if after:
        log(f"[stage1] held-out diffusion loss {after['diffusion']:.4f}"
            + (f" (before training {before['diffusion']:.4f})" if before else ""))
    return {"heldout_before": before, "heldout_after": after, "seconds": loop.seconds}


if __name__ == "__main__":
    from anystory.training.runner import run_stages

    raise SystemExit(run_stages(only=("stage1",)))
