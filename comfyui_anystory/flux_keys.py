"""FLUX weights between ComfyUI's layout (``double_blocks.N.img_attn.qkv``, BFL's original) and diffusers'
(``transformer_blocks.N.attn.to_q``), both ways from ComfyUI's own key map (``comfy.utils.flux_to_diffusers``).

One map serves both directions, so they cannot drift apart: a diffusers key is either a whole ComfyUI tensor, a
row slice of a fused one (``to_q``/``to_k``/``to_v`` in ``qkv``; ``proj_mlp`` in a single block's ``linear1``),
or the final modulation with its shift/scale halves swapped. diffusers' own converter
(``convert_flux_transformer_checkpoint_to_diffusers``) fixes the width at 3072, so it cannot convert the small
models the tests use; this one reads the widths from the config.
"""
from __future__ import annotations

from typing import Dict, Tuple, Union

import torch

Target = Union[str, Tuple[str, Tuple[int, int, int]], Tuple[str, None, object]]


def flux_config(unet_config: dict) -> dict:
    """The fields of a ComfyUI FLUX ``unet_config`` that the key map needs."""
    return {"depth": unet_config["depth"], "depth_single_blocks": unet_config["depth_single_blocks"],
            "hidden_size": unet_config["hidden_size"]}


def diffusers_key_map(unet_config: dict) -> Dict[str, Target]:
    """``diffusers key -> ComfyUI key`` (or ``(key, (dim, start, size))`` for a slice, ``(key, None, fn)`` for a
    reordered tensor), as ComfyUI loads diffusers-format FLUX files."""
    import comfy.utils

    return comfy.utils.flux_to_diffusers(flux_config(unet_config))


def comfy_to_diffusers(sd: Dict[str, torch.Tensor], unet_config: dict) -> Dict[str, torch.Tensor]:
    """A ComfyUI FLUX state dict in diffusers' ``FluxTransformer2DModel`` layout. Keys the map does not know
    (e.g. a ControlNet's) raise: silently dropping a weight would make another model."""
    out, used = {}, set()
    for key, target in diffusers_key_map(unet_config).items():
        if isinstance(target, str):
            if target in sd:
                out[key] = sd[target]
                used.add(target)
            continue
        name, offset = target[0], target[1]
        if name not in sd:
            continue
        if offset is None:
            out[key] = target[2](sd[name])  # the final layer's (shift, scale) -> diffusers' (scale, shift)
        else:
            dim, start, size = offset
            out[key] = sd[name].narrow(dim, start, size).clone()
        used.add(name)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise KeyError(f"ComfyUI FLUX keys with no diffusers counterpart: {unknown[:8]}")
    return out


def diffusers_to_comfy(sd: Dict[str, torch.Tensor], unet_config: dict) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`comfy_to_diffusers`: fused tensors are assembled from their slices in row order."""
    out: Dict[str, torch.Tensor] = {}
    pieces: Dict[str, list] = {}
    key_map = diffusers_key_map(unet_config)
    unknown = sorted(k for k in sd if k not in key_map)
    if unknown:
        raise KeyError(f"diffusers FLUX keys with no ComfyUI counterpart: {unknown[:8]}")
    for key, value in sd.items():
        target = key_map[key]
        if isinstance(target, str):
            out[target] = value
        elif target[1] is None:
            out[target[0]] = target[2](value)  # swapping the halves is its own inverse
        else:
            dim, start, size = target[1]
            if dim != 0 or value.shape[0] != size:
                raise ValueError(f"{key}: expected {size} rows for {target[0]}, got {tuple(value.shape)}")
            pieces.setdefault(target[0], []).append((start, value))
    for name, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        expected = 0
        for start, value in parts:
            if start != expected:
                raise ValueError(f"{name}: rows {expected}..{start} have no diffusers tensor")
            expected += value.shape[0]
        out[name] = torch.cat([v for _, v in parts])
    return out
