"""Seconds per image of a miniature at the app's defaults, beside the shipped one, on this machine's CPU.

    python -m benchmarks.miniature_speed --model runs/miniature/export-candidate [--against assets/miniature]

Each model generates at its own preset (``presets.preset_for``: the pipeline's native size, 20 steps, guidance 3),
whole calls timed (prompt encoding, reference encoding, denoising, decoding), with 0, 1 and 2 subjects
(references from the synthetic world). Calls are interleaved - round r runs every (model, subjects) once, the order
rotating - so a drift in a shared machine's speed hits every configuration alike and the ratios stay honest. Prints
the median and fastest seconds per call and the candidate's median over the shipped one's. Run it on an otherwise
idle CPU: with two threads on a loaded one, each call waits on its slower thread (it prints the load average).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from anystory import Subject
from anystory.cli_options import add_threads
from anystory.data.synthetic import IDENTITIES, SyntheticWorld
from anystory.loading import load_miniature
from anystory.presets import preset_for

PROMPTS = {0: "a red striped star on sand", 1: "an object on sand", 2: "two objects on sand"}


def _subjects(count: int) -> list:
    world = SyntheticWorld(424242)
    return [Subject(world.reference(IDENTITIES[k], 10000 + k).image) for k in range(count)]


def _call(pipe, count: int):
    settings = preset_for("miniature", pipe)
    subjects = _subjects(count)

    def run(seed: int):
        pipe(PROMPTS[count], subjects=subjects, height=settings.size, width=settings.size,
             generator=torch.Generator().manual_seed(max(seed, 0)), output_type="np", **settings.call())
    return run


def measure(models: dict, counts, repeats: int) -> dict:
    """``{(model, count): [seconds per call]}`` over ``repeats`` interleaved rounds, after one warm-up call each."""
    configs = []
    for name, pipe in models.items():
        for count in counts:
            run = _call(pipe, count)
            run(-1)
            configs.append(((name, count), run))
    times = {key: [] for key, _ in configs}
    for r in range(repeats):
        for key, run in configs[r % len(configs):] + configs[:r % len(configs)]:
            started = time.perf_counter()
            run(r)
            times[key].append(time.perf_counter() - started)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the candidate miniature's folder (an export)")
    p.add_argument("--against", default=None, help="the folder to compare with (default: the shipped assets/miniature)")
    p.add_argument("--subjects", default="0,1,2")
    p.add_argument("--repeats", type=int, default=5)
    add_threads(p)
    p.set_defaults(threads=os.cpu_count() or 1)  # the app runs on all of the machine's cores
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} cores, {args.threads} torch threads"
          + ("  (a loaded CPU: these times are not the model's)" if load > 0.5 * (os.cpu_count() or 1) else ""))
    models = {"shipped": load_miniature(path=args.against), "candidate": load_miniature(path=args.model)}
    for pipe in models.values():
        pipe.set_progress_bar_config(disable=True)
    counts = [int(c) for c in args.subjects.split(",")]
    times = measure(models, counts, args.repeats)
    print(f"{'model':10s} {'size':>5s} {'steps':>5s} {'subjects':>8s} {'median s':>9s} {'fastest s':>9s}")
    for (name, count), seconds in times.items():
        settings = preset_for("miniature", models[name])
        print(f"{name:10s} {settings.size:5d} {settings.steps:5d} {count:8d} {statistics.median(seconds):9.2f} "
              f"{min(seconds):9.2f}")
    for count in counts:
        ratio = statistics.median(times["candidate", count]) / statistics.median(times["shipped", count])
        print(f"candidate / shipped, {count} subject(s), median: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
