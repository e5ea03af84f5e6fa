"""Command line: ``python -m anystory.generate --prompt "..." --subject a.png [--mask a_mask.png] --out out.png``.

Without ``--anystory-weights`` it runs the shipped miniature (offline, CPU). Repeat ``--subject`` for several
subjects; ``--mask`` values pair with subjects in order (use ``-`` for "no mask").
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m anystory.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--subject", action="append", default=[], help="reference image of a subject (repeatable)")
    p.add_argument("--mask", action="append", default=[], help="mask for the subject at the same position, or -")
    p.add_argument("--scale", type=float, default=1.0, help="semantic condition strength (eta)")
    p.add_argument("--reference-scale", type=float, default=1.0, help="ReferenceNet condition strength")
    p.add_argument("--anystory-weights", default=os.environ.get("ANYSTORY_SDXL_WEIGHTS"),
                   help="AnyStory SDXL weights (folder); default: the shipped miniature")
    p.add_argument("--base-model", default=None, help="SDXL base, hub id or folder (with --anystory-weights)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="outputs/anystory.png")
    p.add_argument("--save-routing", action="store_true", help="also save the last step's routing map overlay")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from .loading import DEFAULT_SDXL_BASE, ModelUnavailableError, load_default_pipeline, load_sdxl_anystory
    from .subjects import Subject

    if len(args.mask) > len(args.subject):
        print(f"error: {len(args.mask)} masks for {len(args.subject)} subjects", file=sys.stderr)
        return 2
    masks = [None if m == "-" else m for m in args.mask] + [None] * (len(args.subject) - len(args.mask))
    subjects = [Subject(s, mask=m, scale=args.scale, reference_scale=args.reference_scale)
                for s, m in zip(args.subject, masks)]
    try:
        if args.anystory_weights:
            pipe = load_sdxl_anystory(args.anystory_weights, args.base_model or DEFAULT_SDXL_BASE, device=args.device)
            defaults = dict(num_inference_steps=30, guidance_scale=5.0)
        else:
            pipe = load_default_pipeline(device=args.device)
            defaults = dict(num_inference_steps=20, guidance_scale=3.0)
    except (ModelUnavailableError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    call = dict(defaults)
    if args.steps:
        call["num_inference_steps"] = args.steps
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    try:
        out = pipe(args.prompt, subjects=subjects, negative_prompt=args.negative_prompt, height=args.height,
                   width=args.width, generator=torch.Generator("cpu").manual_seed(args.seed),
                   return_routing_maps=args.save_routing, **call)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    out.images[0].save(args.out)
    print(f"saved {args.out}")
    if args.save_routing and out.routing_maps:
        from .visualize import routing_overlay

        path = os.path.splitext(args.out)[0] + "_routing.png"
        routing_overlay(out.images[0], out.routing_maps[-1][0]).save(path)
        print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
