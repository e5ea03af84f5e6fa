"""Routing study on the miniature: does the router find the subjects, does routing stop attribute leakage,
and are the generated subjects recognisable?

    python -m benchmarks.routing_study [--model assets/miniature] [--pairs 80] [--steps 20]

All scenes come from a held-out seed of the synthetic world (never seen in training); the subjects of each
generated pair are two of the 16 named identities with different shapes and colours, and the prompt names
neither ("two objects on sand"), so identity can only come from the reference images.

1. Router mIoU, teacher-forced: a held-out scene is noised to timestep t and denoised once with its subjects'
   references; each cross-attention layer's routing (argmax) is compared with the ground-truth instance masks at
   that layer's resolution (the class covering most of each cell). Mean over subjects + background, layers and
   scenes; reported per t and averaged over t in {100, 300, 500, 700, 900}.
2. Router mIoU on generated images: the last step's routing map against the objects actually drawn (found by
   chroma, matched to subjects by the identity classifier's shape head).
3. Attribute leakage: in the object drawn for subject B (see ``drawn_objects``), the fraction of pixels whose nearest world colour is
   subject A's colour (and vice versa), with routing on vs off. "Off" forces every subject's map to 1
   everywhere (``set_routing_override`` with all-ones maps): each subject's conditions reach every position.
   Routing on uses the model's inference rule (the miniature's: the background logit adjustment, one region
   per subject, the gap between subjects and the trajectory router, ``router.py``); "plain argmax" is the
   paper's rule, a per-layer argmax of the stage-2 router with none of them.
   "Second pass" generates again with every layer of every step routed by the last-step map of routing on (its
   own decision, held for the whole call; twice the cost). "Oracle" forces every layer's routing to the objects that routing on drew (their masks, background
   elsewhere): what is left is leakage that no routing decision can remove.
   Per step (routing on): the share of each subject's drawn object that the step's map routed to the
   *other* subject, and to the subject itself, averaged over the pairs: where in sampling the leakage arises.
4. Subject fidelity: the identity classifier (``anystory.data.identity_classifier``) reads each drawn object:
   exact identity (shape, colour and texture all right; chance 1/192), per attribute, and the best of the 16
   named identities (chance 1/16). A subject with no object drawn counts as wrong. Control: the same prompts
   with no subjects (the base model).
5. One subject: each of the 16 named identities from two held-out references, "an object on <background>",
   fidelity of the largest object drawn, with the same modes.
6. Layout (``--layout``): the pairs again, each subject given a region (``Subject(region=...)``): the bounding
   box of its placement in the held-out scene of the same index. Per subject, the drawn object's IoU with its
   box (0 when none is drawn; a disc fills at most pi/4 of its box) and the share of the object inside it;
   leakage and colour fidelity; routing on with regions against routing on without.

Every figure comes with a bootstrap 95% interval (2000 resamples of the pairs, scenes or images; percentile).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from anystory import Subject
from anystory.cli_options import add_miniature_sampling
from anystory.data.identity_classifier import IdentityClassifier, object_crop
from anystory.data.object_finder import find_objects
from anystory.data.synthetic import COLOURS, IDENTITIES, SHADE, SyntheticWorld, WorldConfig, caption_for
from anystory.regions import region_pixels
from anystory.subjects import prepare_subjects
from anystory.training.trajectory import drawn_objects

match_objects = drawn_objects  # the name benchmarks.background_study imports

STUDY_SEED = 424242  # the training world is seed 0 (held-out checks during training: 7919)
TIMESTEPS = (100, 300, 500, 700, 900)
BOOTSTRAP = 2000


def bootstrap(units: list, statistic, seed: int = 0) -> dict:
    """``statistic(units)`` and its percentile 95% interval over ``BOOTSTRAP`` resamples of the units (pairs,
    scenes or images, each one entry of ``units``)."""
    value = statistic(units)
    rng = np.random.default_rng(seed)
    draws = [statistic([units[i] for i in rng.integers(len(units), size=len(units))]) for _ in range(BOOTSTRAP)]
    draws = [d for d in draws if d is not None and np.isfinite(d)]
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return {"value": value, "lo": float(lo), "hi": float(hi), "n": len(units)}


def mean_of(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def held_out_pairs(world: SyntheticWorld, count: int) -> list:
    """(scene index, [A, B], background) with A, B named identities of different shape and colour."""
    rng = np.random.default_rng(STUDY_SEED)
    pairs = []
    while len(pairs) < count:
        a, b = rng.choice(len(IDENTITIES), 2, replace=False)
        A, B = IDENTITIES[a], IDENTITIES[b]
        if A.shape == B.shape or A.colour == B.colour:
            continue
        bg = world.config.backgrounds[int(rng.integers(len(world.config.backgrounds)))]
        pairs.append((len(pairs), [A, B], bg))
    return pairs


def miou_labels(pred: np.ndarray, gt: np.ndarray, classes: int) -> float:
    ious = []
    for c in range(classes):
        p, g = pred == c, gt == c
        union = (p | g).sum()
        if union:
            ious.append((p & g).sum() / union)
    return float(np.mean(ious))


# ---- 1. teacher-forced router mIoU ------------------------------------------------------------------------------
@torch.no_grad()
def teacher_forced_miou(pipe, world: SyntheticWorld, scenes: int) -> dict:
    from anystory.training.diffusion import encode_images, text_conditioning, training_scheduler
    from anystory.training.routing import router_miou

    scheduler = training_scheduler(pipe)
    adapter = pipe.anystory
    adapter.eval()
    by_t = {t: [] for t in TIMESTEPS}
    device = pipe.unet.device
    for k in range(scenes):
        sample = world.sample(k, count=2 + k % 2)
        scene = sample.scene
        prepared = prepare_subjects([Subject(r.image) for r in sample.references])
        encoded = pipe.encode_subjects(**pipe.subject_tensors(prepared, device, pipe.unet.dtype))
        latents = encode_images(pipe, torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1)
        embeds, added = text_conditioning(pipe, [scene.generic_caption], None, *scene.image.shape[:2])
        targets = torch.from_numpy(scene.routing_target())[None]
        n = len(sample.references)
        gen = torch.Generator().manual_seed(k)
        noise = torch.randn(latents.shape, generator=gen)
        for t in TIMESTEPS:
            state = pipe.start_anystory_call(adapter.conditioning(
                **encoded, scales=torch.ones(n), reference_scales=torch.ones(n), latent_hw=tuple(latents.shape[-2:]),
                collect_soft_maps=True))
            tt = torch.tensor([t])
            pipe.unet(scheduler.add_noise(latents, noise, tt), tt, embeds, added_cond_kwargs=added)
            by_t[t].append(float(np.mean(list(router_miou(state, targets).values()))))
        pipe.start_anystory_call()
    per_scene = [{t: by_t[t][k] for t in TIMESTEPS} for k in range(scenes)]
    out = {f"t={t}": bootstrap(per_scene, lambda u, t=t: mean_of([s[t] for s in u])) for t in TIMESTEPS}
    out["mean"] = bootstrap(per_scene, lambda u: float(np.mean([np.mean(list(s.values())) for s in u])))
    out["scenes"] = scenes
    return out


# ---- 2-4. generation --------------------------------------------------------------------------------------------
def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest world colour (either tone) for every ``[P, 3]`` pixel."""
    names = list(COLOURS)
    tones = np.array([COLOURS[c] for c in names] + [tuple(np.asarray(COLOURS[c]) * SHADE) for c in names], np.float32)
    d = ((pixels[:, None, :].astype(np.float32) - tones[None]) ** 2).sum(-1)
    return d.argmin(1) % len(names)


def leakage(image: np.ndarray, masks: list, subjects) -> Optional[float]:
    """Mean over subjects of: the fraction of the subject's object drawn in the *other* subject's colour."""
    colour_index = {c: i for i, c in enumerate(COLOURS)}
    values = []
    for i, (mask, s) in enumerate(zip(masks, subjects)):
        if mask is None:
            continue
        other = subjects[1 - i]
        nearest = nearest_colour(image[mask])
        values.append(float((nearest == colour_index[other.colour]).mean()))
    return float(np.mean(values)) if values else None


def fidelity(image: np.ndarray, masks: list, subjects, classifier: IdentityClassifier) -> dict:
    rows = {"identity": [], "named": [], "shape": [], "colour": [], "texture": [], "found": []}
    for mask, s in zip(masks, subjects):
        rows["found"].append(mask is not None)
        if mask is None:
            for k in ("identity", "named", "shape", "colour", "texture"):
                rows[k].append(False)
            continue
        crop = object_crop(image, mask)
        p = classifier.probabilities([crop])
        pred = tuple(int(p[k][0].argmax()) for k in ("shape", "colour", "texture"))
        rows["shape"].append(pred[0] == s.labels[0])
        rows["colour"].append(pred[1] == s.labels[1])
        rows["texture"].append(pred[2] == s.labels[2])
        rows["identity"].append(pred == s.labels)
        rows["named"].append(classifier.identify([crop], IDENTITIES)[0] == s)
    return rows


def generated_miou(maps: torch.Tensor, masks: list) -> Optional[float]:
    """Last-step routing map ``[N+1, h, w]`` vs the drawn objects (background elsewhere), at the map's size."""
    if any(m is None for m in masks):
        return None
    n, (h, w) = len(masks), maps.shape[-2:]
    size = masks[0].shape[0]
    frac = np.stack([m.reshape(h, size // h, w, size // w).mean(axis=(1, 3)) for m in masks])
    gt_sub = np.concatenate([frac, 1 - frac.sum(0, keepdims=True)]).argmax(0)
    return miou_labels(maps.argmax(0).numpy(), gt_sub, n + 1)


MODES = ("on", "second", "plain", "off", "oracle", "none", "named")
LABELS = {"on": "routing on", "second": "second pass, fixed to the first's last map", "plain": "routing on, plain argmax",
          "off": "routing off", "oracle": "oracle routing (drawn objects)", "none": "no subjects (base)",
          "named": "no subjects, the prompt naming them (base)"}
NO_SUBJECTS = ("none", "named")
FIDELITY = ("identity", "named", "shape", "colour", "texture", "found")
PER_STEP = ("on",)


def _generate(pipe, prompt, refs, mode: str, size: int, steps: int, guidance: float, seed: int, override=None,
              **kwargs):
    latent = size // pipe.vae_scale_factor
    if mode == "off":
        override = torch.ones(len(refs) + 1, latent, latent)
    pipe.set_routing_override(override)
    single_region = pipe.anystory.config.routing_single_region
    trajectory_weight = pipe.anystory.config.routing_trajectory_weight
    gap = getattr(pipe.anystory.config, "routing_subject_gap", 0)
    if mode == "plain":
        pipe.anystory.register_to_config(routing_single_region=False, routing_trajectory_weight=0.0,
                                         routing_subject_gap=0)
    try:
        return pipe(prompt, subjects=[] if mode in NO_SUBJECTS else refs, num_inference_steps=steps,
                    guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="np",
                    routing_background_bias=0.0 if mode == "plain" else None, **kwargs)
    finally:
        pipe.set_routing_override(None)
        pipe.anystory.register_to_config(routing_single_region=single_region,
                                         routing_trajectory_weight=trajectory_weight, routing_subject_gap=gap)


def scene_boxes(world: SyntheticWorld, k: int, subjects, bg: str) -> list:
    """Each subject's box ``(x0, y0, x1, y1)`` in fractions: its placement's bounding square in held-out scene k."""
    scene = world.scene(k, identities=subjects, background_name=bg)
    size = float(world.config.image_size)
    return [tuple(min(max(v / size, 0.0), 1.0) for v in (p.center[0] - p.radius, p.center[1] - p.radius,
                                                          p.center[0] + p.radius, p.center[1] + p.radius))
            for p in scene.placements]


def layout_overlap(masks: list, boxes: list, size: int) -> dict:
    """Per subject: IoU of the drawn object with its box (0 when none is drawn), and the object's share inside it."""
    iou, inside = [], []
    for mask, box in zip(masks, boxes):
        region = region_pixels(box, size, size, "box")
        if mask is None:
            iou.append(0.0)
            continue
        iou.append(float((mask & region).sum() / (mask | region).sum()))
        inside.append(float((mask & region).sum() / mask.sum()))
    return {"iou": iou, "inside": inside}


def layout_study(pipe, world, classifier, pairs, steps: int, guidance: float, out_dir: Optional[str]) -> dict:
    """Routing on, without and with each subject's region (the held-out scene's boxes)."""
    size = world.config.image_size
    rows = []
    for k, subjects, bg in pairs:
        boxes = scene_boxes(world, k, subjects, bg)
        row, images = {}, []
        for name, regions in (("free", [None, None]), ("regions", boxes)):
            refs = [Subject(world.reference(s, k, slot).image, name=s.name, region=r)
                    for slot, (s, r) in enumerate(zip(subjects, regions))]
            out = _generate(pipe, f"two objects on {bg}", refs, "on", size, steps, guidance, seed=k)
            image = _to_uint8(out.images[0])
            masks = drawn_objects(image, subjects, classifier)
            row[name] = {**layout_overlap(masks, boxes, size), "leakage": leakage(image, masks, subjects),
                         "colour": fidelity(image, masks, subjects, classifier)["colour"]}
            images.append(image)
        rows.append(row)
        if out_dir and k < 8:
            from PIL import Image

            Image.fromarray(np.concatenate(images, 1)).save(os.path.join(out_dir, f"layout_{k:02d}.png"))
    out = {"pairs": len(pairs)}
    for name in ("free", "regions"):
        out[name] = {key: bootstrap(rows, lambda u, key=key, name=name: mean_of(
            [v for r in u if r[name][key] is not None for v in
             (r[name][key] if isinstance(r[name][key], list) else [r[name][key]])]))
            for key in ("iou", "inside", "leakage", "colour")}
    return out


def layout_lines(lay: dict) -> list:
    names = (("iou", "mIoU of drawn objects with their boxes"), ("inside", "share of a drawn object inside its box"),
             ("leakage", "attribute leakage"), ("colour", "fidelity: colour (chance .167)"))
    return ["", f"**Layout** ({lay['pairs']} held-out pairs, regions = the held-out scene's boxes)", "",
            "| measurement | routing on, no regions | routing on, regions |", "|---|---|---|"] + [
        f"| {label} | {ci(lay['free'][key])} | {ci(lay['regions'][key])} |" for key, label in names]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def oracle_maps(masks: list, size: int, latent: int) -> Optional[torch.Tensor]:
    """``[N+1, latent, latent]`` one-hot maps of the drawn objects (the majority class of each latent cell)."""
    if any(m is None for m in masks):
        return None
    f = size // latent
    frac = np.stack([m.reshape(latent, f, latent, f).mean(axis=(1, 3)) for m in masks])
    labels = np.concatenate([frac, 1 - frac.sum(0, keepdims=True)]).argmax(0)
    return torch.from_numpy(np.eye(len(masks) + 1, dtype=np.float32)[labels]).permute(2, 0, 1)


def step_routing(maps: List[torch.Tensor], masks: list, size: int) -> Optional[list]:
    """Per step: (share of the subjects' drawn objects routed to the *other* subject, share routed to itself)."""
    if any(m is None for m in masks) or len(masks) != 2:
        return None
    rows = []
    for step in maps:
        m = step[0].numpy()  # [3, h, w]
        h = m.shape[-1]
        f = size // h
        other, own = [], []
        for i, mask in enumerate(masks):
            frac = mask.reshape(h, f, h, f).mean(axis=(1, 3))
            other.append(float((frac * m[1 - i]).sum() / frac.sum()))
            own.append(float((frac * m[i]).sum() / frac.sum()))
        rows.append((float(np.mean(other)), float(np.mean(own))))
    return rows


def single_subject(pipe, world, classifier, steps: int, guidance: float, modes, per_identity: int = 2,
                   offset: int = 10_000) -> dict:
    """Fidelity of one subject per image (the largest object drawn), per mode; image ``i`` uses seed index
    ``offset + i`` (its reference, background and sampling seed), so disjoint offsets give disjoint image sets."""
    size = world.config.image_size
    rows = {mode: [] for mode in modes if mode not in ("off", "oracle")}
    for k, identity in enumerate(IDENTITIES):
        for j in range(per_identity):
            index = k * per_identity + j
            refs = [Subject(world.reference(identity, offset + index).image, name=identity.name)]
            bg = world.config.backgrounds[index % len(world.config.backgrounds)]
            for mode in rows:
                prompt = caption_for([identity], bg) if mode == "named" else f"an object on {bg}"
                image = _to_uint8(_generate(pipe, prompt, refs, mode, size, steps, guidance,
                                            seed=offset + index).images[0])
                objects = find_objects(image)
                rows[mode].append(fidelity(image, [objects[0] if objects else None], [identity], classifier))
    return {mode: {key: bootstrap(rs, lambda u, key=key: mean_of([v for r in u for v in r[key]])) for key in FIDELITY}
            | {"images": len(rs)} for mode, rs in rows.items()}


def run_generation(pipe, world, classifier, pairs, steps: int, guidance: float, out_dir: Optional[str],
                   modes) -> dict:
    size = world.config.image_size
    latent = size // pipe.vae_scale_factor
    results = {mode: [] for mode in modes}
    seconds = []
    for k, subjects, bg in pairs:
        refs = [Subject(world.reference(s, k, slot).image, name=s.name) for slot, s in enumerate(subjects)]
        images, drawn, first_maps = {}, {}, None
        for mode in modes:
            prompt = caption_for(subjects, bg) if mode == "named" else f"two objects on {bg}"
            override = None
            if mode == "second":
                last = first_maps[-1][0] if first_maps else None
                override = None if last is None else torch.eye(len(refs) + 1)[last.argmax(0)].permute(2, 0, 1)
                if override is None:
                    results[mode].append({"fidelity": None, "leakage": None})
                    continue
            if mode == "oracle":
                override = oracle_maps(drawn.get("on", [None]), size, latent)
                if override is None:
                    results[mode].append({"fidelity": None, "leakage": None})
                    continue
            started = time.perf_counter()
            out = _generate(pipe, prompt, refs, mode, size, steps, guidance, seed=k, override=override,
                            return_routing_maps=mode in PER_STEP)
            if mode == "on":
                seconds.append(time.perf_counter() - started)
                first_maps = out.routing_maps
            image = _to_uint8(out.images[0])
            images[mode] = image
            masks = drawn[mode] = drawn_objects(image, subjects, classifier)
            row = {"fidelity": fidelity(image, masks, subjects, classifier), "leakage": leakage(image, masks, subjects)}
            if mode in PER_STEP:
                row["miou"] = generated_miou(out.routing_maps[-1][0], masks)
                row["steps"] = step_routing(out.routing_maps, masks, size)
            results[mode].append(row)
        if out_dir and k < 12:
            from PIL import Image

            refs_img = [np.asarray(prepare_subjects([r])[0].image.resize((size, size))) for r in refs]
            Image.fromarray(np.concatenate(refs_img + [images[m] for m in modes if m in images], 1)).save(
                os.path.join(out_dir, f"pair_{k:02d}.png"))
    return summarise(results, seconds, len(pairs))


def summarise(results: dict, seconds: list, pairs: int) -> dict:
    """Every figure with its bootstrap interval over the pairs (one unit = one pair, all modes together)."""
    units = [{mode: results[mode][i] for mode in results} for i in range(pairs)]
    summary = {}
    for mode in results:
        fid = {key: bootstrap(units, lambda u, key=key, mode=mode: mean_of(
            [v for r in u if r[mode]["fidelity"] for v in r[mode]["fidelity"][key]])) for key in FIDELITY}
        summary[mode] = {"fidelity": fid, "leakage": bootstrap(units, lambda u, mode=mode: mean_of(
            [r[mode]["leakage"] for r in u])),
            "leakage_images": sum(r["leakage"] is not None for r in results[mode])}
        if mode in PER_STEP:
            summary[mode]["generated_miou"] = bootstrap(units, lambda u, mode=mode: mean_of(
                [r[mode].get("miou") for r in u]))
            rows = [r[mode]["steps"] for r in units if r[mode].get("steps")]
            summary[mode]["per_step"] = [
                {"step": s, "other": bootstrap(rows, lambda u, s=s: mean_of([r[s][0] for r in u])),
                 "own": bootstrap(rows, lambda u, s=s: mean_of([r[s][1] for r in u]))}
                for s in range(len(rows[0]))] if rows else []
    for mode in ("on", "second", "oracle"):
        if mode in results and "off" in results:
            summary[f"leakage_ratio_off_over_{mode}"] = bootstrap(units, lambda u, mode=mode: _ratio(u, "off", mode))
    summary["seconds_per_image"] = statistics.median(seconds) if seconds else float("nan")
    summary["pairs"] = pairs
    summary["per_pair"] = {mode: [{"leakage": r["leakage"], "colour": (r["fidelity"] or {}).get("colour")}
                                  for r in results[mode]] for mode in results}  # for subsets, e.g. unseen pairs
    return summary


def _ratio(units, num: str, den: str) -> Optional[float]:
    a, b = mean_of([r[num]["leakage"] for r in units]), mean_of([r[den]["leakage"] for r in units])
    return None if a is None or not b else a / b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.routing_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_sampling(p)
    p.add_argument("--pairs", type=int, default=80, help="held-out pairs for the two-subject part (0: skip)")
    p.add_argument("--first-pair", type=int, default=0,
                   help="skip the first pairs (e.g. 25: leave out the pairs that chose an inference rule)")
    p.add_argument("--scenes", type=int, default=40, help="held-out scenes for the teacher-forced mIoU (0: skip)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--single", type=int, default=2, help="references per identity in the one-subject part (0: skip)")
    p.add_argument("--single-offset", type=int, default=10_000,
                   help="first seed index of the one-subject images (e.g. 20000: a set kept for tuning)")
    p.add_argument("--layout", type=int, default=40, help="held-out pairs for the layout part (0: skip)")
    p.add_argument("--out", default="runs/routing_study")
    args = p.parse_args(argv)
    modes = [m for m in MODES if m in args.modes.split(",")]
    if {"oracle", "second"} & set(modes) and "on" not in modes:
        p.error("the oracle and second modes need the 'on' mode (they route by what routing on drew or decided)")
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()
    from anystory.sdxl.miniature import MINIATURE_DIR, load_miniature

    model = args.model or MINIATURE_DIR
    pipe = load_miniature(path=model)
    pipe.set_progress_bar_config(disable=True)
    classifier = IdentityClassifier.load(args.classifier or os.path.join(model, "identity_classifier.safetensors"))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    world = SyntheticWorld(STUDY_SEED, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = {"model": model, "command": f"python -m benchmarks.routing_study {command}",
              "classifier_validation": getattr(classifier, "metrics", {}), "modes": modes,
              "single_offset": args.single_offset}
    if args.scenes:
        report["teacher_forced_miou"] = teacher_forced_miou(pipe, world, args.scenes)
    if args.pairs:
        pairs = held_out_pairs(world, args.first_pair + args.pairs)[args.first_pair:]
        report["generation"] = run_generation(pipe, world, classifier, pairs,
                                              args.steps, args.guidance, args.out, modes)
    if args.single:
        report["single_subject"] = single_subject(pipe, world, classifier, args.steps, args.guidance, modes,
                                                  args.single, args.single_offset)
    if args.layout:
        report["layout"] = layout_study(pipe, world, classifier, held_out_pairs(world, args.layout), args.steps,
                                        args.guidance, args.out)
    report["routing_background_bias"] = pipe.anystory.config.routing_background_bias
    report["routing_background_bias_single"] = pipe.anystory.config.get("routing_background_bias_single")
    report["routing_single_region"] = pipe.anystory.config.routing_single_region
    report["routing_subject_gap"] = getattr(pipe.anystory.config, "routing_subject_gap", 0)
    report["routing_trajectory_weight"] = pipe.anystory.config.routing_trajectory_weight
    report["routing_trajectory_background_bias"] = pipe.anystory.config.routing_trajectory_background_bias
    report["seconds_total"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown_table(report)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return 0


def ci(b: Optional[dict], fmt: str = "{:.3f}") -> str:
    """``value [lo, hi]`` of a :func:`bootstrap` result."""
    if not b or b["value"] is None:
        return "-"
    return f"{fmt.format(b['value'])} [{fmt.format(b['lo'])}, {fmt.format(b['hi'])}]"


def markdown_table(r: dict) -> str:
    g, modes = r.get("generation"), r["modes"]
    weight = r.get("routing_trajectory_weight") or 0.0
    single = r.get("routing_background_bias_single")
    lines = [f"Background logit adjustment of this model: {r['routing_background_bias']:.3f}"
             + ("" if single is None else f" (a call with one subject: {single:.3f})") + "; one region per "
             f"subject: {'on' if r.get('routing_single_region') else 'off'}; gap between subjects: "
             f"{r.get('routing_subject_gap') or 0} latent positions; trajectory router: "
             + (f"weight {weight:g}, its adjustment {r['routing_trajectory_background_bias']:.3f}. " if weight else "none. ")
             + "Every figure: value [bootstrap 95% interval].", ""]
    tf = r.get("teacher_forced_miou")
    if tf:
        lines += [f"Router mIoU, teacher-forced ({tf['scenes']} held-out scenes): mean over t {ci(tf['mean'])}; "
                  + "; ".join(f"t={t} {ci(tf[f't={t}'], '{:.2f}')}" for t in TIMESTEPS), ""]
    if g:
        lines += two_subject_lines(g, modes)
    one = r.get("single_subject")
    if one:
        om = [m for m in modes if m in one]
        first, images = r.get("single_offset", 10_000), one[om[0]]["images"]
        lines += ["", f"**One subject** ({images} images, 16 identities x references, seed indices "
                  f"{first}-{first + images - 1})", "",
                  "| measurement | " + " | ".join(LABELS[m] for m in om) + " |", "|---" * (len(om) + 1) + "|"]
        for key, name in (("identity", "fidelity: exact identity (chance 0.005)"),
                          ("named", "fidelity: best of 16 named identities (chance 0.0625)"),
                          ("shape", "fidelity: shape"), ("colour", "fidelity: colour"), ("texture", "fidelity: texture"),
                          ("found", "an object drawn")):
            lines.append(f"| {name} | " + " | ".join(ci(one[m][key], "{:.2f}") for m in om) + " |")
    if r.get("layout"):
        lines += layout_lines(r["layout"])
    if g:
        lines.append(f"\nSeconds per image (CPU, two subjects, routing on, median): {g['seconds_per_image']:.2f}")
    return "\n".join(lines) + "\n"


def two_subject_lines(g: dict, modes) -> list:
    lines = [f"**Two subjects** ({g['pairs']} held-out pairs, \"two objects on ...\")", "",
              "| measurement | " + " | ".join(LABELS[m] for m in modes) + " |", "|---" * (len(modes) + 1) + "|"]

    def row(name, get, fmt="{:.3f}"):
        lines.append(f"| {name} | " + " | ".join(ci(get(g[m]), fmt) if get(g[m]) else "-" for m in modes) + " |")

    row("attribute leakage (other subject's colour in a subject's object)", lambda m: m["leakage"])
    for key, name in (("identity", "fidelity: exact identity (chance 0.005)"),
                      ("named", "fidelity: best of 16 named identities (chance 0.0625)"),
                      ("shape", "fidelity: shape (chance .125)"), ("colour", "fidelity: colour (chance .167)"),
                      ("texture", "fidelity: texture (chance .25)"), ("found", "subjects with an object drawn")):
        row(name, lambda m, key=key: m["fidelity"][key], "{:.2f}")
    row("router mIoU vs the objects drawn (last step)", lambda m: m.get("generated_miou"))
    for mode in ("on", "second", "oracle"):
        if f"leakage_ratio_off_over_{mode}" in g:
            lines.append(f"\nLeakage off / {LABELS[mode]} (goal >= 3): "
                         f"**{ci(g[f'leakage_ratio_off_over_{mode}'], '{:.2f}')}x**")
    for mode in PER_STEP:
        steps = g.get(mode, {}).get("per_step")
        if steps:
            lines += ["", f"Per step, {LABELS[mode]}: share of a subject's drawn object routed to the other subject "
                      "/ to itself", "", "| step | " + " | ".join(str(s["step"]) for s in steps) + " |",
                      "|---" * (len(steps) + 1) + "|",
                      "| other | " + " | ".join(f"{s['other']['value']:.3f}" for s in steps) + " |",
                      "| 95% | " + " | ".join(f"{s['other']['lo']:.3f}-{s['other']['hi']:.3f}" for s in steps) + " |",
                      "| own | " + " | ".join(f"{s['own']['value']:.2f}" for s in steps) + " |"]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
