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
which the release builds on).

What the release's loader accepts, we accept with the same meaning. It loads both LoRAs with diffusers'
``load_lora_weights`` (so every LoRA layout diffusers converts is read, and a ``<module>.alpha`` key sets PEFT's
scaling ``alpha / r``), and the rest with ``load_state_dict(strict=False)``. Keys it loads but never uses (a
LoRA on a module outside the target lists, text-encoder LoRA keys, unknown groups or parameters) are dropped
with an :class:`AnyStoryWeightsWarning` that lists them. Keys it needs and does not find are an
:class:`AnyStoryWeightsError` (the release would silently keep random weights there), as are wrong shapes.
A partial ``lora_B.bias`` set is completed with zeros, the value PEFT gives a bias the file does not hold.
"""
from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..attention_layout import flux_block_names as block_names
from ..errors import AnyStoryWeightsError
from ..hub import FLUX_ANYSTORY_FILE as RELEASE_FILENAME
from ..hub import FLUX_ANYSTORY_REPO as RELEASE_REPO
from ..weights import load_pickled_tensors

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


class AnyStoryWeightsWarning(UserWarning):
    """Keys of the file that the release loads but never uses; we drop them (the message lists them)."""


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


@dataclass
class GroupReport:
    missing: List[str] = field(default_factory=list)
    shapes: List[str] = field(default_factory=list)
    ignored: List[str] = field(default_factory=list)  # the release loads them into nothing: dropped, warned
    inactive: Dict[str, List[str]] = field(default_factory=dict)  # module -> LoRA keys the release never enables
    zero_bias: List[str] = field(default_factory=list)  # lora_B.bias keys PEFT would leave at zero

    def extend(self, other: "GroupReport") -> None:
        self.missing += other.missing
        self.shapes += other.shapes
        self.ignored += other.ignored
        self.inactive.update(other.inactive)
        self.zero_bias += other.zero_bias

    @property
    def ok(self) -> bool:
        return not (self.missing or self.shapes)

    def dropped(self) -> List[str]:
        return self.ignored + [k for keys in self.inactive.values() for k in keys]

    def describe(self, group: str) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing {len(self.missing)} key(s): {_names(self.missing)}")
        if self.shapes:
            parts.append(f"wrong shape for {len(self.shapes)} key(s): {_names(self.shapes, 6)}")
        return f"group '{group}': " + "; ".join(parts)


def _shape_note(key: str, got, want) -> str:
    return f"{key} {list(got)} (expected {list(want)})"


def normalise_lora(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """The release's first step for a LoRA group: diffusers' FLUX LoRA reader (format conversions, ``.alpha`` keys
    taken out as network alphas). Pure: nothing is loaded."""
    from diffusers import FluxPipeline

    try:
        out, alphas = FluxPipeline.lora_state_dict(dict(sd), return_alphas=True)
    except ValueError as e:
        raise AnyStoryWeightsError(f"diffusers cannot read this LoRA group: {e}") from None
    return out, dict(alphas or {})


def check_lora_group(sd: Dict[str, torch.Tensor], targets: Dict[str, Tuple[int, int]], modules=None,
                     alphas: Optional[Dict[str, torch.Tensor]] = None) -> GroupReport:
    """``sd``: a normalised LoRA group. Target modules must be complete; LoRAs on other modules of the model
    are ``inactive`` (the release loads them and never switches them on); any other key is ``ignored``."""
    report, seen = GroupReport(), {}
    for key, value in sd.items():
        m = _LORA_KEY.match(key)
        if m is not None and m["module"] in targets:
            seen.setdefault(m["module"], {})[m["param"]] = value
        elif m is not None and modules is not None and m["module"] in modules:
            report.inactive.setdefault(m["module"], []).append(key)
        else:
            report.ignored.append(key)
    for key in alphas or {}:
        module = key.removeprefix("transformer.").removesuffix(".alpha")
        if not key.startswith("transformer.") or (module not in targets and module not in report.inactive):
            report.ignored.append(key)
    with_bias = any("lora_B.bias" in p for p in seen.values())
    for module, (fan_in, fan_out) in targets.items():
        params = seen.get(module, {})
        for p in ("lora_A.weight", "lora_B.weight"):
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
        if with_bias and bias is None and b is not None:
            report.zero_bias.append(f"transformer.{module}.lora_B.bias")
    return report


def check_embedder(sd: Dict[str, torch.Tensor], prefix: str, redux_dim: Optional[int], text_dim: int) -> GroupReport:
    """An :class:`AnyStoryReduxEncoder` state dict (keys under ``prefix``); the rank is read from the file. Base
    weights the file lacks come from FLUX.1-Redux-dev, as in the release (which starts from that model)."""
    report = GroupReport()
    allowed = set(EMBEDDER_PARAMS) | set(EMBEDDER_BASE_PARAMS)
    report.ignored += [k for k in sd if not k.startswith(prefix) or k[len(prefix):] not in allowed]
    report.missing += [prefix + p for p in EMBEDDER_PARAMS if prefix + p not in sd]
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
    report.ignored += [k for k in sd if k not in wanted]
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


@dataclass
class ReleasedWeights:
    """A checked file, as the loader uses it. LoRA groups: diffusers' normalised state dict and network alphas
    (passed to ``load_lora_adapter`` as the release passes them), ``inactive``: modules whose LoRA the release
    loads but never enables (loaded, then removed from those layers so the adapter scopes never see them)."""

    ref: Dict[str, torch.Tensor]
    ref_alphas: Dict[str, torch.Tensor]
    ref_inactive: List[str]
    router_lora: Dict[str, torch.Tensor]
    router_alphas: Dict[str, torch.Tensor]
    router_inactive: List[str]
    processors: Dict[str, torch.Tensor]
    redux: Dict[str, torch.Tensor]
    router_embedder: Dict[str, torch.Tensor]
    ignored: List[str]


def _lora_with_zero_bias(sd, report: GroupReport) -> Dict[str, torch.Tensor]:
    out = {k: v for k, v in sd.items() if k not in report.ignored}
    for key in report.zero_bias:
        weight = out[key.replace("lora_B.bias", "lora_B.weight")]
        out[key] = weight.new_zeros(weight.shape[0])
    return out


def resolve_released_state_dict(state, transformer, redux_dim: Optional[int] = None) -> ReleasedWeights:
    """Check ``state`` as the release's loader reads it; raise :class:`AnyStoryWeightsError` naming every key it
    needs and lacks or that has a wrong shape, warn (:class:`AnyStoryWeightsWarning`) with every key it ignores."""
    if not isinstance(state, dict):
        raise AnyStoryWeightsError(f"expected a dict with groups {list(GROUPS)}, got {type(state).__name__}")
    problems = []
    missing_groups = [g for g in GROUPS if g not in state]
    if missing_groups:
        problems.append(f"top level: groups {list(GROUPS)} are needed; missing {missing_groups}")
    for g in GROUPS:
        if g in state and not isinstance(state[g], dict):
            problems.append(f"group '{g}' is a {type(state[g]).__name__}, not a state dict")
    if problems:
        raise AnyStoryWeightsError("Not the released AnyStory FLUX layout: " + " | ".join(problems))

    cfg = transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    text_dim = cfg.joint_attention_dim
    modules = {name for name, _ in transformer.named_modules()}
    ref, ref_alphas = normalise_lora(state["ref"])
    emb, procs, lora = split_router_group(state["router"])
    router_lora, router_alphas = normalise_lora(lora) if lora else ({}, {})
    ref_report = check_lora_group(ref, lora_targets(transformer, REF_TOP, REF_DOUBLE, REF_SINGLE), modules,
                                  ref_alphas)
    router_report = check_lora_group(router_lora, lora_targets(transformer, ROUTER_TOP, ROUTER_DOUBLE, ROUTER_SINGLE),
                                     modules, router_alphas)
    reports = {"ref": ref_report, "redux": check_embedder(state["redux"], "", redux_dim, text_dim)}
    router = check_embedder(emb, ROUTER_EMBEDDER_PREFIX, redux_dim, text_dim)
    router.extend(check_processors(procs, block_names(transformer), hidden))
    router.extend(router_report)
    reports["router"] = router
    bad = [r.describe(g) for g, r in reports.items() if not r.ok]
    if bad:
        raise AnyStoryWeightsError("Not the released AnyStory FLUX layout: " + " | ".join(bad))

    ignored = [f"{g}: {k}" for g, r in reports.items() for k in r.dropped()]
    ignored += [f"top level: {g}" for g in state if g not in GROUPS]
    if ignored:
        warnings.warn(f"anystory_flux.bin: {len(ignored)} key(s) that the release loads but never uses are ignored: "
                      f"{_names(ignored, 20)}", AnyStoryWeightsWarning, stacklevel=3)
    keep = lambda sd, r: {k: v for k, v in sd.items() if k not in r.ignored}  # noqa: E731
    return ReleasedWeights(
        ref=_lora_with_zero_bias(ref, ref_report), ref_alphas=keep(ref_alphas, ref_report),
        ref_inactive=list(ref_report.inactive), router_lora=_lora_with_zero_bias(router_lora, router_report),
        router_alphas=keep(router_alphas, router_report), router_inactive=list(router_report.inactive),
        processors={k: v for k, v in procs.items() if k not in router.ignored},
        redux={k: v for k, v in state["redux"].items() if k not in reports["redux"].ignored},
        router_embedder={k[len(ROUTER_EMBEDDER_PREFIX):]: v for k, v in emb.items() if k not in router.ignored},
        ignored=ignored)


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
    return load_pickled_tensors(path)


# ---- a failed load leaves the pipeline as it was -----------------------------------------------------------------
@dataclass
class FluxAnyStorySnapshot:
    """What a load replaces on an ``AnyStoryFluxPipeline``, kept so a load that fails half-way is undone: the
    attention processors, the AnyStory adapters (config, weights and the layers holding them), the conditioning
    state and its hooks, the embedders, and the model offload. Holds references only: the adapter weights are the
    live tensors, which deleting an adapter does not free while they are referenced here."""

    processors: dict
    saved_processors: Optional[dict]
    state: object
    attached: bool
    adapters: Dict[str, tuple]
    embedders: Dict[str, object]
    offload_device: object
    tuner_layers: set  # names of the PEFT-wrapped layers (wrappers a load adds are taken off again)
    peft_loaded: bool

    @classmethod
    def take(cls, pipe) -> "FluxAnyStorySnapshot":
        from peft import get_peft_model_state_dict

        from .adapter_scope import ANYSTORY_ADAPTERS

        transformer = pipe.transformer
        adapters = {}
        for name in ANYSTORY_ADAPTERS:
            if name in getattr(transformer, "peft_config", {}):
                layers = {n for n, m in transformer.named_modules()
                          if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {})}
                adapters[name] = (copy.deepcopy(transformer.peft_config[name]),
                                  get_peft_model_state_dict(transformer, adapter_name=name), layers)
        return cls(processors=dict(transformer.attn_processors), saved_processors=pipe._anystory_saved_processors,
                   state=pipe._anystory, attached=bool(pipe._anystory._handles), adapters=adapters,
                   embedders={k: getattr(pipe, k, None) for k in ("redux_embedder", "router_embedder")},
                   offload_device=getattr(pipe, "_offload_device", None) if getattr(pipe, "_all_hooks", None)
                   else None,
                   tuner_layers={n for n, m in transformer.named_modules() if isinstance(m, BaseTunerLayer)},
                   peft_loaded=getattr(transformer, "_hf_peft_config_loaded", False))

    def restore(self, pipe) -> None:
        from peft import inject_adapter_in_model, set_peft_model_state_dict

        from .adapter_scope import ANYSTORY_ADAPTERS, deactivate_anystory_adapters

        transformer = pipe.transformer
        if self.offload_device is not None:
            pipe.remove_all_hooks()
        present = [a for a in ANYSTORY_ADAPTERS if a in getattr(transformer, "peft_config", {})]
        if present:
            transformer.delete_adapters(present)
        self._unwrap_new_layers(transformer)
        for name, (config, sd, layers) in self.adapters.items():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                inject_adapter_in_model(config, transformer, adapter_name=name)
            set_peft_model_state_dict(transformer, sd, adapter_name=name)
            for module_name, m in transformer.named_modules():
                if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {}) and module_name not in layers:
                    m.delete_adapter(name)
        deactivate_anystory_adapters(transformer)
        if getattr(transformer, "peft_config", None) == {} and not self.peft_loaded:
            del transformer.peft_config
        transformer._hf_peft_config_loaded = self.peft_loaded
        transformer.set_attn_processor(self.processors)
        pipe._anystory_saved_processors = self.saved_processors
        pipe._anystory.detach()
        pipe._anystory = self.state
        if self.attached:
            self.state.attach(transformer)
        pipe.register_modules(**self.embedders)
        if self.offload_device is not None:
            pipe.enable_model_cpu_offload(device=self.offload_device)

    def _unwrap_new_layers(self, transformer) -> None:
        """PEFT wrappers the failed load added (now without adapters) give way to the layers they wrapped."""
        for name, module in list(transformer.named_modules()):
            if isinstance(module, BaseTunerLayer) and name not in self.tuner_layers:
                parent_name, _, child = name.rpartition(".")
                parent = transformer.get_submodule(parent_name) if parent_name else transformer
                setattr(parent, child, module.get_base_layer())
