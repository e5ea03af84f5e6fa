"""The FLUX stages: train the release's weights (``anystory_flux.bin``) with the SDXL trainer's runner and loop.

    flux_base     the tiny base model alone, on the synthetic world (``flux_base``; off for a trained FLUX)
    flux_subject  the subject path: reference-pass LoRA ("ref") and the gated Redux projection ("redux")
    flux_router   the router: its LoRA ("router_lora"), token embedder ("router_embedder") and the processors'
                  routing-map projections ("routing_map")

What each stage trains is its ``train`` list (``flux_config.PARTS``; "router" = its three parts), so any part can
be trained or frozen in either stage. A stage starts from the previous FLUX stage's ``anystory_flux.bin``, else
from ``flux.init_from`` (a released file: fine-tuning), else from a fresh start (``release_export``); it writes
``<work_dir>/<stage>/anystory/anystory_flux.bin`` in the release's layout. Losses and routing: ``flux_step``.

    python -m anystory.training --config configs/flux_tiny.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml -m anystory.training --config configs/flux.yaml
"""
from __future__ import annotations

import os
from typing import Dict

import numpy as np
import torch

from ..flux.adapter_scope import REF_ADAPTER, ROUTER_ADAPTER
from ..flux.weights_flux import EMBEDDER_PARAMS, RELEASE_FILENAME, read_released_file
from .config import stage_dir
from .data import source_for
from .flux_base import load_trained_base
from .flux_config import RELEASE_STAGES, trained_parts
from .flux_step import DATA_STAGE, flux_step
from .loop import StageLoop, TrainedModules, make_accelerator

FROZEN = ("transformer", "vae", "text_encoder", "text_encoder_2", "image_encoder", "redux_embedder",
          "router_embedder")


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(name, name))


def load_flux_base(cfg: dict, trained: bool = True):
    """(pipeline without AnyStory weights, the Redux base the release's projections add to); the tiny base with the
    ``flux_base`` stage's transformer when that stage has run (``trained``)."""
    from ..flux.pipeline_flux import AnyStoryFluxPipeline

    fcfg = cfg["flux"]
    dtype = _dtype(fcfg["dtype"])
    if fcfg["base"] == "tiny":
        from ..flux.tiny_flux import TINY_REFERENCE_SIZE, tiny_flux_components, tiny_redux_base

        components = tiny_flux_components(int(cfg["seed"]), int(fcfg["single_blocks"]))
        pipe = AnyStoryFluxPipeline(**components, reference_size=TINY_REFERENCE_SIZE)
        if trained:
            load_trained_base(cfg, pipe.transformer)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return pipe, tiny_redux_base() if dtype == torch.float32 else tiny_redux_base().to(dtype=dtype)
    from transformers import SiglipImageProcessor, SiglipVisionModel

    encoder = SiglipVisionModel.from_pretrained(fcfg["redux"], subfolder="image_encoder", dtype=dtype)
    size = encoder.config.image_size
    pipe = AnyStoryFluxPipeline.from_pretrained(
        fcfg["base"], image_encoder=encoder, dtype=dtype,
        feature_extractor=SiglipImageProcessor(size={"height": size, "width": size}),
        reference_size=int(fcfg["reference_size"]))
    return pipe, fcfg["redux"]


def starting_weights(cfg: dict, stage: str, transformer, redux_dim: int):
    """The previous FLUX stage's output, else ``flux.init_from``, else a fresh start."""
    from ..flux.release_export import initial_released_state_dict

    previous = RELEASE_STAGES[:RELEASE_STAGES.index(stage)]
    for earlier in reversed(previous):
        path = os.path.join(stage_dir(cfg, earlier), "anystory", RELEASE_FILENAME)
        if os.path.isfile(path):
            return read_released_file(path)
    fcfg = cfg["flux"]
    if fcfg.get("init_from"):
        return read_released_file(str(fcfg["init_from"]))
    return initial_released_state_dict(transformer, redux_dim, int(fcfg["rank"]), int(cfg["seed"]),
                                       bool(fcfg["lora_bias"]))


def load_stage_input(cfg: dict, stage: str):
    if stage == "flux_base":
        return load_flux_base(cfg, trained=False)[0]
    pipe, redux_base = load_flux_base(cfg)
    weights = starting_weights(cfg, stage, pipe.transformer, pipe.image_encoder.config.hidden_size)
    pipe.load_anystory_weights(weights, redux_base=redux_base)
    return pipe


def trainable_parameters(pipe, parts) -> Dict[str, torch.nn.Parameter]:
    """The parameters of ``parts`` (``flux_config.PARTS``), by the name the checkpoint keeps them under."""
    tests = {"ref": lambda n: f".{REF_ADAPTER}." in n, "router_lora": lambda n: f".{ROUTER_ADAPTER}." in n,
             "routing_map": lambda n: "routing_map_lora" in n}
    out = {}
    for n, p in pipe.transformer.named_parameters():
        if any(tests[part](n) for part in parts if part in tests):
            out[f"transformer.{n}"] = p
    for part, name in (("redux", "redux_embedder"), ("router_embedder", "router_embedder")):
        if part in parts:
            out.update({f"{name}.{n}": p for n, p in getattr(pipe, name).named_parameters() if n in EMBEDDER_PARAMS})
    return out


def freeze_all(pipe) -> None:
    for name in FROZEN:
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False).eval()


def evaluate(cfg: dict, stage: str, pipe, batches: int = None, batch: int = 4):
    """Mean held-out losses (and router mIoU) on fixed samples, noise and noise levels; ``None`` without a
    held-out source."""
    source = source_for(cfg, DATA_STAGE[stage], "heldout")
    if source is None or not int(cfg[stage]["heldout_batches"]):
        return None
    counts = [i + 1 for i, w in enumerate(cfg[stage]["subjects"]) if w > 0]
    batches = int(cfg[stage]["heldout_batches"]) if batches is None else batches
    rows = []
    with torch.no_grad():
        for k in range(batches):
            out = flux_step(cfg, stage, pipe, source, k, batch, torch.Generator().manual_seed(1000 + k),
                            count=counts[k % len(counts)])
            rows.append({key: float(v) for key, v in out.items()})
    return {key: float(np.mean([r[key] for r in rows if key in r])) for key in rows[-1]}


def train_flux_stage(cfg: dict, pipe, log, stage: str) -> dict:
    scfg = cfg[stage]
    parts = trained_parts(scfg["train"])
    acc = make_accelerator(cfg, stage)
    pipe.to(acc.device)
    freeze_all(pipe)
    params = trainable_parameters(pipe, parts)
    for p in params.values():
        p.data = p.data.float()  # trained weights in float32 (the frozen model may be bfloat16: autocast mixes)
        p.requires_grad_(True)
    if cfg.get("gradient_checkpointing"):
        from .flux_checkpointing import enable

        enable(pipe)
    source = source_for(cfg, DATA_STAGE[stage])
    step = TrainedModules(lambda k, micro, gen: flux_step(cfg, stage, pipe, source, k, loop.global_batch, gen,
                                                          rows=loop.rows(micro)),
                          transformer=pipe.transformer, redux_embedder=pipe.redux_embedder,
                          router_embedder=pipe.router_embedder)
    loop = StageLoop(cfg, stage, params, acc, log, module=step)
    before = loop.run(before=lambda: evaluate(cfg, stage, pipe))
    freeze_all(pipe)
    after = evaluate(cfg, stage, pipe)
    if after:
        shown = ", ".join(f"{k} {v:.4f}" + (f" (before {before[k]:.4f})" if before else "") for k, v in after.items())
        log(f"[{stage}] held-out {shown}")
    return {"trained": list(parts), "heldout_before": before, "heldout_after": after, "seconds": loop.seconds}


def train_flux_subject(cfg: dict, pipe, log=print) -> dict:
    return train_flux_stage(cfg, pipe, log, "flux_subject")


def train_flux_router(cfg: dict, pipe, log=print) -> dict:
    return train_flux_stage(cfg, pipe, log, "flux_router")


def save_flux_weights(cfg: dict, pipe, directory: str) -> str:
    return pipe.save_anystory_weights(directory, _dtype(cfg["flux"]["save_dtype"]))
