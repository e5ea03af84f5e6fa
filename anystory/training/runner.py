"""Train AnyStory: ``python -m anystory.training --config configs/miniature.yaml`` runs every stage in order.

Stages (each also runs alone: ``python -m anystory.training.<stage> --config ...``):

    vae     the miniature's small VAE                         (miniature only)
    clip    its small CLIP image/text encoders, contrastive   (miniature only)
    base    its text-to-image UNet + text encoders (stage 0)  (miniature only)
    stage1  AnyStory's subject encoder on paired data
    stage2  AnyStory's router, encoder frozen, routing loss
    background  the background reference, all else frozen (synthetic world; skipped when its steps are 0)
    export  the diffusers-format folder (``export_dir``)

With ``base_model`` set in the config (an SDXL folder or hub id) the miniature stages are skipped and stages 1-2
train on top of it. Every stage checkpoints into ``<work_dir>/<stage>/`` and resumes from there; a finished
stage is skipped, so re-running the command continues where it stopped.

Stages 1-2 run on many processes: ``accelerate launch --num_processes 8 -m anystory.training --config ...``
(``--config_file configs/accelerate/<ddp|deepspeed_zero2|fsdp>.yaml`` picks the strategy). ``batch_size`` is
per process; only the main process writes checkpoints, weights, logs and the summary. The miniature's own stages
(vae, clip, base) run on one process.

This module is the one runner of the stages: ``python -m anystory.training`` (``__main__``) and ``python -m
anystory.training.<stage>`` both call :func:`run_stages`. The stage modules import it only when run as a script,
so the import graph runs one way: runner -> stages.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time

import torch
import yaml

from ..cli_options import add_config
from .config import STAGES, load_config, stage_dir, stages_of
from .flux_config import FLUX_STAGES
from .loop import StageStopped

MINIATURE_ONLY = ("vae", "clip", "base")


def _quiet() -> None:
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _parse(argv=None, only=None):
    p = argparse.ArgumentParser(prog="python -m anystory.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(p)
    if only is None:
        p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} (SDXL) or "
                                                      f"{','.join(FLUX_STAGES)} (backbone: flux); default: all")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set stage1.steps=50 (value parsed as YAML)")
    args = p.parse_args(argv)
    stages = list(only) if only else [s.strip() for s in (args.stages or "").split(",") if s.strip()] or None
    unknown = [s for s in stages or () if s not in STAGES + FLUX_STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {','.join(STAGES + FLUX_STAGES)}")
    overrides: dict = {}
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        node = overrides
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return args, stages, overrides


def _pipeline_dir(cfg: dict, stage: str) -> str:
    return os.path.join(stage_dir(cfg, stage), "pipeline")


def _anystory_dir(cfg: dict, stage: str) -> str:
    return os.path.join(stage_dir(cfg, stage), "anystory")


def _done(cfg: dict, stage: str) -> bool:
    state = os.path.join(stage_dir(cfg, stage), "checkpoint", "state.json")
    if not os.path.isfile(state):
        return False
    with open(state) as f:
        finished = json.load(f).get("done", False)
    if stage == "flux_base":
        from .flux_base import trained_base_path

        return finished and os.path.isfile(trained_base_path(cfg))
    output = _pipeline_dir(cfg, stage) if stage in MINIATURE_ONLY else _anystory_dir(cfg, stage)
    return finished and os.path.isdir(output)


def load_stage_input(cfg: dict, stage: str):
    """The pipeline a stage starts from, read from the previous stage's output (or built / downloaded)."""
    from ..sdxl.pipeline_sdxl import AnyStorySDXLPipeline

    if stage in FLUX_STAGES:
        from .flux_stages import load_stage_input as load_flux_stage_input

        return load_flux_stage_input(cfg, stage)
    if stage == "vae":
        from .components import build_components

        return AnyStorySDXLPipeline(**build_components(cfg))
    previous = {"clip": "vae", "base": "clip"}.get(stage)
    if previous:
        return _load_pipeline(_pipeline_dir(cfg, previous), previous)
    tuned = _pipeline_dir(cfg, "stage1")  # stage 1 wrote its own pipeline if it fine-tuned the UNet
    if stage != "stage1" and os.path.isfile(os.path.join(tuned, "model_index.json")):
        pipe = _load_pipeline(tuned, "stage1")
    elif cfg.get("base_model"):
        pipe = _load_external_base(cfg)
    else:
        pipe = _load_pipeline(_pipeline_dir(cfg, "base"), "base")
    if stage in ("stage2", "background", "export"):
        previous = {"stage2": "stage1", "background": "stage2"}.get(stage)
        if previous is None:  # export: the background stage's weights when it ran, else stage 2's
            previous = "background" if os.path.isdir(_anystory_dir(cfg, "background")) else "stage2"
        weights = _anystory_dir(cfg, previous)
        if not os.path.isdir(weights):
            raise FileNotFoundError(f"{stage} needs {weights}: run the previous stage first")
        pipe.load_anystory_weights(weights)
    return pipe


def _load_pipeline(path: str, stage: str):
    from ..sdxl.pipeline_sdxl import AnyStorySDXLPipeline

    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path} not found: run the '{stage}' stage first")
    return AnyStorySDXLPipeline.from_pretrained(path, dtype=torch.float32)


def _load_external_base(cfg: dict):
    from ..loading import load_sdxl_base

    return load_sdxl_base(cfg["base_model"], cfg.get("image_encoder"), dtype=torch.float32)


def run_stages(argv=None, only=None, log=print) -> int:
    from accelerate import PartialState

    args, stages, overrides = _parse(argv, only)
    try:
        cfg = load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as e:  # a typo in the file or a --set: the message, no traceback
        raise SystemExit(f"error: {e}") from None
    order = stages_of(cfg)
    stages = stages or list(order)
    foreign = [s for s in stages if s not in order]
    if foreign:
        raise SystemExit(f"error: stages {foreign} are not stages of backbone '{cfg['backbone']}' "
                         f"({','.join(order)})")
    torch.set_num_threads(int(cfg["threads"]))
    _quiet()
    state = PartialState(cpu=not torch.cuda.is_available())
    main = state.is_main_process
    log = log if main else (lambda *_: None)
    if cfg.get("base_model"):
        bad = [s for s in stages if s in MINIATURE_ONLY]
        if bad:
            raise SystemExit(f"error: stages {bad} build the miniature; base_model is set, so drop them from --stages")
    if state.num_processes > 1:
        todo = [s for s in stages if s in MINIATURE_ONLY and not _done(cfg, s)]
        if todo:
            raise SystemExit(f"error: stages {todo} build the miniature on one process; run them first with "
                             f"`python -m anystory.training --config {args.config} --stages {','.join(todo)}`, "
                             f"then launch stage1,stage2 on {state.num_processes} processes")
    os.makedirs(cfg["work_dir"], exist_ok=True)
    summary_path = os.path.join(cfg["work_dir"], "summary.json")
    summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
    summary["config"] = args.config
    pipe = None
    for stage in [s for s in order if s in stages]:
        if stage == "background" and not int(cfg["background"]["steps"]):
            log("[background] steps: 0; not trained (the weights ship without a background reference)")
            continue
        if stage == "flux_base" and not int(cfg["flux_base"]["steps"]):
            continue  # the FLUX base comes trained; only the tiny one built in code learns the world here
        if stage != "export" and _done(cfg, stage):
            log(f"[{stage}] already finished in {stage_dir(cfg, stage)}; skipped")
            pipe = None
            continue
        if stage == "export" and not main:  # the main process exports; the others wait for it
            state.wait_for_everyone()
            continue
        if pipe is None:
            pipe = load_stage_input(cfg, stage)
        pipe.set_progress_bar_config(disable=True)
        started = time.time()
        try:
            metrics = _run(stage, cfg, pipe, summary, log, main)
        except StageStopped as stop:
            log(str(stop))
            return 0
        state.wait_for_everyone()  # the stage's outputs are on disk before any process reads them
        metrics["wall_seconds"] = round(time.time() - started, 1)
        metrics["processes"] = state.num_processes
        summary[stage] = metrics
        pipe = None if stage == "flux_base" else pipe  # the next stage loads the trained base with AnyStory's weights
        if main:
            with open(summary_path, "w") as f:
                json.dump(summary, f, indent=1, default=float)
    return 0


# stage -> (module of this package, its training function); imported when the stage runs
STAGE_FUNCTIONS = {"vae": ("vae", "train_vae"), "clip": ("clip", "train_clip"), "base": ("base", "train_base"),
                   "stage1": ("stage1", "train_stage1"), "stage2": ("stage2", "train_stage2"),
                   "background": ("background", "train_background"),
                   "flux_base": ("flux_base", "train_flux_base"),
                   "flux_subject": ("flux_stages", "train_flux_subject"),
                   "flux_router": ("flux_stages", "train_flux_router")}


def _run(stage: str, cfg: dict, pipe, summary: dict, log, main: bool = True) -> dict:
    from .export import export_miniature, save_base_pipeline

    if stage == "export":
        return export_miniature(cfg, pipe, summary, log)
    module, name = STAGE_FUNCTIONS[stage]
    fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
    metrics = fn(cfg, pipe, log)
    if not main:
        return metrics
    if stage in MINIATURE_ONLY or (stage == "stage1" and cfg["stage1"].get("train_unet")):
        save_base_pipeline(pipe, _pipeline_dir(cfg, stage))
    if stage == "flux_base":
        from .flux_base import save_trained_base

        save_trained_base(cfg, pipe.transformer)
    elif stage in FLUX_STAGES:  # anystory_flux.bin in the release's layout
        from .flux_stages import save_flux_weights

        save_flux_weights(cfg, pipe, _anystory_dir(cfg, stage))
    elif stage not in MINIATURE_ONLY:
        pipe.save_anystory_weights(_anystory_dir(cfg, stage))
    return metrics
