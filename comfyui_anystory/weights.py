"""``anystory_flux.bin`` on ComfyUI's FLUX: its two transformer LoRAs as per-stream low-rank terms on ComfyUI's
modules, the routing-map terms per block, and the Redux/router projections.

The file is checked exactly as the diffusers pipeline checks it (``anystory.flux.weights_flux``, on a weightless
diffusers skeleton of the same shape), then each LoRA module is found in ComfyUI's layout through ComfyUI's own
key map: ``to_q``/``to_k``/``to_v`` become row ranges of the fused ``qkv`` (or ``linear1``). The LoRAs are never
merged into the model's weights: the image/text stream must see the base model (with whatever the user's own
loaders and LoRAs made of it, fp8 and GGUF included), the reference stream base + ``ref``, the router stream
base + ``router``. Each stream adds ``B(A(x)) * scale`` to the base module's output, as PEFT does.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from anystory.flux.redux import AnyStoryReduxEncoder, released_embedder
from anystory.flux.weights_flux import (EMBEDDER_BASE_PARAMS, EMBEDDER_PARAMS, ROUTER_EMBEDDER_PREFIX, block_names,
                                        resolve_released_state_dict)

from .flux_keys import diffusers_key_map

REDUX_GRID, ROUTER_GRID = 9, 3  # tokens per side: 81 redux and 9 router tokens per subject
EMBEDDER_KEYS = set(EMBEDDER_PARAMS) | set(EMBEDDER_BASE_PARAMS)
_LORA = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>A\.weight|B\.weight|B\.bias)$")


def _on(cache: dict, tensors: tuple, x: torch.Tensor) -> tuple:
    """``tensors`` on ``x``'s device and dtype, converted once per device/dtype (not at every block call)."""
    key = (x.device, x.dtype)
    if key not in cache:
        cache[key] = tuple(None if t is None else t.to(device=x.device, dtype=x.dtype) for t in tensors)
    return cache[key]


@dataclass(frozen=True)
class LoraPart:
    start: int  # first output row of the ComfyUI module that this LoRA covers
    down: torch.Tensor  # A: [r, in]
    up: torch.Tensor  # B: [out, r]
    bias: Optional[torch.Tensor]
    scale: float
    cache: dict = field(default_factory=dict, compare=False, repr=False)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        down, up, bias = _on(self.cache, (self.down, self.up, self.bias), x)
        return F.linear(F.linear(x, down), up, bias) * self.scale


class StreamLoRA:
    """One adapter's terms keyed by ComfyUI module path (``double_blocks.0.img_attn.qkv``)."""

    def __init__(self, parts: Dict[str, List[LoraPart]]):
        self.parts = parts

    def __call__(self, path: str, module: torch.nn.Module, x: torch.Tensor,
                 base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``module(x)`` (or the given ``base``, its output already computed) plus this adapter's terms."""
        out = module(x) if base is None else base
        parts = self.parts.get(path)
        if not parts:
            return out
        out = out.clone()
        for part in parts:
            d = part.delta(x).to(out.dtype)
            out[..., part.start:part.start + d.shape[-1]] += d
        return out


def stream_lora(sd: Dict[str, torch.Tensor], alphas: Dict[str, torch.Tensor], inactive: List[str],
                key_map: dict) -> StreamLoRA:
    """A normalised LoRA group (diffusers module names) placed on ComfyUI's modules."""
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _LORA.match(key)
        if m is not None and m["module"] not in inactive:
            modules.setdefault(m["module"], {})[m["part"]] = value
    parts: Dict[str, List[LoraPart]] = {}
    for module, p in modules.items():
        target = key_map[module + ".weight"]
        name, start = (target, 0) if isinstance(target, str) else (target[0], target[1][1])
        down = p["A.weight"]
        alpha = alphas.get(f"transformer.{module}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        parts.setdefault(name.removesuffix(".weight"), []).append(
            LoraPart(start, down, p["B.weight"], p.get("B.bias"), scale))
    return StreamLoRA(parts)


def diffusers_skeleton(unet_config: dict):
    """A weightless (meta) diffusers ``FluxTransformer2DModel`` of the ComfyUI model's shape: the release's
    checks and module names are defined on it."""
    from diffusers import FluxTransformer2DModel

    c = unet_config
    with torch.device("meta"):
        return FluxTransformer2DModel(
            patch_size=1, in_channels=c["in_channels"] * c["patch_size"] ** 2, num_layers=c["depth"],
            num_single_layers=c["depth_single_blocks"], attention_head_dim=c["hidden_size"] // c["num_heads"],
            num_attention_heads=c["num_heads"], joint_attention_dim=c["context_in_dim"],
            pooled_projection_dim=c["vec_in_dim"], guidance_embeds=c["guidance_embed"],
            axes_dims_rope=tuple(c["axes_dim"]))


@dataclass
class RoutingTerms:
    """One block's ``to_{q,k}_routing_map_lora`` pair: ``(A, B, bias)`` each."""

    query: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    key: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    cache: dict = field(default_factory=dict, repr=False)

    def apply(self, which: str, x: torch.Tensor) -> torch.Tensor:
        a, b, bias = _on(self.cache.setdefault(which, {}), getattr(self, which), x)
        return F.linear(F.linear(x, a), b, bias)


@dataclass
class FluxAnyStoryWeights:
    """The release resolved for one FLUX model: what the patched blocks read."""

    ref: StreamLoRA
    router: StreamLoRA
    routing: List[RoutingTerms]  # per layer: double blocks, then single blocks
    ignored: List[str]


def resolve_for_model(state: dict, unet_config: dict, redux_dim: Optional[int] = None) -> FluxAnyStoryWeights:
    """Check ``state`` (the loaded file) against a FLUX model's shape; ``AnyStoryWeightsError`` names every key a
    mismatch touches (e.g. the file is for FLUX.1-dev and the model is another width)."""
    skeleton = diffusers_skeleton(unet_config)
    released = resolve_released_state_dict(state, skeleton, redux_dim)
    key_map = diffusers_key_map(unet_config)
    routing = []
    for name in block_names(skeleton):
        p = f"transformer.{name}.attn.processor.to_"
        terms = [tuple(released.processors[f"{p}{w}_routing_map_lora_{s}"] for s in ("A.weight", "B.weight", "B.bias"))
                 for w in ("q", "k")]
        routing.append(RoutingTerms(*terms))
    return FluxAnyStoryWeights(
        ref=stream_lora(released.ref, released.ref_alphas, released.ref_inactive, key_map),
        router=stream_lora(released.router_lora, released.router_alphas, released.router_inactive, key_map),
        routing=routing, ignored=released.ignored)


def projection_encoders(state: dict, redux_base: Optional[dict]) -> Tuple[AnyStoryReduxEncoder, AnyStoryReduxEncoder]:
    """The release's redux (9x9) and router (3x3) projections. ``redux_base``: FLUX.1-Redux-dev's ``redux_up`` /
    ``redux_down`` (a ComfyUI STYLE_MODEL's state dict), needed when the file does not carry them."""
    def base():
        if redux_base is None:
            raise ValueError("anystory_flux.bin has no redux_up/redux_down weights: connect FLUX.1-Redux-dev "
                             "(flux1-redux-dev.safetensors, loaded with 'Load Style Model') to the AnyStory loader")
        return {k: v for k, v in redux_base.items() if k.split(".")[0] in ("redux_up", "redux_down")}

    def group(sd, prefix=""):  # the keys the release's loader reads; others it ignores (resolve_for_model warns)
        return {k[len(prefix):]: v for k, v in sd.items() if k[len(prefix):] in EMBEDDER_KEYS and k.startswith(prefix)}

    return (released_embedder(group(state["redux"]), REDUX_GRID, base),
            released_embedder(group(state["router"], ROUTER_EMBEDDER_PREFIX), ROUTER_GRID, base))
