"""``python -m benchmarks.run [--device cpu|cuda] [--backbone sdxl|flux] [--shape tiny|real]``

Per-step latency of the bare diffusers pipeline against AnyStory with 0, 1, 2 and 4 subjects, measured in one
run (median over repeats) and reported as ratios against the goals; reference-encoder passes per call; peak
memory; and eval-metric throughput. Prints a table and writes CSV.
"""
from __future__ import annotations

import argparse
import os
import platform

import pandas as pd
import torch

from anystory.cli_options import DEVICES, add_device, add_shape
from anystory.subjects import MAX_SUBJECTS

from .common import SUBJECTS

GOALS = {"sdxl": 1.10, "flux": 1.10}  # per-step time at 2 subjects / bare pipeline


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def parse(argv=None):
    """(the parsed flags, the subject counts)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device(p, "cpu", DEVICES)
    p.add_argument("--backbone", default="sdxl", choices=["sdxl", "flux", "all"])
    add_shape(p, "tiny")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--steps", type=int, default=None,
                   help="denoising steps per call (default 4; real shapes on a CPU: SDXL 2, FLUX 5, which gives "
                        "the redux tokens the share of steps they get in the pipeline's default 25: 1 of 5)")
    p.add_argument("--repeats", type=int, default=None,
                   help="calls per configuration (default 3; real shapes on a CPU: SDXL 1, FLUX 2)")
    p.add_argument("--height", type=int, default=None, help="override the image size (square)")
    p.add_argument("--subjects", default=",".join(map(str, SUBJECTS)),
                   help="comma-separated subject counts timed against the bare pipeline (default %(default)s)")
    p.add_argument("--references", default="segmented", choices=["segmented", "whole"],
                   help="FLUX subjects: the demo's segmented examples (only in-mask reference tokens are attended) "
                        "or random images without a mask (every reference token; the most attention a call carries)")
    p.add_argument("--skip-eval", action="store_true", help="skip eval-metric throughput")
    p.add_argument("--out", default="runs/benchmarks")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    try:
        subjects = tuple(int(n) for n in args.subjects.split(","))
    except ValueError:
        p.error(f"--subjects takes comma-separated whole numbers, got {args.subjects!r}")
    if any(n < 0 or n > MAX_SUBJECTS for n in subjects):
        p.error(f"--subjects: each count must be between 0 and {MAX_SUBJECTS} (the pipelines' maximum), "
                f"got {args.subjects!r}")
    return args, subjects


def summarise(table: pd.DataFrame, backbones) -> None:
    """Per backbone, one line: the per-step ratio at 2 subjects against its goal, and the reference passes."""
    two = table["subjects"] == 2
    for backbone in backbones:
        r = table[(table.backbone == backbone) & two]
        if not len(r):
            continue
        ratio = float(r.step_ratio.iloc[0])
        ok = table[table.backbone == backbone].passes_ok.dropna()
        passes = bool(ok.all()) if len(ok) else "not measured (UNet step only)"
        ours = table[(table.backbone == backbone) & (table.config != "bare diffusers")]
        ratios = ours.set_index("subjects")[["step_ratio", "step_min_ratio"]]
        beside = "".join(f"; {n} subjects {ratios.step_ratio[n]:.3f}x (fastest {ratios.step_min_ratio[n]:.3f}x)"
                         + (" (the bare model's work: machine noise)" if n == 0 else "")
                         for n in (0, 4) if n in ratios.index)
        fastest = float(r.step_min_ratio.iloc[0])
        print(f"{backbone}: per-step ratio at 2 subjects {ratio:.3f}x (median step; fastest step {fastest:.3f}x) "
              f"vs goal <= {GOALS[backbone]:.2f}x ({'met' if ratio <= GOALS[backbone] else 'NOT met'}){beside}; "
              f"reference passes per call == subjects: {passes}")


def main(argv=None) -> int:
    args, subjects = parse(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    slow = args.shape == "real" and args.device == "cpu"
    steps = args.steps or ((5 if args.backbone == "flux" else 2) if slow else 4)
    repeats = args.repeats or ((2 if args.backbone == "flux" else 1) if slow else 3)

    rows = []
    backbones = ["sdxl", "flux"] if args.backbone == "all" else [args.backbone]
    for backbone in backbones:
        if backbone == "sdxl":
            from .sdxl import run
        else:
            from .flux import run
        extra = {"references": args.references} if backbone == "flux" else {}
        rows += run(args.shape, args.device, steps=steps, repeats=repeats, dtype=dtype, height=args.height,
                    subjects=subjects, **extra)
    table = pd.DataFrame(rows)
    table["device"] = device_name(args.device)
    table["goal_step_ratio_at_2"] = table["backbone"].map(GOALS)
    two = table["subjects"] == 2
    table.loc[two, "meets_goal"] = table.loc[two, "step_ratio"] <= table.loc[two, "goal_step_ratio_at_2"]
    measured = table["reference_passes_per_call"].notna()  # NaN: a UNet-step-only run, no encoder ran
    table["passes_ok"] = (table["reference_passes_per_call"] == table["subjects"]).where(measured)

    os.makedirs(args.out, exist_ok=True)
    name = f"{args.backbone}_{args.shape}_{args.device}"
    table.to_csv(os.path.join(args.out, f"latency_{name}.csv"), index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table.drop(columns=["goal_step_ratio_at_2"]).to_string(index=False))
    summarise(table, backbones)

    if not args.skip_eval:
        try:
            from .eval_throughput import measure_eval_throughput
        except ImportError as e:
            print(f"eval throughput: not measured ({e})")
        else:
            ev = pd.DataFrame(measure_eval_throughput(device=args.device))
            ev.to_csv(os.path.join(args.out, f"eval_throughput_{args.device}.csv"), index=False)
            print(ev.to_string(index=False))
    print(f"CSV written under {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
