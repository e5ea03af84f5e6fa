"""The app's examples, run the way the app runs them and read by the identity classifier: is each subject there?

    python -m benchmarks.app_examples [--model assets/miniature] [--out runs/app_examples]

Every row of ``app.EXAMPLES`` (the miniature's synthetic subjects; the photo examples need SDXL or FLUX weights
and the app says so) goes through the Generate tab's own path, ``run_generation``: the row's reference files and
mask, its prompt and seed, the model's preset for everything else. The reference files are named for the world's
identities, so each subject's identity is known. The objects drawn are matched to the subjects as the routing
study matches them (``drawn_objects``) and read by the identity classifier: a subject counts as shown when its
object's shape, colour and texture all read right (the study's "exact identity"). Writes ``results.md`` and
``examples.png`` (per row: the references, the output, its routing overlay) to ``--out``.
"""
from __future__ import annotations

import argparse
import os
from typing import List

import numpy as np
import torch
from PIL import Image

from anystory.app.generate_tab import run_generation
from anystory.app.inputs import SubjectSlot
from anystory.app.models import ModelHandle
from anystory.cli_options import add_miniature_sampling
from anystory.data.identity_classifier import IdentityClassifier
from anystory.data.synthetic import Identity
from anystory.loading import load_miniature
from anystory.subjects import AlphaOrWholeImageSegmenter
from anystory.training.trajectory import drawn_objects
from anystory.visualize import side_by_side
from benchmarks.routing_study import fidelity

CELL = 128
MAX_SUBJECTS = 4  # reference columns, so every row's output lines up


def example_rows() -> list:
    """The app's synthetic example rows: ``(references, mask of the first, prompt, seed)``."""
    import app

    return [(list(r[2:2 + r[0]]), r[1], r[6], r[7]) for r in app.EXAMPLES]


def identity_of(path: str) -> Identity:
    """The world's identity a reference file is named for (``red_striped_star.png``, ``..._mask.png`` excluded)."""
    return Identity.parse(os.path.splitext(os.path.basename(path))[0].replace("_", " "))


def run_row(handle: ModelHandle, row, classifier: IdentityClassifier, steps, guidance) -> dict:
    paths, mask, prompt, seed = row
    slots = [SubjectSlot(Image.open(p), mask=Image.open(mask) if (i == 0 and mask) else None)
             for i, p in enumerate(paths)]
    result = run_generation(handle, AlphaOrWholeImageSegmenter(), slots, prompt, seed=seed, steps=steps,
                            guidance=guidance)
    identities = [identity_of(p) for p in paths]
    image = np.asarray(result.images[0].convert("RGB"))
    read = fidelity(image, drawn_objects(image, identities, classifier), identities, classifier)
    return {"prompt": prompt, "seed": seed, "subjects": [i.name for i in identities], "read": read,
            "panels": [on_white(Image.open(p)) for p in paths] + [None] * (MAX_SUBJECTS - len(paths))
            + [result.images[0], result.overlays[0]]}


def on_white(image: Image.Image) -> Image.Image:
    """A reference as the eye sees it: its cut-out (alpha) on white."""
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def table(rows: List[dict]) -> str:
    lines = ["| prompt | seed | subject | drawn | shape | colour | texture | shown (all three) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for k, name in enumerate(r["subjects"]):
            marks = " | ".join("yes" if r["read"][key][k] else "no"
                               for key in ("found", "shape", "colour", "texture", "identity"))
            lines.append(f"| {r['prompt'] if k == 0 else ''} | {r['seed'] if k == 0 else ''} | {name} | {marks} |")
    shown = sum(v for r in rows for v in r["read"]["identity"])
    total = sum(len(r["subjects"]) for r in rows)
    return "\n".join(lines + ["", f"Subjects shown (shape, colour and texture read right): {shown} of {total}."])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.app_examples", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_sampling(p)
    p.add_argument("--out", default="runs/app_examples")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_miniature(path=args.model)
    model = args.model or "assets/miniature"
    classifier = IdentityClassifier.load(args.classifier or os.path.join(model, "identity_classifier.safetensors"))
    handle = ModelHandle("miniature", pipe, "cpu", "benchmark")
    rows = [run_row(handle, row, classifier, args.steps, args.guidance) for row in example_rows()]
    os.makedirs(args.out, exist_ok=True)
    text = table(rows)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Model: {model}; {args.steps} steps, guidance {args.guidance:g}.\n\n{text}\n")
    blank = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    strips = [side_by_side([blank if x is None else x.resize((CELL, CELL), Image.NEAREST) for x in r["panels"]], gap=4)
              for r in rows]
    width = strips[0].width
    canvas = Image.new("RGB", (width, len(strips) * (CELL + 6)), (255, 255, 255))
    for i, s in enumerate(strips):
        canvas.paste(s, (0, i * (CELL + 6)))
    canvas.save(os.path.join(args.out, "examples.png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
