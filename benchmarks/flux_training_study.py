"""Does FLUX training teach the router and the subject path? Tiny FLUX components built in code, the synthetic
world at 32 px; with ``--base-steps`` the tiny base first learns the world from captions (stage ``flux_base``, as
FLUX.1-dev comes trained), then both AnyStory stages are trained by the real trainer and measured before and after
on held-out two-subject scenes (another world seed than training's), with bootstrap 95% intervals over scenes.

    python -m benchmarks.flux_training_study --base-steps 3000 --steps 500 --router-steps 800 --pairs 60

Per held-out scene, one denoising prediction at noise level ``--sigma`` with a generic caption ("two objects on
..."), so what a subject looks like can come only from its reference:

- router mIoU: every routed block's hard map against the ground-truth masks, on subject tokens (the FLUX router
  has no background class), averaged over blocks;
- region error: distance between the predicted clean latent's mean over a subject's tokens and the true one's
  (the tiny VAE is random, so colour is read in its latent space, a fixed function of the pixels; lower is
  better);
- leakage: share of subject regions whose predicted mean is nearer the *other* subject's true mean than its own;
  leakage axis: where that mean lies from its own true mean (0) to the other's (1).

Each with the router on, off (every image token sees both subjects' tokens), the ground-truth routing forced
and the ground truth swapped (each region sees only the other subject's tokens). The last two are controls: a
subject path that carries what a subject looks like leaks less under the ground truth than unrouted, and more
under the swapped one; if it does not, no router can lower leakage. After training, these routings are also
compared pairwise on the same scenes.

Nothing is tuned on the held-out scenes: settings are chosen on ``--tuning`` scenes (another world seed) and
passed with ``--set``; the training config is configs/flux_tiny.yaml, steps and batch from the command line.
Results: docs/training-flux.md, "Tiny-scale proof".
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from anystory.data.synthetic import SyntheticWorld, WorldConfig
from anystory.training.config import load_config
from anystory.training.data import SyntheticSource, choose_captions
from anystory.training.flux_config import RELEASE_STAGES
from anystory.training.flux_stages import load_stage_input
from anystory.training.runner import run_stages
from anystory.training.flux_step import (StepInputs, conditioned_prediction, encode_latents, encode_text,
                                         subject_labels, subject_miou, token_cover, truth_maps)
from anystory.routing import route_decision
from benchmarks.routing_study import bootstrap, mean_of

CONFIG = "configs/flux_tiny.yaml"
HELDOUT_SEED = 515151  # training draws from world seed 0
TUNING_SEED = 616161  # --tuning: the scenes settings were chosen on
#: how the subjects are routed in a measured prediction: the router, none, the ground truth, the ground truth swapped
MODES = (("routed", "router on"), ("unrouted", "router off"), ("truth", "ground-truth routing"),
         ("swapped", "swapped ground-truth routing"))
METRICS = (("miou", "router mIoU (routed)"), ("error_none", "region error, no subjects"),
           *((f"error_{m}", f"region error, {name}") for m, name in MODES),
           *((f"leak_{m}", f"leakage, {name}") for m, name in MODES),
           *((f"axis_{m}", f"leakage axis, {name}") for m, name in MODES))
#: paired contrasts after training: (name, minuend, subtrahend)
CONTRASTS = (("router on - off", "routed", "unrouted"), ("ground truth - off", "truth", "unrouted"),
             ("swapped - ground truth", "swapped", "truth"))


def region_terms(x0_hat: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor):
    """(mean region error, leakage share, leakage axis) of a two-subject scene from packed ``[I, C]`` latents. The
    axis is where a region's predicted mean lies on the line from its own true mean (0) to the other subject's (1),
    the continuous form of the share (nearer the other: past 0.5 on that line)."""
    true = [x0[labels == i].mean(0) for i in range(2)]
    pred = [x0_hat[labels == i].mean(0) for i in range(2)]
    errors = [float((pred[i] - true[i]).norm()) for i in range(2)]
    leaks = [float((pred[i] - true[1 - i]).norm() < (pred[i] - true[i]).norm()) for i in range(2)]
    axis = [float((pred[i] - true[i]) @ (true[1 - i] - true[i]) / (true[1 - i] - true[i]).square().sum())
            for i in range(2)]
    return float(np.mean(errors)), float(np.mean(leaks)), float(np.mean(axis))


def _plain_prediction(pipe, inputs: StepInputs, guidance: float) -> torch.Tensor:
    """The frozen base alone (no subjects): the same before and after training."""
    pipe.start_anystory_call()
    noisy = (1 - inputs.sigma) * inputs.latents + inputs.sigma * inputs.noise
    return pipe.transformer(hidden_states=noisy, timestep=torch.tensor([inputs.sigma]),
                            guidance=torch.full((1,), guidance), pooled_projections=inputs.pooled,
                            encoder_hidden_states=inputs.embeds, txt_ids=inputs.text_ids, img_ids=inputs.img_ids,
                            return_dict=False)[0]


@torch.no_grad()
def measure(pipe, cfg: dict, records: list, sigma: float, seed: int = HELDOUT_SEED) -> list:
    scfg = cfg["flux_router"]
    out = []
    for k, record in enumerate(records):
        captions, _ = choose_captions([record], [0.5], 1.0, 0.0)  # the generic caption
        embeds, pooled, text_ids = encode_text(pipe, captions, int(cfg["flux"]["max_sequence_length"]))
        latents, img_ids, grid = encode_latents(pipe, [record.image])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed + k))
        inputs = StepInputs(latents, noise, sigma, embeds, pooled, text_ids, img_ids, grid, seed + k)
        cover = token_cover(record.routing_target(), grid)
        labels = subject_labels(cover)
        if not all((labels == i).any() for i in range(2)):
            continue
        x_t = (1 - sigma) * latents + sigma * noise
        row = dict(zip(("error_none", "leak_none", "axis_none"),
                       region_terms((x_t - sigma * _plain_prediction(pipe, inputs, float(scfg["guidance"])))[0],
                                    latents[0], labels)))
        truth = truth_maps(cover)
        for mode, _ in MODES:
            maps = {"truth": truth, "swapped": truth.flip(0)}.get(mode)
            pred, logits = conditioned_prediction(pipe, scfg, record, inputs, teacher=False,
                                                  use_router=mode == "routed", maps=maps)
            x0_hat = (x_t - sigma * pred)[0]  # x_t - sigma * v
            row[f"error_{mode}"], row[f"leak_{mode}"], row[f"axis_{mode}"] = region_terms(x0_hat, latents[0], labels)
            if logits:
                row["miou"] = float(np.mean([subject_miou(route_decision(b[0].T, dim=1), labels, 2) for b in logits]))
        out.append(row)
    pipe.start_anystory_call()  # end the call: leave no subjects behind
    return out


def summarise(before: list, after: list) -> dict:
    table = {}
    for key, _ in METRICS:
        pairs = [(b.get(key), a.get(key)) for b, a in zip(before, after)]
        table[key] = {"before": bootstrap([p[0] for p in pairs], mean_of, 1),
                      "after": bootstrap([p[1] for p in pairs], mean_of, 2),
                      "after_minus_before": bootstrap(
                          [None if None in p else p[1] - p[0] for p in pairs], mean_of, 3)}
    return table


def contrasts(rows: list) -> dict:
    """Paired differences between routings on the same scenes (leakage share and axis), bootstrapped."""
    return {name: {kind: bootstrap([r[f"{kind}_{a}"] - r[f"{kind}_{b}"] for r in rows], mean_of, 4)
                   for kind in ("leak", "axis", "error")} for name, a, b in CONTRASTS}


def _fmt(c: dict) -> str:
    return f"{c['value']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def _train(work: str, args, stages) -> str:
    """``stages`` by the real trainer (a finished stage in ``work`` is kept: ``--out`` reuses a run); the folder
    of the last one's weights."""
    run = ["--config", CONFIG, "--set", f"work_dir={work}", "--set", "trackers=[]", "--set", "log_every=50",
           "--set", "save_every=1000000", "--set", f"flux_base.steps={args.base_steps}",
           "--set", f"flux_base.batch_size={args.base_batch}"] + [x for item in args.set for x in ("--set", item)]
    for stage, steps in (("flux_subject", args.steps), ("flux_router", args.router_steps)):
        run += ["--set", f"{stage}.steps={steps}", "--set", f"{stage}.batch_size={args.batch}",
                "--set", f"{stage}.heldout_batches=0"]
    run_stages(run + ["--stages", ",".join(stages)], log=print)
    return os.path.join(work, stages[-1], "anystory")


def _report(table: dict, paired: dict, header: str) -> None:
    print(header)
    print(f"{'metric':44s} {'before':>24s} {'after':>24s} {'after - before':>24s}")
    for key, name in METRICS:
        row = table[key]
        print(f"{name:44s} {_fmt(row['before']):>24s} {_fmt(row['after']):>24s} "
              f"{_fmt(row['after_minus_before']):>24s}")
    print(f"\n{'after training, paired over scenes':40s} {'leakage share':>24s} {'leakage axis':>24s} "
          f"{'region error':>24s}")
    for name, row in paired.items():
        print(f"{name:40s} {_fmt(row['leak']):>24s} {_fmt(row['axis']):>24s} {_fmt(row['error']):>24s}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="steps of the flux_subject stage")
    p.add_argument("--router-steps", type=int, default=800, help="steps of the flux_router stage (0: not trained; "
                   "the subject path is measured after its stage, the router as it starts)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--base-steps", type=int, default=0, help="steps of the flux_base stage, trained first: the tiny "
                   "base learns the world from captions, so the measured 'before' is a base that can denoise "
                   "(0: the random base)")
    p.add_argument("--base-batch", type=int, default=8)
    p.add_argument("--pairs", type=int, default=60, help="held-out two-subject scenes")
    p.add_argument("--sigma", type=float, default=0.6)
    p.add_argument("--set", action="append", default=[], help="a training config override (KEY=VALUE), repeatable")
    p.add_argument("--tuning", action="store_true", help=f"measure the tuning scenes (world seed {TUNING_SEED}), "
                   "where settings are chosen, instead of the held-out ones")
    p.add_argument("--out", default=None, help="results.json folder and training run (default: a temporary "
                   "folder); stages already finished there are not trained again")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = args.out or tempfile.mkdtemp(prefix="flux_training_study_")
    seed = TUNING_SEED if args.tuning else HELDOUT_SEED
    cfg = load_config(CONFIG, {"work_dir": work})
    started = time.time()
    if args.base_steps:
        _train(work, args, ("flux_base",))
    source = SyntheticSource(SyntheticWorld(seed, WorldConfig(**cfg["world"])))
    records = [source.record("stage2", i, 2) for i in range(args.pairs)]
    before = measure(load_stage_input(cfg, "flux_subject"), cfg, records, args.sigma, seed)
    trained = _train(work, args, RELEASE_STAGES if args.router_steps else RELEASE_STAGES[:1])
    pipe = load_stage_input(cfg, "flux_subject")
    pipe.load_anystory_weights(trained, redux_base=pipe.redux_embedder)
    after = measure(pipe, cfg, records, args.sigma, seed)
    table, paired = summarise(before, after), contrasts(after)
    _report(table, paired, f"\n{len(after)} {'tuning' if args.tuning else 'held-out'} two-subject scenes (world seed "
            f"{seed}), sigma {args.sigma}, base {args.base_steps} x {args.base_batch}, "
            f"{args.steps} + {args.router_steps} steps x batch {args.batch}"
            f"{', ' + ' '.join(args.set) if args.set else ''}; {time.time() - started:.0f} s")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"args": vars(args), "table": table, "paired": paired, "before": before, "after": after}, f,
                  indent=1)
    print(f"results: {os.path.join(work, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
