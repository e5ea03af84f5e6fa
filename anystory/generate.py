"""Command line: ``python -m anystory.generate --prompt "..." --subject a.png [--mask a_mask.png] --out out.png``.

Without ``--anystory-weights`` it runs the shipped miniature (offline, CPU). Repeat ``--subject`` for several
subjects; ``--mask`` values pair with subjects in order (use ``-`` for "no mask"), and so do ``--region`` values:
where in the output the subject may go, a box ``x0,y0,x1,y1`` in fractions of the output size or a mask file of
the output's size (``-`` for "anywhere").

``--background`` gives an image of the scene's backdrop (SDXL and the miniature; refused with ``--flux``), and
``--background-start`` how much of its mean colour the starting latent gets (default: the weights' value).

``--flux`` runs FLUX.1-dev with the authors' released AnyStory weights (``--flux-weights``: a local
``anystory_flux.bin``, default the hub's); ``--vram auto|16|24|40`` picks quantization and offload for the GPU
(``--quantization`` / ``--offload`` override it), and the choice is printed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import torch
from PIL import Image

from .errors import InvalidInputError, check_number
from .output_files import check_output, save_image
from .hub import FLUX_ANYSTORY_REPO
from .cli_options import add_device, add_generation, add_seed, add_vram, add_weights
from .presets import preset
from .regions import parse_region_text


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in ``--help``."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m anystory.generate", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompt", required=True, help="what the image shows")
    p.add_argument("--negative-prompt", default=None, help="what it should not show")
    p.add_argument("--subject", action="append", default=[], help="reference image of a subject (repeatable)")
    p.add_argument("--mask", action="append", default=[], help="mask for the subject at the same position, or -")
    p.add_argument("--region", action="append", default=[],
                   help="layout for the subject at the same position: x0,y0,x1,y1 (fractions of the output), a mask "
                        "file of the output's size, or - (anywhere)")
    p.add_argument("--scale", type=float, default=1.0, help="semantic condition strength (eta)")
    p.add_argument("--reference-scale", type=float, default=1.0, help="ReferenceNet condition strength")
    p.add_argument("--background", default=None,
                   help="image of the scene's backdrop, applied where the router puts background (SDXL only)")
    p.add_argument("--background-start", type=float, default=None,
                   help="strength of the background's mean colour in the starting latent; None: the weights' value")
    add_weights(p, os.environ.get("ANYSTORY_SDXL_WEIGHTS"), without="the shipped miniature")
    add_generation(p)
    add_seed(p)
    add_device(p)
    p.add_argument("--out", default="outputs/anystory.png", help="output image (PNG, JPEG or WebP by extension)")
    p.add_argument("--overwrite", action="store_true", help="replace --out (and its routing file) if they exist")
    p.add_argument("--save-routing", action="store_true", help="also save the last step's routing map overlay")
    flux = p.add_argument_group("FLUX (the authors' released weights)")
    flux.add_argument("--flux", action="store_true", help="use FLUX.1-dev + FLUX.1-Redux-dev + anystory_flux.bin")
    flux.add_argument("--flux-weights", default=os.environ.get("ANYSTORY_FLUX_WEIGHTS"),
                      help=f"anystory_flux.bin (file, folder or hub id); None: {FLUX_ANYSTORY_REPO}")
    add_vram(flux)
    flux.add_argument("--quantization", default=None, choices=("none", "int8", "bnb-8bit", "bnb-4bit"),
                      help="transformer and T5 quantization; None: the --vram preset's")
    flux.add_argument("--offload", default=None, choices=("none", "model", "group", "sequential"),
                      help="offload mode; None: the --vram preset's")
    flux.add_argument("--subject-preprocessing", default="app", choices=("app", "none"),
                      help="app: the authors' demo (mask > 200, square crop); none: image and soft mask as given")
    flux.add_argument("--reference-noise", default="call", choices=("call", "release"),
                      help="reference latent noise: the seed's CPU stream, or the release's global device RNG")
    return p.parse_args(argv)


def load_flux(args):
    """The FLUX pipeline placed by the ``--vram`` plan (``--quantization`` / ``--offload`` override it)."""
    from .flux.low_vram import apply_offload, plan_for_vram
    from .loading import load_flux_release

    plan = plan_for_vram(args.vram, args.device)
    quantization, offload = args.quantization or plan.quantization, args.offload or plan.offload
    print(f"FLUX: {plan.describe()}; using quantization={quantization}, offload={offload}")
    pipe = load_flux_release(args.flux_weights, quantization=quantization,
                             torch_dtype=torch.bfloat16 if args.device != "cpu" else torch.float32)
    apply_offload(pipe, offload, args.device)
    return pipe


def model_kind(args) -> str:
    """Which preset (``anystory/presets.py``) the flags run: ``flux``, ``sdxl`` or the shipped ``miniature``."""
    return "flux" if args.flux else "sdxl" if args.anystory_weights else "miniature"


def _paired(values: list, count: int) -> list:
    """Per-subject values given in subject order, ``-`` or absent meaning none."""
    return [None if v == "-" else v for v in values] + [None] * (count - len(values))


def _region(text, index: int):
    """``--region``: a box of four numbers, else a mask file (checked as ``Subject(region=...)`` checks it)."""
    if text is None or not re.fullmatch(r"[\s\d.,;eE+-]+", text):
        return text
    return parse_region_text(text, f"subject {index}")


def _as_flags(error: Exception) -> str:
    """The library counts subjects from 0; name the flag as typed."""
    text = re.sub(r"^subject (\d+)", lambda m: f"--subject #{int(m.group(1)) + 1}", str(error))
    return re.sub(r"^background(_start)?\b", lambda m: "--background" + ("-start" if m.group(1) else ""), text)


def check_inputs(args) -> list:
    """Every input checked before a model loads (that takes seconds to minutes); returns the subjects.

    Raises ``InvalidInputError`` naming the problem: a missing or unreadable file, a mask of the wrong size, a
    bad region, an empty prompt, a bad number, an output path that cannot be written.
    """
    from .subjects import MAX_SUBJECTS, Subject, prepare_subjects

    if not args.prompt.strip():
        raise InvalidInputError("--prompt is empty: describe the scene")
    for flag, values in (("masks", args.mask), ("regions", args.region)):
        if len(values) > len(args.subject):
            raise InvalidInputError(f"{len(values)} {flag} for {len(args.subject)} subjects")
    for flag in ("steps", "height", "width"):
        if getattr(args, flag) is not None:
            check_number(getattr(args, flag), f"--{flag}", 1, integer=True)
    if args.guidance is not None:
        check_number(args.guidance, "--guidance", 0)
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in Image.registered_extensions():
        raise InvalidInputError(f"--out {args.out}: unknown image extension '{ext or 'none'}'; use .png, .jpg or .webp")
    check_background_flags(args)
    masks = _paired(args.mask, len(args.subject))
    try:  # files, masks, regions, sizes and scales, with no model
        regions = [_region(r, i) for i, r in enumerate(_paired(args.region, len(args.subject)))]
        subjects = [Subject(s, mask=m, scale=args.scale, reference_scale=args.reference_scale, region=r)
                    for s, m, r in zip(args.subject, masks, regions)]
        prepare_subjects(subjects, MAX_SUBJECTS)
    except InvalidInputError as e:
        raise InvalidInputError(_as_flags(e)) from None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise InvalidInputError(f"--out {args.out}: cannot create {out_dir} ({e.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise InvalidInputError(f"--out {args.out}: {out_dir} is not writable")
    return subjects


def check_background_flags(args) -> None:
    """``--background`` and ``--background-start``: readable, a number >= 0, and not with ``--flux`` (the released
    FLUX router has no background class; the pipeline refuses it too, but only after minutes of loading)."""
    if args.background_start is not None:
        if args.background is None:
            raise InvalidInputError("--background-start needs --background (the image whose colour it starts from)")
        check_number(args.background_start, "--background-start", 0.0)
    if args.background is None:
        return
    if args.flux:
        raise InvalidInputError("--background: the background reference is SDXL-only (the released FLUX router "
                                "has no background class to route it to); drop --background or --flux")
    from .images import read_rgb

    read_rgb(args.background, "--background")


def background_call(args) -> dict:
    """The pipeline keywords of the background flags (none without ``--background``: FLUX takes no such key)."""
    if args.background is None:
        return {}
    return {"background": args.background, "background_start": args.background_start}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        subjects = check_inputs(args)
        check_output(args.out, args.overwrite)
        if args.save_routing:
            check_output(_routing_path(args.out), args.overwrite, "the routing file")
    except InvalidInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .loading import ModelUnavailableError, load_default_pipeline, load_sdxl_anystory

    try:
        if args.flux:
            pipe = load_flux(args)
        elif args.anystory_weights:
            pipe = load_sdxl_anystory(args.anystory_weights, args.base_model, device=args.device)
        else:
            pipe = load_default_pipeline(device=args.device)
    except (ModelUnavailableError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    call = preset(model_kind(args)).call()
    if args.flux:
        call.update(subject_preprocessing=args.subject_preprocessing, reference_noise=args.reference_noise)
    if args.steps:
        call["num_inference_steps"] = args.steps
    if args.guidance is not None:
        call["guidance_scale"] = args.guidance
    try:
        out = pipe(args.prompt, subjects=subjects, negative_prompt=args.negative_prompt, height=args.height,
                   width=args.width, generator=torch.Generator("cpu").manual_seed(args.seed),
                   return_routing_maps=args.save_routing, **background_call(args), **call)
    except ValueError as e:  # what only the call can check (a region mask against the output size, diffusers' sizes)
        print(f"error: {_as_flags(e)}", file=sys.stderr)
        return 2
    try:
        save_image(out.images[0], args.out, args.overwrite)
        print(f"saved {args.out}")
        if args.save_routing and out.routing_maps:
            from .visualize import routing_overlay

            path = save_image(routing_overlay(out.images[0], out.routing_maps[-1][0]), _routing_path(args.out),
                              args.overwrite)
            print(f"saved {path}")
    except InvalidInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _routing_path(out: str) -> str:
    return os.path.splitext(out)[0] + "_routing.png"


if __name__ == "__main__":
    sys.exit(main())
