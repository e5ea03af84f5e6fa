"""Where the miniature loses who a subject is: shape, colour and texture read by the identity classifier after
each part of the system, on held-out data.

    python -m benchmarks.miniature_diagnosis [--model assets/miniature] [--per-identity 2] [--pairs 80]

Rows, each a stage a subject's identity has to pass through (every figure: value [bootstrap 95% interval]):

- *renders*: the held-out renders themselves, read at their exact masks (the classifier's own ceiling);
- *VAE*: the same renders encoded and decoded by the model's VAE, read at the same masks;
- *CLIP zero-shot* (no judge): the base's image encoder embeds each reference (as the semantic path prepares it)
  and its ``text_encoder_2`` every one of the 192 identities' names; the nearest name is read as shape, colour and
  texture. What the semantic path can tell apart at best, if CLIP is its only source;
- *base, prompt naming it*: the text-to-image model with no reference, the prompt naming the identity
  ("a red striped star on sand"), the largest object drawn (the control of issue 27);
- *base, generic prompt*: no reference, "an object on sand" (what chance looks like on these images);
- *one subject, ground-truth routing*: the reference, the prompt naming nothing, every layer of every step
  routed to the subject's exact mask in the held-out scene (the regime stage 1 trains the encoder in), or to it
  grown by ``--gt-dilation`` pixels for a model trained with ``stage1.routing_dilation``;
- *one subject, learned router*: the same with the model's inference rule (stage 2's routers);
- *two subjects, ground-truth routing* / *learned router*: the routing study's pairs, each routed to the
  subjects' masks in the held-out scene of the same index, or by the router; objects matched to subjects as in
  the study (``drawn_objects``);
- *captions* (teacher-forced, no sampling): how much the base model's denoising error on a render's object grows
  when its caption names a wrong shape, colour or texture: whether the model uses each word at all.

One-subject images are the routing study's (the 16 named identities x ``--per-identity`` references, seeds
``--offset + i``, backgrounds in turn); the renders are the held-out scene of that index with that identity
alone. ``--base DIR`` (a diffusers folder) and ``--base-weights FILE`` (a base-stage checkpoint's
``ema.safetensors``, applied over ``--base``) measure a candidate base model in the base rows instead; ``--vae``
(a folder, or a vae-stage checkpoint's decoder) replaces the VAE in every row: a decoder trained longer on the same
fixed encoder fits every model trained on its latents.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from anystory import Subject
from anystory.cli_options import add_miniature_sampling
from anystory.data.identity_classifier import IdentityClassifier
from anystory.data.object_finder import find_objects
from anystory.data.synthetic import (COLOURS, IDENTITIES, SHAPES, TEXTURES, Identity, SyntheticWorld, WorldConfig,
                                     caption_for)
from anystory.training.subject_step import dilated_targets
from anystory.training.trajectory import drawn_objects
from benchmarks.common import write_report
from benchmarks.routing_study import (STUDY_SEED, _generate, _to_uint8, bootstrap, ci, fidelity, held_out_pairs,
                                      mean_of, oracle_maps)

PARTS = ("render", "vae", "clip", "base", "generic", "one_gt", "one_on", "two_gt", "two_on", "captions")
LABELS = {"render": "held-out renders (classifier ceiling)", "vae": "VAE reconstruction of the renders",
          "clip": "CLIP zero-shot: the reference's image embedding, nearest of the 192 names",
          "base": "base model, prompt naming the identity, no reference",
          "generic": "base model, generic prompt, no reference (chance)",
          "one_gt": "one subject, ground-truth routing (stage 1's regime)",
          "one_on": "one subject, learned router (stage 2, shipped rule)",
          "two_gt": "two subjects, ground-truth routing", "two_on": "two subjects, learned router (shipped rule)"}
ONE_SUBJECT = ("render", "vae", "base", "generic", "one_gt", "one_on")  # generated or read per image
KEYS = ("identity", "shape", "colour", "texture", "found")
SWAPS = ("shape", "colour", "texture", "generic")
CAPTION_T = (100, 300, 500, 700, 900)


def one_subject_cases(world: SyntheticWorld, per_identity: int, offset: int) -> list:
    """(seed index, identity, background, held-out scene of that identity alone), as the study's one-subject part."""
    cases = []
    for k, identity in enumerate(IDENTITIES):
        for j in range(per_identity):
            index = offset + k * per_identity + j
            bg = world.config.backgrounds[(index - offset) % len(world.config.backgrounds)]
            cases.append((index, identity, bg, world.scene(index, identities=[identity], background_name=bg)))
    return cases


@torch.no_grad()
def vae_roundtrip(pipe, image: np.ndarray) -> np.ndarray:
    """``pipe``: anything with a ``vae``. uint8 ``[H, W, 3]`` -> the VAE's reconstruction (latent mode, decoded), uint8."""
    from anystory.training.diffusion import decode_latents, encode_images

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    out = decode_latents(pipe, encode_images(pipe, pixels))[0].permute(1, 2, 0).numpy()
    return ((out.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8)


def pca_roundtrips(size: int, codes, cases) -> dict:
    """``{k: [uint8 image per case]}``: each render through the linear PCA of 4x4 patches with ``k`` codes (basis
    fitted as the VAE stage fits its encoder: 512 training-world images, a quarter reference views): what a fixed
    PCA encoder with ``k`` channels keeps, read without any learned decoder."""
    from anystory.training.pca_encoder import PATCH, fit_basis, patches
    from anystory.training.vae import _images

    world = SyntheticWorld(0, WorldConfig(image_size=size, reference_size=size))
    train = np.concatenate([_images(world, "vae", 10_000 + k, 64) for k in range(8)]).astype(np.float32) / 127.5 - 1
    renders = np.stack([c[3].image for c in cases]).astype(np.float64) / 127.5 - 1
    n, h, w, _ = renders.shape
    out = {}
    for k in codes:
        mean, basis, _ = fit_basis(train, k)
        x = ((patches(renders) - mean) @ basis.T) @ basis + mean
        x = x.reshape(n, h // PATCH, w // PATCH, PATCH, PATCH, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, 3)
        out[k] = list(((x.clip(-1, 1) + 1) * 127.5).round().astype(np.uint8))
    return out


def text_only(pipe, prompt: str, steps: int, guidance: float, seed: int) -> np.ndarray:
    """The base model alone (no subject, so no AnyStory weights are needed): uint8 ``[H, W, 3]``."""
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(seed))
    return _to_uint8(out.images[0])


def largest(image: np.ndarray) -> list:
    objects = find_objects(image)
    return [objects[0] if objects else None]


def routed_masks(masks: list, radius: int) -> list:
    """The ground-truth rows' routing regions: each subject's mask grown by ``radius`` pixels, as stage 1 routes
    with ``stage1.routing_dilation`` (0: the exact masks)."""
    if not radius:
        return masks
    t = torch.from_numpy(np.stack(masks).astype(np.float32))
    grown = dilated_targets(torch.cat([t, 1 - t.amax(0, keepdim=True)])[None], radius)[0, :-1]
    return [m.numpy() > 0.5 for m in grown]


def one_subject_rows(pipe, base, world, classifier, cases, parts, steps: int, guidance: float,
                     pca_codes=(), dilation: int = 0) -> dict:
    """Per part, one fidelity row per image (see :func:`benchmarks.routing_study.fidelity`)."""
    size = world.config.image_size
    latent = size // pipe.vae_scale_factor
    rows = {p: [] for p in parts if p in ONE_SUBJECT}
    for index, identity, bg, scene in cases:
        subject = [identity]
        mask = scene.masks[0]
        refs = [Subject(world.reference(identity, index).image, name=identity.name)]
        for part in rows:
            if part == "render":
                image, masks = scene.image, [mask]
            elif part == "vae":
                image, masks = vae_roundtrip(pipe, scene.image), [mask]
            elif part in ("base", "generic"):
                prompt = caption_for(subject, bg) if part == "base" else f"an object on {bg}"
                image = text_only(base, prompt, steps, guidance, seed=index)
                masks = largest(image)
            else:
                override = oracle_maps(routed_masks([mask], dilation), size, latent) if part == "one_gt" else None
                image = _to_uint8(_generate(pipe, f"an object on {bg}", refs, "on", size, steps, guidance,
                                            seed=index, override=override).images[0])
                masks = largest(image)
            rows[part].append(fidelity(image, masks, subject, classifier))
    if "captions" in parts:
        rows["captions"] = caption_sensitivity(base, cases)
    for k, images in pca_roundtrips(size, pca_codes, cases).items():
        rows[f"pca{k}"] = [fidelity(im, [c[3].masks[0]], [c[1]], classifier) for im, c in zip(images, cases)]
    return rows


def two_subject_rows(pipe, world, classifier, pairs, parts, steps: int, guidance: float, dilation: int = 0) -> dict:
    """Per part, one fidelity row per pair (both subjects)."""
    size = world.config.image_size
    latent = size // pipe.vae_scale_factor
    rows = {p: [] for p in parts if p in ("two_gt", "two_on")}
    for k, subjects, bg in pairs:
        refs = [Subject(world.reference(s, k, slot).image, name=s.name) for slot, s in enumerate(subjects)]
        scene = world.scene(k, identities=subjects, background_name=bg)
        for part in rows:
            override = (oracle_maps(routed_masks(list(scene.masks), dilation), size, latent) if part == "two_gt"
                        else None)
            image = _to_uint8(_generate(pipe, f"two objects on {bg}", refs, "on", size, steps, guidance, seed=k,
                                        override=override).images[0])
            rows[part].append(fidelity(image, drawn_objects(image, subjects, classifier), subjects, classifier))
    return rows


def swapped(identity: Identity, attribute: str) -> Identity:
    """The identity with one attribute moved to the next value of its list (a wrong word in the caption)."""
    shape, colour, texture = identity.labels
    if attribute == "shape":
        return Identity.from_labels((shape + 1) % len(SHAPES), colour, texture)
    if attribute == "colour":
        return Identity.from_labels(shape, (colour + 1) % len(COLOURS), texture)
    return Identity.from_labels(shape, colour, (texture + 1) % len(TEXTURES))


@torch.no_grad()
def caption_sensitivity(base, cases) -> list:
    """Teacher-forced: per held-out render, how much the base's denoising error on the object (latent cells
    weighted by the object's area) grows when the caption names a wrong shape, colour or texture, or no
    identity ("an object on sand"), relative to the right caption; mean over ``CAPTION_T``, same noise.
    Zero: the model does not use that word where the object is. Beside it (``text_<attribute>``): how far the
    wrong word moves the prompt embeddings the UNet reads (relative L2): whether the text encoders tell them apart."""
    from anystory.training.diffusion import encode_images, predicted_noise, text_conditioning, training_scheduler

    scheduler = training_scheduler(base)
    out = []
    for index, identity, bg, scene in cases:
        pixels = torch.from_numpy(scene.image).permute(2, 0, 1)[None].float() / 127.5 - 1
        latents = encode_images(base, pixels)
        weight = F.adaptive_avg_pool2d(torch.from_numpy(scene.masks[:1, None]).float(), latents.shape[-2:])
        captions = [caption_for([identity], bg)] + [caption_for([swapped(identity, a)], bg) for a in SWAPS[:3]]
        captions.append(f"an object on {bg}")
        embeds, added = text_conditioning(base, captions, None, *scene.image.shape[:2])
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(index))
        errors = torch.zeros(len(captions))
        for t in CAPTION_T:
            tt = torch.tensor([t])
            noisy = scheduler.add_noise(latents, noise, tt).expand(len(captions), -1, -1, -1)
            pred = predicted_noise(scheduler, noisy, base.unet(noisy, tt, embeds, added_cond_kwargs=added).sample, tt)
            errors += (((pred - noise) ** 2).mean(1, keepdim=True) * weight).sum((1, 2, 3)) / weight.sum()
        row = {a: float(errors[i + 1] / errors[0] - 1) for i, a in enumerate(SWAPS)}
        row.update({f"text_{a}": float((embeds[i + 1] - embeds[0]).norm() / embeds[0].norm())
                    for i, a in enumerate(SWAPS[:3])})
        out.append(row)
    return out


@torch.no_grad()
def clip_rows(base, world: SyntheticWorld, cases) -> list:
    """One fidelity row per case: the 192-way zero-shot reading of its reference by ``base``'s CLIP pair, the
    reference prepared as the pipeline prepares it for the semantic path."""
    from anystory.data.synthetic import ALL_IDENTITIES
    from anystory.training.clip import clip_pixels, name_embeddings

    names = name_embeddings(base, [i.name for i in ALL_IDENTITIES], "cpu")
    rows = []
    for index, identity, _, _ in cases:
        pixels = clip_pixels(base, [world.reference(identity, index).image], world.config.reference_size)
        guess = ALL_IDENTITIES[int((F.normalize(base.image_encoder(pixels).image_embeds, dim=-1) @ names.T).argmax())]
        hits = [a == b for a, b in zip(guess.labels, identity.labels)]
        rows.append({"identity": [all(hits)], "shape": hits[:1], "colour": hits[1:2], "texture": hits[2:],
                     "found": [True]})
    return rows


def summarise(rows: dict) -> dict:
    """Every key of every part with its bootstrap interval over the part's units (images or pairs)."""
    out = {part: {key: bootstrap(units, lambda u, key=key: mean_of([v for r in u for v in r[key]])) for key in KEYS}
           | {"units": len(units)} for part, units in rows.items() if part != "captions"}
    if "captions" in rows:
        units = rows["captions"]
        keys = list(SWAPS) + [f"text_{a}" for a in SWAPS[:3]]
        out["captions"] = {a: bootstrap(units, lambda u, a=a: mean_of([r[a] for r in u])) for a in keys}
        out["captions"]["units"] = len(units)
    return out


def load_base(path: str, weights: Optional[str]):
    """A candidate base model: a diffusers folder, optionally with a base-stage checkpoint's EMA tensors applied."""
    from anystory.sdxl.pipeline_sdxl import AnyStorySDXLPipeline
    from anystory.weights import load_tensors

    pipe = AnyStorySDXLPipeline.from_pretrained(path, dtype=torch.float32)
    if weights:
        tensors = load_tensors(weights, "base checkpoint")
        for name in ("unet", "text_encoder", "text_encoder_2"):
            module = getattr(pipe, name)
            own = {n[len(name) + 1:]: t for n, t in tensors.items() if n.startswith(name + ".")}
            missing, unexpected = module.load_state_dict(own, strict=False)
            if unexpected or [m for m in missing if not m.endswith("position_ids")]:
                raise ValueError(f"{weights} does not fit {path}'s {name}: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_vae(path: str, model_vae):
    """A candidate VAE: a diffusers folder, or a vae-stage checkpoint whose decoder replaces ``model_vae``'s (the
    encoder is the fixed PCA of the config, the same in every run of one config)."""
    import copy

    from diffusers import AutoencoderKL

    from anystory.weights import load_tensors

    if os.path.isdir(path):
        return AutoencoderKL.from_pretrained(path).eval()
    vae = copy.deepcopy(model_vae).float()
    tensors = {n[len("vae."):]: t for n, t in load_tensors(path, "vae checkpoint").items() if n.startswith("vae.")}
    missing, unexpected = vae.load_state_dict(tensors, strict=False)
    if unexpected or not tensors or any(not m.startswith(("encoder.", "quant_conv.")) for m in missing):
        raise ValueError(f"{path} is not a decoder of this VAE: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return vae.eval()


def markdown(report: dict) -> str:
    res = report["results"]
    lines = [f"`{report['command']}` ({report['date']}, commit {report['commit']}, {report['seconds_total']:.0f} s; "
             f"{report['steps']} steps, guidance {report['guidance']:g}; model {report['model']}"
             + (f"; base rows: {report['base']}" + (f" + {report['base_weights']}" if report['base_weights'] else "")
                if report["base"] else "") + (f"; VAE (every row): {report['vae']}" if report["vae"] else "")
             + (f"; ground-truth regions grown {report['gt_dilation']} px" if report.get("gt_dilation") else "") + ")",
             "",
             "| where | units | exact identity (chance .005) | shape (chance .125) | colour (chance .167) "
             "| texture (chance .25) | object drawn |", "|---|---|---|---|---|---|---|"]
    if set(res) == {"captions"}:
        lines = lines[:2]
    for part in list(PARTS) + sorted((p for p in res if p.startswith("pca")), key=lambda p: int(p[3:])):
        if part in res and part != "captions":
            r = res[part]
            label = LABELS.get(part) or f"linear PCA round trip of the renders, {part[3:]} codes per 4x4 patch"
            lines.append(f"| {label} | {r['units']} | " + " | ".join(ci(r[k], "{:.2f}") for k in KEYS) + " |")
    c = res.get("captions")
    if c:
        lines += ["", f"Base model, teacher-forced ({c['units']} renders, t in {', '.join(map(str, CAPTION_T))}): "
                  "growth of the denoising error on the object when the caption names a wrong ...", "",
                  "| | shape | colour | texture | nothing (generic caption) |", "|---|---|---|---|---|",
                  "| denoising error on the object | " + " | ".join(ci(c[a], "{:+.3f}") for a in SWAPS) + " |",
                  "| prompt embeddings (relative L2 change) | "
                  + " | ".join(ci(c[f"text_{a}"], "{:.3f}") for a in SWAPS[:3]) + " | - |"]
    return "\n".join(lines) + "\n"


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.miniature_diagnosis", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_sampling(p)
    p.add_argument("--base", default=None, help="diffusers folder of a candidate base model for the base rows")
    p.add_argument("--base-weights", default=None, help="a base-stage checkpoint's ema.safetensors, over --base")
    p.add_argument("--vae", default=None, help="a candidate VAE for every row: a diffusers AutoencoderKL folder, or "
                   "a vae-stage checkpoint's trainable.safetensors (its decoder over the model's VAE: same encoder)")
    p.add_argument("--pca-codes", default="", help="e.g. 8,16: rows of linear PCA round trips with k codes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--per-identity", type=int, default=2, help="images per named identity in the one-subject rows")
    p.add_argument("--offset", type=int, default=10_000, help="first seed index of the one-subject rows")
    p.add_argument("--pairs", type=int, default=80, help="study pairs in the two-subject rows")
    p.add_argument("--first-pair", type=int, default=0)
    p.add_argument("--gt-dilation", type=int, default=0, help="pixels the ground-truth rows' routing regions grow "
                   "by (the model's stage1.routing_dilation: its training regime)")
    p.add_argument("--out", default="runs/miniature_diagnosis")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    if args.base_weights and not args.base:
        p.error("--base-weights needs --base (the folder whose modules the weights fit)")
    return args, parts


def main(argv=None) -> int:
    import subprocess

    args, parts = parse(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as dlog

    from anystory.sdxl.miniature import MINIATURE_DIR, load_miniature

    dlog.disable_progress_bar()
    model = args.model or MINIATURE_DIR
    pipe = load_miniature(path=model)
    pipe.set_progress_bar_config(disable=True)
    base = load_base(args.base, args.base_weights) if args.base else pipe
    classifier = IdentityClassifier.load(args.classifier or os.path.join(model, "identity_classifier.safetensors"))
    size = pipe.default_sample_size * pipe.vae_scale_factor
    world = SyntheticWorld(STUDY_SEED, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))
    started = time.time()
    cases = one_subject_cases(world, args.per_identity, args.offset)
    if args.vae:  # every row decodes with it (the encoder, hence every latent the models saw, is unchanged)
        for target in {id(pipe): pipe, id(base): base}.values():
            target.vae = load_vae(args.vae, pipe.vae)
    rows = one_subject_rows(pipe, base, world, classifier, cases, parts, args.steps, args.guidance,
                            [int(k) for k in args.pca_codes.split(",") if k], args.gt_dilation)
    pairs = held_out_pairs(world, args.first_pair + args.pairs)[args.first_pair:]
    rows.update(two_subject_rows(pipe, world, classifier, pairs, parts, args.steps, args.guidance, args.gt_dilation))
    if "clip" in parts:
        rows["clip"] = clip_rows(base, world, cases)
    report = {"command": "python -m benchmarks.miniature_diagnosis " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit or "?",
              "model": model, "base": args.base, "base_weights": args.base_weights, "vae": args.vae, "steps": args.steps,
              "guidance": args.guidance, "gt_dilation": args.gt_dilation,
              "pairs": [args.first_pair, args.first_pair + args.pairs],
              "one_subject_seeds": [args.offset, args.offset + len(cases)],
              "results": summarise(rows), "seconds_total": time.time() - started}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
