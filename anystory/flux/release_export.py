"""AnyStory FLUX weights written in the release's layout (``anystory_flux.bin``), and a fresh start in it.

The authors' loader (``load_anystory_model``) reads a ``torch.save`` file, so a file that their code and
``AnyStoryFluxPipeline.from_released`` both load has to be one too: this is the one file we write with
``torch.save`` (plain tensors only; :func:`anystory.weights.load_pickled_tensors` reads it back with
``weights_only=True``). The layout is ``weights_flux``'s; the shapes are computed here once, for
:func:`initial_released_state_dict` (training from scratch) and the tiny test weights (``tiny_flux``).

A PEFT LoRA whose scaling is not 1 (a file with ``.alpha`` keys) is written with the scaling folded into
``lora_B`` (weight and bias), so the file needs no alpha and means the same to both loaders.
"""
from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .adapter_scope import REF_ADAPTER, ROUTER_ADAPTER
from .weights_flux import (EMBEDDER_PARAMS, PROCESSOR_PARAMS, REF_DOUBLE, REF_SINGLE, REF_TOP, RELEASE_FILENAME,
                           ROUTER_DOUBLE, ROUTER_EMBEDDER_PREFIX, ROUTER_SINGLE, ROUTER_TOP, block_names, lora_targets)

Shapes = Dict[str, Tuple[int, ...]]


def _lora_shapes(transformer, targets, rank: int, lora_bias: bool) -> Shapes:
    out = {}
    for module, (fan_in, fan_out) in lora_targets(transformer, *targets).items():
        out[f"transformer.{module}.lora_A.weight"] = (rank, fan_in)
        out[f"transformer.{module}.lora_B.weight"] = (fan_out, rank)
        if lora_bias:
            out[f"transformer.{module}.lora_B.bias"] = (fan_out,)
    return out


def embedder_shapes(redux_dim: int, text_dim: int, rank: int, prefix: str = "") -> Shapes:
    wide = 3 * text_dim
    shapes = {"redux_up_lora_A.weight": (rank, redux_dim), "redux_up_lora_B.weight": (wide, rank),
              "redux_up_lora_B.bias": (wide,), "redux_down_lora_A.weight": (rank, wide),
              "redux_down_lora_B.weight": (text_dim, rank), "redux_down_lora_B.bias": (text_dim,),
              "gate_proj.weight": (1, text_dim), "gate_proj.bias": (1,)}
    assert set(shapes) == set(EMBEDDER_PARAMS)
    return {prefix + k: s for k, s in shapes.items()}


def released_shapes(transformer, redux_dim: int, rank: int, lora_bias: bool = False) -> Dict[str, Shapes]:
    """``{group: {key: shape}}`` of a release-layout file for ``transformer`` (one rank for every part)."""
    cfg = transformer.config
    hidden, text_dim = cfg.num_attention_heads * cfg.attention_head_dim, cfg.joint_attention_dim
    processors = {}
    for name in block_names(transformer):
        for p in PROCESSOR_PARAMS:
            shape = (rank, hidden) if p.endswith("A.weight") else (hidden, rank) if p.endswith("B.weight") else (hidden,)
            processors[f"transformer.{name}.attn.processor.{p}"] = shape
    router = {**embedder_shapes(redux_dim, text_dim, rank, ROUTER_EMBEDDER_PREFIX), **processors,
              **_lora_shapes(transformer, (ROUTER_TOP, ROUTER_DOUBLE, ROUTER_SINGLE), rank, lora_bias)}
    return {"ref": _lora_shapes(transformer, (REF_TOP, REF_DOUBLE, REF_SINGLE), rank, lora_bias),
            "redux": embedder_shapes(redux_dim, text_dim, rank), "router": router}


def _starts_at_zero(key: str) -> bool:
    """The parts whose start makes the untrained adapter add nothing: LoRA ``B`` (weight and bias), the gate."""
    return "lora_B" in key or key.endswith(("gate_proj.weight", "gate_proj.bias"))


def initial_released_state_dict(transformer, redux_dim: int, rank: int, seed: int = 0,
                                lora_bias: bool = False) -> dict:
    """Where training from scratch starts: every ``lora_A`` drawn as PEFT draws it (``U(-1/sqrt(in), 1/sqrt(in))``,
    its Kaiming default), every ``lora_B`` and the gates zero. The reference pass then runs the base transformer,
    the Redux tokens are FLUX.1-Redux-dev's pooled with equal gates, and the routing logits use the base
    projections only."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for group, shapes in released_shapes(transformer, redux_dim, rank, lora_bias).items():
        out[group] = {}
        for key, shape in shapes.items():
            if _starts_at_zero(key):
                out[group][key] = torch.zeros(shape)
            else:
                bound = 1.0 / math.sqrt(shape[-1])
                out[group][key] = (torch.rand(shape, generator=g) * 2 - 1) * bound
    return out


def _adapter_state(transformer, adapter: str) -> Dict[str, torch.Tensor]:
    out = {}
    for name, layer in transformer.named_modules():
        if not isinstance(layer, BaseTunerLayer) or adapter not in getattr(layer, "lora_A", {}):
            continue
        scale = float(layer.scaling[adapter])
        b = layer.lora_B[adapter]
        out[f"transformer.{name}.lora_A.weight"] = layer.lora_A[adapter].weight
        out[f"transformer.{name}.lora_B.weight"] = b.weight * scale if scale != 1.0 else b.weight
        if b.bias is not None:
            out[f"transformer.{name}.lora_B.bias"] = b.bias * scale if scale != 1.0 else b.bias
    return out


def released_state_dict(pipe, dtype: Optional[torch.dtype] = None) -> dict:
    """The AnyStory weights loaded in ``pipe`` (an ``AnyStoryFluxPipeline``), as ``{ref, redux, router}``."""
    if not pipe.anystory_loaded:
        raise ValueError("no AnyStory weights are loaded in this pipeline: nothing to write")
    transformer = pipe.transformer
    processors = {}
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for name, block in zip(block_names(transformer), blocks):
        for key, value in block.attn.processor.state_dict().items():
            processors[f"transformer.{name}.attn.processor.{key}"] = value
    redux = {k: v for k, v in pipe.redux_embedder.state_dict().items() if k in EMBEDDER_PARAMS}
    router_embedder = {ROUTER_EMBEDDER_PREFIX + k: v for k, v in pipe.router_embedder.state_dict().items()
                       if k in EMBEDDER_PARAMS}
    state = {"ref": _adapter_state(transformer, REF_ADAPTER), "redux": redux,
             "router": {**router_embedder, **processors, **_adapter_state(transformer, ROUTER_ADAPTER)}}

    def plain(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu", dtype or t.dtype).contiguous().clone()

    return {group: {k: plain(v) for k, v in sorted(sd.items())} for group, sd in state.items()}


def save_released(pipe, directory: str, dtype: Optional[torch.dtype] = None, filename: str = RELEASE_FILENAME) -> str:
    """Write ``<directory>/anystory_flux.bin`` (through a temporary file: a kill mid-write leaves the old one)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, filename)
    torch.save(released_state_dict(pipe, dtype), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path
