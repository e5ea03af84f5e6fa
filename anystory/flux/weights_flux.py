"""The authors' released FLUX weights (``Junjie96/AnyStory``, ``anystory_flux.bin``): layout, checks, loading.

The layout below is read off the authors' loader (``anystory/generate.py::load_anystory_model``) and the
modules it fills (``module.py``, ``attention_processor.py``, the ``enable_lora`` calls of ``block.py`` /
``transformer.py`` / ``attention_processor.py``). ``torch.load(file, weights_only=True)`` gives a dict with
exactly three groups:

``ref`` - a PEFT LoRA of the transformer in diffusers' format, loaded as adapter ``anystory_ref``::

    transformer.<m>.lora_A.weight [r, in]   transformer.<m>.lora_B.weight [out, r]   (lora_B.bias [out]: all or none)
    <m> in  x_embedder
            transformer_blocks.<i>.{norm1.linear, attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, ff.net.2}
            single_transformer_blocks.<j>.{norm.linear, proj_mlp, proj_out, attn.to_q, attn.to_k, attn.to_v}

``redux`` - :class:`AnyStoryReduxEncoder` (9x9 tokens), on top of FLUX.1-Redux-dev's ``image_embedder``::

    redux_up_lora_A.weight [r, 1152]    redux_up_lora_B.weight [12288, r]   redux_up_lora_B.bias [12288]
    redux_down_lora_A.weight [r, 12288] redux_down_lora_B.weight [4096, r]  redux_down_lora_B.bias [4096]
    gate_proj.weight [1, 4096]          gate_proj.bias [1]
    (optional: redux_up.{weight,bias}, redux_down.{weight,bias}; otherwise FLUX.1-Redux-dev's are used)

``router`` - three parts, told apart by key as the authors' loader does::

    router_embedder.<the redux keys>                               (an AnyStoryReduxEncoder pooling to 3x3)
    transformer.<block>.attn.processor.to_{q,k}_routing_map_lora_A.weight [r, 3072],
                                                  ..._lora_B.weight [3072, r], ..._lora_B.bias [3072]
        <block> in transformer_blocks.<i>, single_transformer_blocks.<j> (every block)
    transformer.<m>.lora_{A,B}.weight (PEFT LoRA, adapter ``anystory_router``)
    <m> in  context_embedder
            transformer_blocks.<i>.{norm1_context.linear, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                                    attn.to_add_out, ff_context.net.2}
            single_transformer_blocks.<j>.{norm.linear, proj_mlp, proj_out, attn.to_q, attn.to_k, attn.to_v}

Shapes are for FLUX.1-dev / SigLIP-so400m; ranks are read from the file. The LoRA target lists are the
modules the release switches its adapters on for (the reference list is OminiControl's default target set,
which the release builds on). Where the release leaves room (LoRA ``lora_B.bias``, the Redux base weights)
both forms are accepted; anything else that differs is an error naming the keys.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

RELEASE_REPO = "Junjie96/AnyStory"
RELEASE_FILENAME = "anystory_flux.bin"
GROUPS = ("ref", "redux", "router")

REF_TOP = ("x_embedder",)
REF_DOUBLE = ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")
REF_SINGLE = ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")
ROUTER_TOP = ("context_embedder",)
ROUTER_DOUBLE = ("norm1_context.linear", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                 "ff_context.net.2")
ROUTER_SINGLE = REF_SINGLE
PROCESSOR_PARAMS = ("to_q_routing_map_lora_A.weight", "to_q_routing_map_lora_B.weight", "to_q_routing_map_lora_B.bias",
                    "to_k_routing_map_lora_A.weight", "to_k_routing_map_lora_B.weight", "to_k_routing_map_lora_B.bias")
EMBEDDER_PARAMS = ("redux_up_lora_A.weight", "redux_up_lora_B.weight", "redux_up_lora_B.bias",
                   "redux_down_lora_A.weight", "redux_down_lora_B.weight", "redux_down_lora_B.bias",
                   "gate_proj.weight", "gate_proj.bias")
EMBEDDER_BASE_PARAMS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
ROUTER_EMBEDDER_PREFIX = "router_embedder."

_LORA_KEY = re.compile(r"^transformer\.(?P<module>.+)\.(?P<param>lora_A\.weight|lora_B\.weight|lora_B\.bias)$")


class AnyStoryWeightsError(ValueError):
    """The file does not have the released layout; the message names the offending keys."""


def _names(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def lora_targets(transformer, top, double, single) -> Dict[str, Tuple[int, int]]:
    """``module name -> (in_features, out_features)`` of the base linear layers a LoRA group must cover."""
    modules = dict(transformer.named_modules())
    names = list(top)
    names += [f"transformer_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks)) for m in double]
    names += [f"single_transformer_blocks.{j}.{m}" for j in range(len(transformer.single_transformer_blocks))
              for m in single]
    out = {}
    for name in names:
        layer = modules[name]
        if isinstance(layer, BaseTunerLayer):
            layer = layer.get_base_layer()
        out[name] = (layer.in_features, layer.out_features)
    return out


def block_names(transformer) -> List[str]:
    return ([f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
            + [f"single_transformer_blocks.{j}" for j in range(len(transformer.single_transformer_blocks))])


@dataclass
class GroupReport:
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    shapes: List[str] = field(default_factory=list)

    def extend(self, other: "GroupReport") -> None:
        self.missing += other.missing
        self.unexpected += other.unexpected
        self.shapes += other.shapes

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shapes)

    def describe(self, group: str) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} key(s): {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)} key(s): {_names(self.unexpected)}")
        if self.shapes:
            parts.append(f"wrong shape for {len(self.shapes)} key(s): {_names(self.shapes, 6)}")
        return f"group '{group}': " + "; ".join(parts)


def _shape_note(key: str, got, want) -> str:
    return f"{key} {list(got)} (expected {list(want)})"


def check_lora_group(sd: Dict[str, torch.Tensor], targets: Dict[str, Tuple[int, int]]) -> GroupReport:
    report, seen = GroupReport(), {}
    for key, value in sd.items():
        m = _LORA_KEY.match(key)
        if m is None or m["module"] not in targets:
            report.unexpected.append(key)
            continue
        seen.setdefault(m["module"], {})[m["param"]] = value
    with_bias = any("lora_B.bias" in p for p in seen.values())
    for module, (fan_in, fan_out) in targets.items():
        params = seen.get(module, {})
        wanted = ["lora_A.weight", "lora_B.weight"] + (["lora_B.bias"] if with_bias else [])
        for p in wanted:
            if p not in params:
                report.missing.append(f"transformer.{module}.{p}")
        a, b = params.get("lora_A.weight"), params.get("lora_B.weight")
        rank = a.shape[0] if a is not None and a.ndim == 2 else None
        if a is not None and (a.ndim != 2 or a.shape[1] != fan_in):
            report.shapes.append(_shape_note(f"transformer.{module}.lora_A.weight", a.shape, ["r", fan_in]))
        if b is not None and (b.ndim != 2 or b.shape[0] != fan_out or (rank is not None and b.shape[1] != rank)):
            report.shapes.append(_shape_note(f"transformer.{module}.lora_B.weight", b.shape, [fan_out, rank or "r"]))
        bias = params.get("lora_B.bias")
        if bias is not None and tuple(bias.shape) != (fan_out,):
            report.shapes.append(_shape_note(f"transformer.{module}.lora_B.bias", bias.shape, [fan_out]))
    return report


def check_embedder(sd: Dict[str, torch.Tensor], prefix: str, redux_dim: Optional[int], text_dim: int) -> GroupReport:
    """An :class:`AnyStoryReduxEncoder` state dict (keys under ``prefix``); the rank is read from the file."""
    report = GroupReport()
    allowed = set(EMBEDDER_PARAMS) | set(EMBEDDER_BASE_PARAMS)
    for key in sd:
        if key[len(prefix):] not in allowed or not key.startswith(prefix):
            report.unexpected.append(key)
    for p in EMBEDDER_PARAMS:
        if prefix + p not in sd:
            report.missing.append(prefix + p)
    base = [p for p in EMBEDDER_BASE_PARAMS if prefix + p in sd]
    if base and len(base) != len(EMBEDDER_BASE_PARAMS):
        report.missing += [prefix + p for p in EMBEDDER_BASE_PARAMS if p not in base]
    a = sd.get(prefix + "redux_up_lora_A.weight")
    rank = a.shape[0] if a is not None and a.ndim == 2 else None
    if redux_dim is None and a is not None and a.ndim == 2:
        redux_dim = a.shape[1]
    r = rank or "r"
    wide = 3 * text_dim
    expected = {
        "redux_up_lora_A.weight": [r, redux_dim], "redux_up_lora_B.weight": [wide, r], "redux_up_lora_B.bias": [wide],
        "redux_down_lora_A.weight": [r, wide], "redux_down_lora_B.weight": [text_dim, r],
        "redux_down_lora_B.bias": [text_dim], "gate_proj.weight": [1, text_dim], "gate_proj.bias": [1],
        "redux_up.weight": [wide, redux_dim], "redux_up.bias": [wide], "redux_down.weight": [text_dim, wide],
        "redux_down.bias": [text_dim],
    }
    for p, shape in expected.items():
        v = sd.get(prefix + p)
        if v is not None and list(v.shape) != shape:
            report.shapes.append(_shape_note(prefix + p, v.shape, shape))
    return report


def check_processors(sd: Dict[str, torch.Tensor], blocks: List[str], hidden: int) -> GroupReport:
    report = GroupReport()
    wanted = {f"transformer.{b}.attn.processor.{p}" for b in blocks for p in PROCESSOR_PARAMS}
    report.unexpected += [k for k in sd if k not in wanted]
    report.missing += [k for k in wanted if k not in sd]
    for b in blocks:
        for which in ("q", "k"):
            stem = f"transformer.{b}.attn.processor.to_{which}_routing_map_lora_"
            a, bw, bb = sd.get(stem + "A.weight"), sd.get(stem + "B.weight"), sd.get(stem + "B.bias")
            rank = a.shape[0] if a is not None and a.ndim == 2 else None
            if a is not None and (a.ndim != 2 or a.shape[1] != hidden):
                report.shapes.append(_shape_note(stem + "A.weight", a.shape, ["r", hidden]))
            if bw is not None and (bw.ndim != 2 or bw.shape[0] != hidden or (rank and bw.shape[1] != rank)):
                report.shapes.append(_shape_note(stem + "B.weight", bw.shape, [hidden, rank or "r"]))
            if bb is not None and tuple(bb.shape) != (hidden,):
                report.shapes.append(_shape_note(stem + "B.bias", bb.shape, [hidden]))
    return report


def split_router_group(router: Dict[str, torch.Tensor]):
    """The authors' split: ``router_embedder.*``, ``*attn.processor*`` and the rest (the router LoRA)."""
    embedder, processors, lora = {}, {}, {}
    for k, v in router.items():
        if k.startswith(ROUTER_EMBEDDER_PREFIX):
            embedder[k] = v
        elif "attn.processor" in k:
            processors[k] = v
        else:
            lora[k] = v
    return embedder, processors, lora


def check_released_state_dict(state, transformer, redux_dim: Optional[int] = None) -> None:
    """Raise :class:`AnyStoryWeightsError` naming every key that does not fit the released layout."""
    if not isinstance(state, dict):
        raise AnyStoryWeightsError(f"expected a dict with groups {list(GROUPS)}, got {type(state).__name__}")
    problems = []
    missing_groups = [g for g in GROUPS if g not in state]
    extra_groups = [g for g in state if g not in GROUPS]
    if missing_groups or extra_groups:
        problems.append(f"top level: groups must be exactly {list(GROUPS)}; missing {missing_groups}, "
                        f"unexpected {extra_groups}")
    for g in GROUPS:
        if g in state and not isinstance(state[g], dict):
            problems.append(f"group '{g}' is a {type(state[g]).__name__}, not a state dict")
    if problems:
        raise AnyStoryWeightsError("Not the released AnyStory FLUX layout: " + " | ".join(problems))

    cfg = transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    text_dim = cfg.joint_attention_dim
    reports = {
        "ref": check_lora_group(state["ref"], lora_targets(transformer, REF_TOP, REF_DOUBLE, REF_SINGLE)),
        "redux": check_embedder(state["redux"], "", redux_dim, text_dim),
    }
    emb, procs, lora = split_router_group(state["router"])
    router = check_embedder(emb, ROUTER_EMBEDDER_PREFIX, redux_dim, text_dim)
    router.extend(check_processors(procs, block_names(transformer), hidden))
    router.extend(check_lora_group(lora, lora_targets(transformer, ROUTER_TOP, ROUTER_DOUBLE, ROUTER_SINGLE)))
    reports["router"] = router
    bad = [r.describe(g) for g, r in reports.items() if not r.ok]
    if bad:
        raise AnyStoryWeightsError("Not the released AnyStory FLUX layout: " + " | ".join(bad))


def read_released_file(source: str, filename: str = RELEASE_FILENAME, **hub_kwargs) -> dict:
    """``source``: the .bin file, a folder holding ``filename``, or a hub repo id (downloaded with huggingface_hub)."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{filename} not found in {source}")
    elif os.path.isfile(source):
        path = source
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(repo_id=source, filename=filename, **hub_kwargs)
        except Exception as e:
            raise FileNotFoundError(
                f"AnyStory FLUX weights: '{source}' is not a file or folder, and downloading {filename} from the hub "
                f"repo '{source}' failed ({type(e).__name__}: {e}). Pass the local path of {filename}.") from e
    return torch.load(path, map_location="cpu", weights_only=True)
