"""Stage 2: train the router with the subject encoder frozen.

Trained: every cross-attention layer's router and the routing QFormer (the per-subject routing tokens).
Loss: diffusion loss (its gradient reaches the router through the straight-through Gumbel-softmax gates) plus
``routing_weight * mean ||M - M_gt||^2`` on the soft maps (paper: 0.1). Logged: both losses and router mIoU.
Afterwards the class priors of the training targets set the inference logit adjustment (``router.py``):
``logit_adjustment_tau * log(p_background / p_subject)`` (Menon et al.'s tau; default 1; with
``logit_adjustment_tau_single`` a call with one subject gets its own, as nothing is there to keep it from), ``single_region``
(default off) and ``subject_gap`` (default 0) store the one-region-per-subject rule and the gap between subjects
with the weights; the gap is stored after the trajectory part, which samples without it. With ``trajectory`` set, the
routers are then trained on the model's own sampling trajectories (``trajectory.py``).

    python -m anystory.training.stage2 --config configs/miniature.yaml
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import SyntheticSource, source_for, subject_count
from .diffusion import training_scheduler
from .loop import StageLoop, TrainedModules, make_accelerator
from .stage1 import evaluate, freeze_all, prepare_training, sampler
from .subject_step import dilated_targets, subject_step


def stage2_parameters(adapter) -> dict:
    return {f"anystory.{n}": p for n, p in adapter.named_parameters()
            if n.startswith("routing_qformer.") or ".router." in n}


def routing_priors(cfg: dict, samples: int = 512) -> dict:
    """Mean area of the background and of one subject in stage 2's training scenes (its subject-count mix), each
    subject's region grown as the stage's routing targets are (``routing_dilation``)."""
    source = source_for(cfg, "stage2")
    rng = np.random.default_rng([int(cfg["seed"]), 6])
    background, subject = [], []
    radius = int(cfg["stage2"].get("routing_dilation", 0))
    for i in range(samples):
        count = subject_count(rng, cfg["stage2"]["subjects"])
        if isinstance(source, SyntheticSource):  # world index i (not the stage's stream), as the miniature measured
            target = source.world.sample(i, count=count).scene.routing_target()
        else:
            target = source.record("stage2", i, count).routing_target()
        target = dilated_targets(torch.from_numpy(target)[None].float(), radius)[0].numpy()
        background.append(float(target[-1].mean()))
        subject += [float(m.mean()) for m in target[:-1]]
    return {"background": float(np.mean(background)), "subject": float(np.mean(subject))}


def train_stage2(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["stage2"]
    if pipe.anystory is None:
        raise ValueError("stage 2 needs the stage-1 AnyStory weights loaded (run stage1 first)")
    trajectory = scfg.get("trajectory") or {}
    if trajectory.get("combine_weight") and trajectory.get("logit_adjustment_tau") is None:
        raise ValueError("stage2.trajectory.combine_weight needs logit_adjustment_tau (the trajectory routers' own)")
    acc = make_accelerator(cfg, "stage2")
    prepare_training(cfg, pipe, acc)
    freeze_all(pipe)
    params = stage2_parameters(pipe.anystory)
    for p in params.values():
        p.requires_grad_(True)
    pipe.anystory.train()  # straight-through Gumbel-softmax routing
    source = source_for(cfg, "stage2")
    scheduler = training_scheduler(pipe)
    weight = float(scfg["routing_weight"])
    step = TrainedModules(lambda step, micro, gen: subject_step(
        cfg, "stage2", pipe, source, scheduler, step, loop.global_batch, gen, teacher_routing=False,
        routing_weight=weight, rows=loop.rows(micro)), anystory=pipe.anystory)
    loop = StageLoop(cfg, "stage2", params, acc, log, module=step)
    if cfg.get("sample_every"):
        loop.images = sampler(cfg, "stage2", pipe)

    def measure_before():
        out = evaluate(cfg, "stage2", pipe, teacher_routing=False)
        pipe.anystory.train()
        return out

    before = loop.run(before=measure_before)
    freeze_all(pipe)
    pipe.anystory.train()  # held-out losses with the training-time (Gumbel) routing, comparable to the log
    after = evaluate(cfg, "stage2", pipe, teacher_routing=False)
    pipe.anystory.eval()
    if after:
        log(f"[stage2] held-out routing loss {after['routing']:.4f}, mIoU {after['miou']:.3f}"
            + (f" (before: {before['routing']:.4f}, {before['miou']:.3f})" if before else ""))
    priors = routing_priors(cfg)
    log_ratio = math.log(priors["background"] / priors["subject"])
    tau = float(scfg.get("logit_adjustment_tau", 1.0))
    bias = tau * log_ratio
    single_region = bool(scfg.get("single_region", False))
    tau_single = scfg.get("logit_adjustment_tau_single")
    bias_single = None if tau_single is None else float(tau_single) * log_ratio
    gap = int(scfg.get("subject_gap", 0))
    pipe.anystory.register_to_config(routing_background_bias=bias, routing_single_region=single_region,
                                     routing_background_bias_single=bias_single)
    log(f"[stage2] class priors: background {priors['background']:.3f}, one subject {priors['subject']:.3f} "
        f"-> inference background logit adjustment {tau:g} x log ratio = {bias:.3f}; one region per subject: "
        f"{'on' if single_region else 'off'}; gap between subjects: {gap}")
    out = {"heldout_before": before, "heldout_after": after, "seconds": loop.seconds, "routing_priors": priors,
           "routing_background_bias": bias, "logit_adjustment_tau": tau, "routing_single_region": single_region,
           "routing_background_bias_single": bias_single, "routing_subject_gap": gap}
    if scfg.get("trajectory"):  # the routers again, on the model's own sampling trajectories (trajectory.py)
        from .trajectory import train_trajectory

        tau = scfg["trajectory"].get("logit_adjustment_tau")
        # the retrained routers learn the drawn objects' prior: their own adjustment
        own = None if tau is None else float(tau) * log_ratio
        combine = scfg["trajectory"].get("combine_weight")
        out["trajectory"] = train_trajectory(cfg, pipe, log, own if combine else None)
        if own is not None and not combine:  # the retrained routers replace stage 2's, with their adjustment
            out["trajectory"]["routing_background_bias"] = own
            pipe.anystory.register_to_config(routing_background_bias=own)
        if own is not None:
            log(f"[stage2] after the trajectory part: {'trajectory routers' if combine else 'background'} logit "
                f"adjustment {tau:g} x log ratio = {own:.3f}" + (f", added with weight {combine:g}" if combine else ""))
    # stored last: the trajectory part samples without the gap (chosen on the tuning sets: miniature-diagnosis, 2.16)
    pipe.anystory.register_to_config(routing_subject_gap=gap)
    return out


if __name__ == "__main__":
    from anystory.training.runner import run_stages

    raise SystemExit(run_stages(only=("stage2",)))
