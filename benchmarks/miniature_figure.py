"""The miniature at a glance: references beside what the model draws from them, with 1, 2 and 3 subjects.

    python -m benchmarks.miniature_figure [--model assets/miniature] [--rows 2] [--out runs/miniature_figure.png]

One row per scene of the routing study's held-out world (never seen in training; seed index 50000 + 10 x count +
row, away from the study's pairs and one-subject seeds): the subjects' reference views (framed in their map
colours), the output for the prompt that names no subject ("two objects on sand" - so the looks can only come from
the references), the same output with the last step's routing map over it (each subject in its map colour), and the
routing map alone. The default sampling settings are the miniature's preset (the app's). Nothing is picked: rows are
the first ``--rows`` scenes for each count.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from anystory import Subject
from anystory.cli_options import add_miniature_sampling
from anystory.data.synthetic import IDENTITIES, SyntheticWorld, WorldConfig, generic_caption_for
from anystory.loading import load_miniature
from anystory.subjects import prepare_subjects
from anystory.visualize import routing_colormap, routing_overlay, side_by_side, subject_colors
from benchmarks.routing_study import STUDY_SEED

CELL = 128
FIRST_INDEX = 50_000


def scene_subjects(world: SyntheticWorld, index: int, count: int) -> tuple:
    """``count`` named identities of distinct shapes and colours, and a backdrop, drawn from ``index``'s stream."""
    rng = np.random.default_rng([STUDY_SEED, index, 99])
    chosen = []
    for k in rng.permutation(len(IDENTITIES)):
        ident = IDENTITIES[int(k)]
        if all(ident.shape != c.shape and ident.colour != c.colour for c in chosen):
            chosen.append(ident)
        if len(chosen) == count:
            break
    backdrop = world.config.backgrounds[int(rng.integers(len(world.config.backgrounds)))]
    return chosen, backdrop


def label(text: str, width: int) -> Image.Image:
    panel = Image.new("RGB", (width, 14), (255, 255, 255))
    ImageDraw.Draw(panel).text((2, 1), text, fill=(0, 0, 0))
    return panel


def framed(panel: Image.Image, color) -> Image.Image:
    """A reference in a frame of its subject's map colour, so the overlays read back to it."""
    ImageDraw.Draw(panel).rectangle([0, 0, CELL - 1, CELL - 1], outline=tuple(color), width=4)
    return panel


def figure_row(pipe, world: SyntheticWorld, index: int, count: int, steps: int, guidance: float) -> Image.Image:
    subjects, backdrop = scene_subjects(world, index, count)
    refs = [world.reference(s, index, slot).image for slot, s in enumerate(subjects)]
    colors = subject_colors(count)
    prompt = generic_caption_for(count, backdrop)
    out = pipe(prompt, subjects=[Subject(r) for r in refs], num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(index), return_routing_maps=True)
    image, maps = out.images[0], out.routing_maps[-1][0]
    panels = [framed(prepare_subjects([Subject(r)])[0].image.convert("RGB").resize((CELL, CELL)), c)
              for r, c in zip(refs, colors)]
    panels += [Image.new("RGB", (CELL, CELL), (255, 255, 255))] * (3 - count)
    panels += [image.resize((CELL, CELL), Image.NEAREST),
               routing_overlay(image.resize((CELL, CELL), Image.NEAREST), maps, colors=colors),
               routing_colormap(maps, (CELL, CELL), colors)]
    row = side_by_side(panels, gap=4)
    names = ", ".join(s.name for s in subjects)
    caption = label(f'{names}  |  prompt: "{prompt}"', row.width)
    return Image.fromarray(np.concatenate([np.asarray(caption), np.asarray(row)]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.miniature_figure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_miniature_sampling(p)  # --model, --classifier (unused here), --steps, --guidance, --threads
    p.add_argument("--rows", type=int, default=2, help="scenes per subject count (1, 2 and 3 subjects)")
    p.add_argument("--out", default="runs/miniature_figure.png")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_miniature(path=args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    world = SyntheticWorld(STUDY_SEED, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))
    rows = [np.asarray(figure_row(pipe, world, FIRST_INDEX + 10 * count + r, count, args.steps, args.guidance))
            for count in (1, 2, 3) for r in range(args.rows)]
    gap = np.full((6, rows[0].shape[1], 3), 255, np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(np.concatenate([x for r in rows for x in (r, gap)][:-1])).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
