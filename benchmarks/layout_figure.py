"""The layout figure: one row per held-out pair of the miniature's world.

    python -m benchmarks.layout_figure [--pairs 3] [--out runs/layout_figure.png]

Columns: the two reference subjects, the background reference, their regions (the held-out scene's boxes, in the
subjects' map colours), the output and last-step routing map without regions, the same with ``Subject(region=...)``,
then with the regions and ``background=`` the background reference (prompt "two objects", which names no backdrop;
the reference is a backdrop of another kind than the row's, so what the scene shows comes from it). One seed per row.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from anystory import Subject
from anystory.data.synthetic import BACKGROUNDS, SyntheticWorld, WorldConfig
from anystory.loading import load_miniature
from anystory.presets import MINIATURE
from anystory.subjects import prepare_subjects
from anystory.visualize import routing_colormap, side_by_side, subject_colors
from benchmarks.routing_study import STUDY_SEED, held_out_pairs, scene_boxes

CELL = 128


def regions_panel(boxes, colors) -> Image.Image:
    panel = Image.new("RGB", (CELL, CELL), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for box, color in zip(boxes, colors):
        draw.rectangle([round(v * (CELL - 1)) for v in box], outline=tuple(color), width=3)
    return panel


def figure_row(pipe, world, k, subjects, bg, steps: int) -> Image.Image:
    size = world.config.image_size
    boxes = scene_boxes(world, k, subjects, bg)
    colors = subject_colors(len(subjects))
    refs = [world.reference(s, k, slot).image for slot, s in enumerate(subjects)]
    panels = [prepare_subjects([Subject(r)])[0].image.resize((CELL, CELL)) for r in refs]
    kinds = list(BACKGROUNDS)
    backdrop = world.background_reference(kinds[(kinds.index(bg) + 3) % len(kinds)], k)
    panels.append(backdrop.resize((CELL, CELL), Image.NEAREST))
    panels.append(regions_panel(boxes, colors))
    for regions, background in (([None] * len(subjects), None), (boxes, None), (boxes, backdrop)):
        prompt = "two objects" if background is not None else f"two objects on {bg}"
        out = pipe(prompt, subjects=[Subject(r, region=b) for r, b in zip(refs, regions)], background=background,
                   num_inference_steps=steps, generator=torch.Generator().manual_seed(k), return_routing_maps=True)
        panels.append(out.images[0].resize((CELL, CELL), Image.NEAREST))
        panels.append(routing_colormap(out.routing_maps[-1][0], (CELL, CELL), colors))
    return side_by_side(panels, gap=4)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layout_figure", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--steps", type=int, default=MINIATURE.steps, help="denoising steps (the miniature's preset)")
    p.add_argument("--out", default="runs/layout_figure.png")
    args = p.parse_args(argv)
    pipe = load_miniature()
    pipe.set_progress_bar_config(disable=True)
    size = pipe.default_sample_size * pipe.vae_scale_factor
    world = SyntheticWorld(STUDY_SEED, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))
    rows = [np.asarray(figure_row(pipe, world, k, subjects, bg, args.steps))
            for k, subjects, bg in held_out_pairs(world, args.pairs)]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    gap = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
    Image.fromarray(np.concatenate([x for r in rows for x in (r, gap)][:-1])).save(args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
