"""Background study on the miniature: does ``background=image`` carry a reference backdrop into the scene, and do
the subjects stay as they were?

    python -m benchmarks.background_study [--pairs 40] [--steps 20]

Held-out pairs of the routing study (two of the 16 named identities, a held-out seed of the world). The prompt
is "two objects": it names neither the subjects nor the backdrop, so the backdrop can only come from the
background reference, ``SyntheticWorld.background_reference(kind, k)`` (a view of the pair's backdrop kind never
seen in training). Per generated image:

* background match: the share of backdrop pixels (the unsaturated ones, the object finder's rule) whose nearest
  world backdrop colour is the reference's (:func:`background_match`); the same on the held-out scene itself
  (the world's own rendering: the ceiling of this measure);
* subject fidelity (the identity classifier; best of the 16 named identities, and colour) and attribute leakage
  (the other subject's colour in a subject's object), as in the routing study.

Modes: no background reference; the reference with the background parameters at zero (the background encoded
exactly as a subject is: no training); the trained background reference; and, for comparison, no reference but
a prompt that names the backdrop ("two objects on sand"). Every figure with a bootstrap 95% interval over pairs.

``--colour-timesteps 50,300,850,990`` adds, per timestep, the held-out backdrop colour error of the predicted clean
image with and without the reference (the background stage's evaluation, :func:`evaluate_background`, at that
timestep): where in the noise schedule the reference informs the backdrop's colour. ``--pairs 0`` runs only that.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

import numpy as np
import torch

from anystory import Subject
from anystory.cli_options import add_config, add_miniature_sampling
from anystory.data.identity_classifier import IdentityClassifier
from anystory.data.object_finder import foreground_mask
from anystory.data.synthetic import BACKGROUNDS, SyntheticWorld, WorldConfig
from benchmarks.routing_study import (STUDY_SEED, _to_uint8, bootstrap, ci, fidelity, held_out_pairs, leakage,
                                      match_objects, mean_of)

MODES = ("none", "untrained", "trained", "text")
LABELS = {"none": "no background reference", "untrained": "reference, untrained (subject encoding)",
          "trained": "reference, trained", "text": "no reference, backdrop named in the prompt"}


def background_match(image: np.ndarray, name: str) -> Optional[float]:
    """Share of the backdrop pixels of ``image`` (uint8 ``[H, W, 3]``) whose nearest world backdrop colour is
    backdrop ``name``'s; backdrop pixels are the unsaturated ones. ``None`` when there are none."""
    names = list(BACKGROUNDS)
    pixels = np.asarray(image)[~foreground_mask(image)].astype(np.float32)
    if not len(pixels):
        return None
    base = np.asarray([BACKGROUNDS[n] for n in names], np.float32)
    nearest = ((pixels[:, None] - base[None]) ** 2).sum(-1).argmin(1)
    return float((nearest == names.index(name)).mean())


def untrained_copy(pipe):
    """The pipeline's background parameters zeroed (the background encoded exactly as a subject); a restore hook."""
    saved = {k: v.detach().clone() for k, v in pipe.anystory.background.state_dict().items()}
    with torch.no_grad():
        for p in pipe.anystory.background.parameters():
            p.zero_()
    return lambda: pipe.anystory.background.load_state_dict(saved)


def generate(pipe, prompt: str, refs, background, steps: int, guidance: float, seed: int,
             start: Optional[float] = None) -> np.ndarray:
    extra = {} if background is None or start is None else {"background_start": start}
    out = pipe(prompt, subjects=refs, background=background, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="np", **extra)
    return _to_uint8(out.images[0])


def run(pipe, world, classifier, pairs, steps: int, guidance: float, modes, out_dir: Optional[str],
        start: Optional[float] = None) -> dict:
    rows = []
    for k, subjects, bg in pairs:
        refs = [Subject(world.reference(s, k, slot).image) for slot, s in enumerate(subjects)]
        reference = world.background_reference(bg, k)
        row = {"scene": background_match(world.scene(k, identities=subjects, background_name=bg).image, bg)}
        images = []
        for mode in modes:
            prompt = f"two objects on {bg}" if mode == "text" else "two objects"
            restore = untrained_copy(pipe) if mode == "untrained" else None
            try:
                image = generate(pipe, prompt, refs, reference if mode in ("untrained", "trained") else None,
                                 steps, guidance, seed=k, start=start)
            finally:
                if restore:
                    restore()
            masks = match_objects(image, subjects, classifier)
            fid = fidelity(image, masks, subjects, classifier)
            row[mode] = {"match": background_match(image, bg), "leakage": leakage(image, masks, subjects),
                         "named": fid["named"], "colour": fid["colour"]}
            images.append(image)
        rows.append(row)
        if out_dir and k < 12:
            from PIL import Image

            size = world.config.image_size
            strip = [np.asarray(r.image.convert("RGBA").resize((size, size))) for r in refs]
            strip = [s[..., :3] * (s[..., 3:] > 0) + 255 * (s[..., 3:] == 0) for s in strip]
            strip.append(np.asarray(reference.resize((size, size))))
            Image.fromarray(np.concatenate([s.astype(np.uint8) for s in strip] + images, 1)).save(
                os.path.join(out_dir, f"pair_{k:02d}.png"))
    return summarise(rows, modes)


def summarise(rows: list, modes) -> dict:
    """Each mode's metrics with bootstrap intervals over the pairs; with ``none`` among the modes, every other
    mode's paired difference against it (``minus_none``), which the same pairs' shared noise does not widen."""
    summary = {"pairs": len(rows), "scene_match": bootstrap(rows, lambda u: mean_of([r["scene"] for r in u]))}
    for mode in modes:
        summary[mode] = {key: bootstrap(rows, lambda u, m=mode, k=key: _mean(u, m, k)) for key in METRICS}
        if mode != "none" and "none" in modes:  # paired: each resample takes the same pairs for both modes
            summary[mode]["minus_none"] = {key: bootstrap(rows, lambda u, m=mode, k=key: _difference(u, m, k))
                                           for key in METRICS}
    summary["per_pair"] = [{m: row[m] for m in modes} for row in rows]
    return summary


METRICS = {"match": "background match (reference backdrop's colour; chance about 1/6)",
           "named": "fidelity: best of 16 named identities", "colour": "fidelity: colour",
           "leakage": "attribute leakage"}  # key in the summary: its row in the tables


def _mean(rows, mode: str, key: str):
    """Mean of ``key`` over ``rows`` (``named`` / ``colour`` hold one value per recognised subject)."""
    values = [r[mode][key] for r in rows]
    return mean_of([v for vs in values for v in vs] if key in ("named", "colour") else values)


def _difference(rows, mode: str, key: str):
    a, b = _mean(rows, mode, key), _mean(rows, "none", key)
    return None if a is None or b is None else a - b


def markdown_table(r: dict, modes) -> str:
    lines = [f"**Background reference** ({r['pairs']} held-out pairs, prompt \"two objects\"; value [bootstrap 95%]). "
             f"Held-out scenes themselves: background match {ci(r['scene_match'])}.", "",
             "| measurement | " + " | ".join(LABELS[m] for m in modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for key, name in METRICS.items():
        lines.append(f"| {name} | " + " | ".join(ci(r[m][key]) for m in modes) + " |")
    paired = [m for m in modes if "minus_none" in r[m]]
    if paired:
        lines += ["", "Paired difference against no background reference (the same pairs in every resample):", "",
                  "| measurement | " + " | ".join(f"{LABELS[m]} - none" for m in paired) + " |",
                  "|---" * (len(paired) + 1) + "|"]
        for key, name in METRICS.items():
            lines.append(f"| {name} | " + " | ".join(ci(r[m]["minus_none"][key], "{:+.3f}") for m in paired) + " |")
    return "\n".join(lines) + "\n"


def colour_by_timestep(pipe, timesteps, config: str) -> dict:
    """``{t: evaluate_background(...)}`` at each fixed timestep ``t`` (24 held-out scenes of ``config``'s world)."""
    from anystory.training.background import evaluate_background
    from anystory.training.config import load_config

    cfg = load_config(config)
    with torch.no_grad():
        return {t: evaluate_background(cfg, pipe, t_range=(t, t + 1)) for t in timesteps}


def colour_table(by_t: dict) -> str:
    lines = ["**Backdrop colour error of the predicted clean image** (L1 of the backdrop's mean colour, [-1, 1] units; "
             "24 held-out scenes, same noise with and without the reference)", "",
             "| timestep | with the reference | without | held-out diffusion loss with / without |", "|---|---|---|---|"]
    for t, r in by_t.items():
        lines.append(f"| {t} | {r['colour_with_background']:.3f} | {r['colour_without_background']:.3f} | "
                     f"{r['with_background']:.4f} / {r['without_background']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.background_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_sampling(p)
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--background-start", type=float, default=None, help="the pipeline's background_start for the "
                   "reference modes (default: the weights' value)")
    p.add_argument("--out", default="runs/background_study")
    p.add_argument("--colour-timesteps", default="", help="comma-separated timesteps for the colour-error table")
    add_config(p, "configs/miniature.yaml")  # its held-out world is the colour-error table's
    args = p.parse_args(argv)
    modes = [m for m in MODES if m in args.modes.split(",")]
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    from anystory.sdxl.miniature import MINIATURE_DIR, load_miniature

    model = args.model or MINIATURE_DIR
    pipe = load_miniature(path=model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.anystory.background is None:
        p.error(f"{model} has no background reference weights (train the 'background' stage)")
    classifier = IdentityClassifier.load(os.path.join(model, "identity_classifier.safetensors"))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    world = SyntheticWorld(STUDY_SEED, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    report, table = {}, ""
    if args.pairs > 0:
        report = run(pipe, world, classifier, held_out_pairs(world, args.pairs), args.steps, args.guidance, modes,
                     args.out, args.background_start)
        table = markdown_table(report, modes)
    timesteps = [int(t) for t in args.colour_timesteps.split(",") if t.strip()]
    if timesteps:
        by_t = colour_by_timestep(pipe, timesteps, args.config)
        report["colour_by_timestep"] = {str(t): r for t, r in by_t.items()}
        table += ("\n" if table else "") + colour_table(by_t)
    report.update(model=model, modes=modes, seconds_total=round(time.time() - started, 1),
                  command="python -m benchmarks.background_study " + " ".join(sys.argv[1:] if argv is None else argv))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
