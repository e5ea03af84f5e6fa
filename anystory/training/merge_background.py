"""Ship the background stage's weights into an exported AnyStory folder by *adding* its ``background.*`` tensors.

The background stage trains nothing but ``background.*`` (everything else frozen), so its result can join a
shipped ``anystory.safetensors`` without rewriting the rest: every tensor already in the file is kept as it is
(a router retrained since, say), the ``background.*`` ones are added or replaced, and ``background_rank`` is set
in ``anystory_config.json``. The export stage writes the same keys when the whole miniature is rebuilt.

    python -m anystory.training.merge_background --config configs/miniature.yaml
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from ..cli_options import add_config
from ..sdxl.adapter_sdxl import CONFIG_NAME, WEIGHTS_NAME
from ..weights import load_tensors, read_metadata, save_tensors
from .config import load_config, stage_dir

PREFIX = "background."


def merge_background(source: str, target: str, dtype: torch.dtype = torch.float16) -> list:
    """Add ``source``'s ``background.*`` tensors (cast to ``dtype``) and its ``background_*`` config values to
    the AnyStory weights in folder ``target``; returns the keys written. Every other tensor of ``target`` is kept."""
    ours = {k: t.to(dtype) for k, t in load_tensors(os.path.join(source, WEIGHTS_NAME)).items() if k.startswith(PREFIX)}
    with open(os.path.join(source, CONFIG_NAME)) as f:
        source_config = json.load(f)
    rank = source_config.get("background_rank", 0)
    if not ours or not rank:
        raise ValueError(f"{source} holds no background reference weights (run the background stage first)")
    path = os.path.join(target, WEIGHTS_NAME)
    kept = {k: t for k, t in load_tensors(path).items() if not k.startswith(PREFIX)}
    config_path = os.path.join(target, CONFIG_NAME)
    with open(config_path) as f:
        config = json.load(f)
    config["background_rank"] = rank
    config["background_gate"] = bool(source_config.get("background_gate", False))
    config["background_token_rank"] = int(source_config.get("background_token_rank", 0))
    config["background_ip_rank"] = int(source_config.get("background_ip_rank", 0))
    config["background_start"] = float(source_config.get("background_start", 0.0))
    save_tensors({**kept, **ours}, path, metadata=read_metadata(path))
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)
    return sorted(ours)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anystory.training.merge_background", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(p)
    p.add_argument("--work-dir", default=None, help="the training run's work_dir (default: the config's)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, {"work_dir": args.work_dir} if args.work_dir else None)
    keys = merge_background(os.path.join(stage_dir(cfg, "background"), "anystory"), cfg["export_dir"],
                            getattr(torch, cfg["model"]["save_dtype"]))
    print(f"added {len(keys)} background tensors to {cfg['export_dir']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
