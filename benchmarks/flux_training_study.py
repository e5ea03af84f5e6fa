"""Does FLUX training teach the router and the subject path? Tiny FLUX components (built in code, random base),
the synthetic world at 32 px, both FLUX stages trained by the real trainer, measured before and after on held-out
two-subject scenes (another world seed than training's), with bootstrap 95% intervals over scenes.

    python -m benchmarks.flux_training_study --steps 500 --router-steps 800 --pairs 60

Per held-out scene, one denoising prediction at noise level ``--sigma`` with a generic caption ("two objects on
..."), so what a subject looks like can come only from its reference:

- router mIoU: every routed block's hard map against the ground-truth masks, on subject tokens (the FLUX router
  has no background class), averaged over blocks;
- region error: distance between the predicted clean latent's mean over a subject's tokens and the true one's
  (the tiny VAE is random, so colour is read in its latent space, a fixed function of the pixels; lower is
  better);
- leakage: share of subject regions whose predicted mean is nearer the *other* subject's true mean than its own,
  with the router on and off (off: every image token sees both subjects' tokens).

Nothing is tuned on the held-out scenes: the training config (configs/flux_tiny.yaml, steps and batch from the
command line) was fixed before measuring.
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
from anystory.training.flux_stages import load_stage_input
from anystory.training.runner import run_stages
from anystory.training.flux_step import (StepInputs, conditioned_prediction, encode_latents, encode_text,
                                         subject_labels, subject_miou, token_cover)
from anystory.routing import route_decision
from benchmarks.routing_study import bootstrap, mean_of

CONFIG = "configs/flux_tiny.yaml"
HELDOUT_SEED = 515151  # training draws from world seed 0
METRICS = (("miou", "router mIoU (routed)"), ("error_routed", "region error, router on"),
           ("error_unrouted", "region error, router off"), ("error_none", "region error, no subjects"), ("leak_routed", "leakage, router on"),
           ("leak_unrouted", "leakage, router off"))


def region_terms(x0_hat: torch.Tensor, x0: torch.Tensor, labels: torch.Tensor):
    """(mean region error, leakage share) of a two-subject scene from packed ``[I, C]`` latents."""
    true = [x0[labels == i].mean(0) for i in range(2)]
    pred = [x0_hat[labels == i].mean(0) for i in range(2)]
    errors = [float((pred[i] - true[i]).norm()) for i in range(2)]
    leaks = [float((pred[i] - true[1 - i]).norm() < (pred[i] - true[i]).norm()) for i in range(2)]
    return float(np.mean(errors)), float(np.mean(leaks))


@torch.no_grad()
def measure(pipe, cfg: dict, records: list, sigma: float) -> list:
    scfg = cfg["flux_router"]
    out = []
    for k, record in enumerate(records):
        captions, _ = choose_captions([record], [0.5], 1.0, 0.0)  # the generic caption
        embeds, pooled, text_ids = encode_text(pipe, captions, int(cfg["flux"]["max_sequence_length"]))
        latents, img_ids, grid = encode_latents(pipe, [record.image])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED + k))
        inputs = StepInputs(latents, noise, sigma, embeds, pooled, text_ids, img_ids, grid, HELDOUT_SEED + k)
        labels = subject_labels(token_cover(record.routing_target(), grid))
        if not all((labels == i).any() for i in range(2)):
            continue
        pipe.start_anystory_call()  # no subjects: the frozen base alone, the same before and after training
        plain = pipe.transformer(hidden_states=((1 - sigma) * latents + sigma * noise), timestep=torch.tensor([sigma]),
                                 guidance=torch.full((1,), float(scfg["guidance"])), pooled_projections=pooled,
                                 encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=img_ids, return_dict=False)[0]
        row = {"error_none": region_terms(((1 - sigma) * latents + sigma * noise - sigma * plain)[0], latents[0],
                                          labels)[0]}
        for routed in (True, False):
            pred, logits = conditioned_prediction(pipe, scfg, record, inputs, teacher=False, use_router=routed)
            x0_hat = ((1 - sigma) * latents + sigma * noise - sigma * pred)[0]  # x_t - sigma * v
            tag = "routed" if routed else "unrouted"
            row[f"error_{tag}"], row[f"leak_{tag}"] = region_terms(x0_hat, latents[0], labels)
            if logits:
                row["miou"] = float(np.mean([subject_miou(route_decision(b[0].T, dim=1), labels, 2) for b in logits]))
        out.append(row)
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


def _fmt(c: dict) -> str:
    return f"{c['value']:+.3f} [{c['lo']:+.3f}, {c['hi']:+.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="steps of the flux_subject stage")
    p.add_argument("--router-steps", type=int, default=800, help="steps of the flux_router stage")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--pairs", type=int, default=60, help="held-out two-subject scenes")
    p.add_argument("--sigma", type=float, default=0.6)
    p.add_argument("--out", default=None, help="results.json folder (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = args.out or tempfile.mkdtemp(prefix="flux_training_study_")
    cfg = load_config(CONFIG, {"work_dir": work})
    world = SyntheticWorld(HELDOUT_SEED, WorldConfig(**cfg["world"]))
    source = SyntheticSource(world)
    records = [source.record("stage2", i, 2) for i in range(args.pairs)]
    started = time.time()
    before = measure(load_stage_input(cfg, "flux_subject"), cfg, records, args.sigma)
    run = ["--config", CONFIG, "--set", f"work_dir={work}", "--set", "trackers=[]", "--set", "log_every=50",
           "--set", "save_every=1000000"]
    for stage, steps in (("flux_subject", args.steps), ("flux_router", args.router_steps)):
        run += ["--set", f"{stage}.steps={steps}", "--set", f"{stage}.batch_size={args.batch}",
                "--set", f"{stage}.heldout_batches=0"]
    run_stages(run, log=print)
    pipe = load_stage_input(cfg, "flux_subject")
    pipe.load_anystory_weights(os.path.join(work, "flux_router", "anystory"), redux_base=pipe.redux_embedder)
    after = measure(pipe, cfg, records, args.sigma)
    kept = [i for i in range(min(len(before), len(after)))]
    table = summarise([before[i] for i in kept], [after[i] for i in kept])
    print(f"\n{len(kept)} held-out two-subject scenes (world seed {HELDOUT_SEED}), sigma {args.sigma}, "
          f"{args.steps} + {args.router_steps} steps x batch {args.batch}; {time.time() - started:.0f} s")
    print(f"{'metric':28s} {'before':>24s} {'after':>24s} {'after - before':>24s}")
    for key, name in METRICS:
        row = table[key]
        print(f"{name:28s} {_fmt(row['before']):>24s} {_fmt(row['after']):>24s} {_fmt(row['after_minus_before']):>24s}")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"args": vars(args), "table": table, "before": before, "after": after}, f, indent=1)
    print(f"results: {os.path.join(work, 'results.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
