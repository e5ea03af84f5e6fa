"""Training throughput of stages 1 and 2 on this machine, with 1 and with 2 processes (samples per second).

    python -m benchmarks.training_throughput --config configs/miniature.yaml --steps 30 --batch 6

The miniature's model (random weights: speed does not depend on them) trains stage 1 then stage 2 under
``accelerate launch`` with ``configs/accelerate/ddp.yaml``, once per process count, each process on one thread.
Samples/s = samples of the global batch (per-process batch x processes) per second of training steps, timed
from the stage's own log between its third step and its last (start-up, held-out losses and warm-up excluded).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

from anystory.cli_options import add_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prepare_base(config: str, work: str) -> None:
    """An untrained base pipeline where the miniature's ``base`` stage would leave its output."""
    from anystory import AnyStorySDXLPipeline
    from anystory.training.components import build_components
    from anystory.training.config import load_config
    from anystory.training.export import save_base_pipeline

    cfg = load_config(config, {"work_dir": work})
    torch.manual_seed(0)
    save_base_pipeline(AnyStorySDXLPipeline(**build_components(cfg)), os.path.join(work, "base", "pipeline"))
    os.makedirs(os.path.join(work, "base", "checkpoint"), exist_ok=True)
    with open(os.path.join(work, "base", "checkpoint", "state.json"), "w") as f:
        json.dump({"step": 1, "done": True}, f)


def samples_per_second(work: str, stage: str, global_batch: int, skip: int = 2) -> float:
    with open(os.path.join(work, stage, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    first, last = rows[skip], rows[-1]
    return (last["step"] - first["step"]) * global_batch / (last["seconds"] - first["seconds"])


def run(config: str, steps: int, batch: int, processes=(1, 2), out: str = "runs/training_throughput") -> list:
    base = os.path.join(out, "base")
    shutil.rmtree(out, ignore_errors=True)
    prepare_base(config, base)
    rows = []
    for n in processes:
        work = os.path.join(out, f"p{n}")
        shutil.copytree(base, work)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               os.path.join(ROOT, "configs", "accelerate", "ddp.yaml"), "--num_processes", str(n),
               "--mixed_precision", "no", "-m", "anystory.training", "--config", config, "--stages", "stage1,stage2",
               "--set", f"work_dir={work}", "--set", "log_every=1", "--set", "trackers=[]", "--set", "threads=1"]
        for stage in ("stage1", "stage2"):
            cmd += ["--set", f"{stage}.steps={steps}", "--set", f"{stage}.batch_size={batch}"]
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for stage in ("stage1", "stage2"):
            rows.append({"stage": stage, "processes": n, "batch_per_process": batch,
                         "samples_per_s": samples_per_second(work, stage, batch * n)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(p, os.path.join(ROOT, "configs", "miniature.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=6, help="per process")
    p.add_argument("--out", default="runs/training_throughput")
    args = p.parse_args(argv)
    rows = run(args.config, args.steps, args.batch, out=args.out)
    single = {r["stage"]: r["samples_per_s"] for r in rows if r["processes"] == 1}
    print("| stage | processes | batch per process | samples/s | vs 1 process |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['processes']} | {r['batch_per_process']} | {r['samples_per_s']:.1f} | "
              f"{r['samples_per_s'] / single[r['stage']]:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
