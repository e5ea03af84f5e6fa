"""Router training on the model's own sampling trajectories (after stage 2; only the routers are trained).

Why: stage 2 teaches each layer's router to find subjects in *noised training images*. In sampling, the early
latents are the sampler's own noise, and where each object will form is decided by the trajectory, not by a
training image: the router's early maps disagree with where the objects end up, so each subject's conditions act
for a few steps on the other subject's future object (the miniature's attribute leakage: docs/experiments/
routing-study.md). Here the model samples held-in training scenes (training world, seed ``cfg.seed``: never the study's
held-out world) with its inference rule, every router's input (the layer's latent and the routing tokens) is
recorded at every step, and the objects finally drawn (found by chroma, assigned to subjects by the identity
classifier, :func:`drawn_objects`) become the targets of *every* step. Training is then the routers alone on the
recorded inputs (cross-entropy against the drawn objects' area fractions at each layer's resolution): cheap, as
the UNet does not run. The recorded inputs come from the old routers' earlier layers (off-policy); the routing
study measures the result in sampling.

With ``combine_weight`` set, the stage-2 routers are kept and a copy of them (the *trajectory routers*) is trained
instead; inference adds both routers' adjusted logits (``anystory/sdxl/router.py``, "Trajectory router"). Alone,
the retrained routers confine better early but send each subject to less of its own object (docs/experiments/
routing-study.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from ..data.identity_classifier import IdentityClassifier, object_crop
from ..data.object_finder import find_objects
from ..cli_options import add_miniature_sampling
from ..data.synthetic import COLOURS, SHAPES, SyntheticWorld, WorldConfig
from ..presets import MINIATURE
from .data import area_targets
from .subject_step import dilated_targets


def drawn_objects(image: np.ndarray, subjects, classifier: IdentityClassifier) -> list:
    """For each subject, the mask of the object drawn for it (or None): among the largest objects, the assignment
    that makes the objects look most like their subjects (the classifier's joint shape x colour x texture
    likelihood). Shape alone is not enough: on the miniature's blobby drawings the shape head is near chance, and
    an assignment by it alone is a coin toss."""
    objects = find_objects(image)[: len(subjects) + 2]
    if not objects:
        return [None] * len(subjects)
    p = classifier.probabilities([object_crop(image, m) for m in objects])
    cost = -np.stack([np.log(p["shape"][:, SHAPES.index(s.shape)] + 1e-6)
                      + np.log(p["colour"][:, list(COLOURS).index(s.colour)] + 1e-6)
                      + np.log(p["texture"][:, s.labels[2]] + 1e-6) for s in subjects], 1)  # [objects, subjects]
    out: List[Optional[np.ndarray]] = [None] * len(subjects)
    for r, c in zip(*linear_sum_assignment(cost)):
        out[c] = objects[r]
    return out


@dataclass
class Trajectory:
    """One sample's router inputs: ``latents[layer]`` ``[steps, L, C]`` (float16), ``tokens`` ``[N+1, D]``, and
    ``target`` ``[N+1, H, W]``: the drawn objects (then background), one-hot at image resolution."""

    latents: Dict[str, torch.Tensor]
    tokens: torch.Tensor
    target: torch.Tensor


def router_layers(adapter, kind: str = "router") -> Dict[str, torch.nn.Module]:
    """Each layer's router (``kind="trajectory_router"``: its trajectory router), by the layer's module name."""
    return {n[: -len(kind) - 1]: m for n, m in adapter.named_modules() if n.endswith("." + kind)}


def router_parameters(adapter, kind: str = "router") -> dict:
    """The routers' tensors (what this stage trains; the routing QFormer and everything else stay frozen)."""
    return {f"anystory.{n}": p for n, p in adapter.named_parameters() if f".{kind}." in n}


@torch.no_grad()
def record_trajectories(pipe, classifier: IdentityClassifier, world: SyntheticWorld, indices: Sequence[int],
                        subjects: int = 2, steps: int = MINIATURE.steps, guidance: float = MINIATURE.guidance,
                        log=print) -> List[Trajectory]:
    """Sample scene ``index`` of ``world`` (its references, its generic caption, seed ``index``) for every index;
    keep the samples where every subject's object was found."""
    from ..subjects import Subject

    layers = router_layers(pipe.anystory)
    calls: Dict[str, list] = {name: [] for name in layers}
    tokens: list = []

    def hook(name):
        def record(module, args, output):
            calls[name].append(args[0][-1:].detach().to(torch.float16).cpu())  # the conditional sample
            if name == next(iter(layers)) and not tokens:
                tokens.append(args[1][-1].detach().float().cpu())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    out: List[Trajectory] = []
    try:
        for index in indices:
            for c in calls.values():
                c.clear()
            tokens.clear()
            sample = world.sample(int(index), count=subjects)
            refs = [Subject(r.image) for r in sample.references]
            image = pipe(sample.scene.generic_caption, subjects=refs, num_inference_steps=steps,
                         guidance_scale=guidance, generator=torch.Generator().manual_seed(int(index)),
                         output_type="np").images[0]
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            masks = drawn_objects(image, [r.identity for r in sample.references], classifier)
            if any(m is None for m in masks):
                continue
            fg = np.stack(masks).astype(np.float32)
            target = torch.from_numpy(np.concatenate([fg, 1 - fg.sum(0, keepdims=True)]))
            out.append(Trajectory({n: torch.cat(c) for n, c in calls.items()}, tokens[0], target))
            if log and len(out) % 20 == 0:
                log(f"[trajectory] {len(out)} samples recorded ({index + 1 - indices[0]} sampled)")
    finally:
        for h in handles:
            h.remove()
    return out


def trajectory_loss(adapter, batch: List[Trajectory], steps: torch.Tensor, kind: str = "router") -> torch.Tensor:
    """Mean over layers of the cross-entropy between each router's logits at the recorded step and the drawn
    objects' area fractions at the layer's resolution."""
    tokens = torch.stack([t.tokens for t in batch])
    targets = torch.stack([t.target for t in batch])  # [B, N+1, H, W]
    losses = []
    for name, router in router_layers(adapter, kind).items():
        latent = torch.stack([t.latents[name][int(s)] for t, s in zip(batch, steps)]).float()  # [B, L, C]
        side = int(math.isqrt(latent.shape[1]))
        gt = area_targets(targets, (side, side)).flatten(2)
        logits = router(latent, tokens)
        losses.append(-(gt * logits.float().log_softmax(1)).sum(1).mean())
    return torch.stack(losses).mean()


@torch.no_grad()
def decision_agreement(adapter, data: List[Trajectory], step: int, background_bias: float,
                       kind: str = "router") -> float:
    """Share of the drawn objects' positions whose adjusted argmax at ``step`` is their own subject (all layers)."""
    hits, total = 0.0, 0.0
    for name, router in router_layers(adapter, kind).items():
        latent = torch.stack([t.latents[name][step] for t in data]).float()
        side = int(math.isqrt(latent.shape[1]))
        gt = area_targets(torch.stack([t.target for t in data]), (side, side)).flatten(2)
        logits = router(latent, torch.stack([t.tokens for t in data])).float()
        logits[:, -1] -= background_bias
        pred = F.one_hot(logits.argmax(1), logits.shape[1]).movedim(-1, 1)
        hits += float((pred[:, :-1] * gt[:, :-1]).sum())
        total += float(gt[:, :-1].sum())
    return hits / max(total, 1e-9)


def train_routers(adapter, data: List[Trajectory], iterations: int, lr: float, batch_size: int, seed: int,
                  log=print, heldout: Optional[List[Trajectory]] = None, background_bias: float = 0.0,
                  kind: str = "router") -> dict:
    """Adam on the routers' tensors, ``iterations`` batches of (trajectory, step) drawn uniformly."""
    params = list(router_parameters(adapter, kind).values())
    for p in adapter.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps = next(iter(data[0].latents.values())).shape[0]
    before = decision_agreement(adapter, heldout, 0, background_bias, kind) if heldout else None
    started, losses = time.time(), []
    for it in range(iterations):
        pick = torch.randint(len(data), (batch_size,), generator=gen)
        loss = trajectory_loss(adapter, [data[int(i)] for i in pick], torch.randint(steps, (batch_size,), generator=gen),
                               kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log and (it + 1) % 50 == 0:
            log(f"[trajectory] iteration {it + 1}/{iterations}: loss {np.mean(losses[-50:]):.4f}")
    for p in params:
        p.requires_grad_(False)
    after = decision_agreement(adapter, heldout, 0, background_bias, kind) if heldout else None
    return {"iterations": iterations, "loss_first50": float(np.mean(losses[:50])), "loss_last50": float(np.mean(losses[-50:])),
            "heldout_step0_agreement_before": before, "heldout_step0_agreement_after": after,
            "seconds": round(time.time() - started, 1)}


def grown(data: List[Trajectory], radius: int) -> List[Trajectory]:
    """The recordings with each drawn object grown by ``radius`` pixels (``stage2.routing_dilation``): the routers
    learn the regions stage 1 conditioned (``subject_step.dilated_targets``), not the outlines themselves."""
    if radius <= 0:
        return data
    return [dataclasses.replace(d, target=dilated_targets(d.target[None].float(), radius)[0]) for d in data]


def retrain_routers(pipe, classifier: IdentityClassifier, world: SyntheticWorld, settings: dict, log=print,
                    cache: Optional[str] = None) -> dict:
    """Record ``settings["samples"]`` trajectories (world indices from ``first_index``), then train the routers on
    them (7/8; the first 1/8 are held out for the step-0 agreement). ``cache``: a torch file that keeps the
    recordings (reused when it exists). With ``settings["combine_weight"]`` the recordings are the stage-2 routers'
    and a copy of them is trained as the trajectory routers, with ``settings["trajectory_background_bias"]``."""
    started = time.time()
    if cache and os.path.isfile(cache):
        data = [Trajectory(**d) for d in torch.load(cache, weights_only=True)]
    else:
        first = int(settings.get("first_index", 100_000))
        pipe.anystory.eval()
        data = record_trajectories(pipe, classifier, world, range(first, first + int(settings["samples"])),
                                   steps=int(settings.get("sample_steps", MINIATURE.steps)),
                                   guidance=float(settings.get("guidance", MINIATURE.guidance)), log=log)
        if cache:
            torch.save([vars(d) for d in data], cache)
    if not data:
        raise RuntimeError("no trajectory kept a drawn object for every subject: nothing to train the routers on")
    data = grown(data, int(settings.get("routing_dilation", 0)))
    recorded = time.time() - started
    held = max(1, len(data) // 8)
    kind, bias = "router", float(pipe.anystory.config.routing_background_bias)
    if settings.get("combine_weight"):
        kind, bias = "trajectory_router", float(settings["trajectory_background_bias"])
        pipe.anystory.add_trajectory_routers(float(settings["combine_weight"]), bias)
    result = train_routers(pipe.anystory, data[held:], int(settings["iterations"]), float(settings["lr"]),
                           int(settings["batch_size"]), int(settings.get("seed", 0)), log=log, heldout=data[:held],
                           background_bias=bias, kind=kind)
    pipe.anystory.eval()
    log(f"[trajectory] {len(data)} trajectories ({recorded:.0f} s), routers trained {result['seconds']:.0f} s; held-out "
        f"step-0 agreement {result['heldout_step0_agreement_before']:.3f} -> {result['heldout_step0_agreement_after']:.3f}")
    return {"trajectories": len(data), "record_seconds": round(recorded, 1), **result}


def train_trajectory(cfg: dict, pipe, log=print, trajectory_background_bias: Optional[float] = None) -> dict:
    """Stage 2's last part when ``stage2.trajectory`` is set (after the inference rule is stored: it samples with
    it, all but the gap between subjects, stored after it).
    ``trajectory_background_bias``: the trajectory routers' adjustment when ``combine_weight`` is set."""
    from .data import world_for

    settings = dict(cfg["stage2"]["trajectory"], trajectory_background_bias=trajectory_background_bias,
                    routing_dilation=cfg["stage2"].get("routing_dilation", 0))
    classifier = IdentityClassifier.load(settings["classifier"])
    return retrain_routers(pipe, classifier, world_for(cfg, "train"), settings, log)


def main(argv=None) -> int:
    """Retrain the routers of a miniature folder in place (its other tensors and metadata are kept)."""
    p = argparse.ArgumentParser(prog="python -m anystory.training.trajectory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_sampling(p, required=True)  # --model: its anystory.safetensors router tensors are replaced
    p.add_argument("--samples", type=int, default=240, help="scenes sampled (those with every object found are kept)")
    p.add_argument("--iterations", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--first-index", type=int, default=100_000, help="first training-world (seed 0) scene sampled")
    p.add_argument("--cache", default=None, help="keep / reuse the recorded trajectories here (torch file)")
    p.add_argument("--background-bias", type=float, default=None,
                   help="also store this inference background logit adjustment in <model>/anystory_config.json "
                        "(with --combine-weight: the trajectory routers' own; required there)")
    p.add_argument("--combine-weight", type=float, default=None,
                   help="keep the routers, train a copy as trajectory routers and add their logits with this weight")
    args = p.parse_args(argv)
    if args.combine_weight is not None and (args.combine_weight <= 0 or args.background_bias is None):
        p.error("--combine-weight needs a weight > 0 and --background-bias (the trajectory routers' adjustment)")
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    from ..sdxl.miniature import load_miniature
    from ..weights import load_tensors, read_metadata, save_tensors

    dlog.disable_progress_bar()
    pipe = load_miniature(path=args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = IdentityClassifier.load(args.classifier or os.path.join(args.model, "identity_classifier.safetensors"))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    world = SyntheticWorld(0, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))
    settings = {"samples": args.samples, "iterations": args.iterations, "lr": args.lr, "batch_size": args.batch_size,
                "first_index": args.first_index, "sample_steps": args.steps, "guidance": args.guidance}
    if args.combine_weight is not None:
        settings.update(combine_weight=args.combine_weight, trajectory_background_bias=args.background_bias)
    print(retrain_routers(pipe, classifier, world, settings, cache=args.cache))
    path = os.path.join(args.model, "anystory.safetensors")
    tensors = load_tensors(path)
    dtype = next(iter(tensors.values())).dtype
    for k, v in pipe.anystory.state_dict().items():
        if ".router." in k or ".trajectory_router." in k:
            tensors[k] = v.to(tensors[k].dtype if k in tensors else dtype)  # new keys: the file's dtype
    save_tensors(tensors, path, metadata=read_metadata(path))
    if args.background_bias is not None:
        config_path = os.path.join(args.model, "anystory_config.json")
        with open(config_path) as f:
            config = json.load(f)
        if args.combine_weight is not None:
            config.update(routing_trajectory_weight=args.combine_weight,
                          routing_trajectory_background_bias=args.background_bias)
        else:
            config["routing_background_bias"] = args.background_bias
        with open(config_path, "w") as f:
            json.dump(config, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
