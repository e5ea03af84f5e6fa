"""How both backbones lay out attention: the head split, and the names and keys of the attention layers AnyStory
conditions. One module, so the two backbones (and the weights files, whose keys are these names) cannot drift.

Head split. SDXL's processors call SDPA on ``[b, heads, L, d]`` (torch's layout: heads before tokens); FLUX's
keep diffusers' ``FluxAttnProcessor`` layout ``[b, L, heads, d]`` (tokens before heads: its RMS norms and RoPE
act on the last axes), so each layout has its function here and a processor uses exactly one.

Layer names. SDXL: every ``attn2`` of the UNet with a key projection is a cross-attention layer AnyStory adds a
router and semantic projections to, stored under :func:`layer_key` of its module path (a ``ModuleDict`` key may
not hold dots). FLUX: every block of the transformer, double blocks first, is one attention layer; its index in
:func:`flux_blocks` is the layer id of the processors and hooks, its name in :func:`flux_block_names` the prefix
of its keys in the released file.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., L, heads*d]`` -> ``[..., heads, L, d]`` (SDXL: SDPA's layout)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def heads_last(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[..., L, h*head_dim]`` -> ``[..., L, h, head_dim]`` (FLUX: diffusers' ``FluxAttnProcessor`` layout)."""
    return x.unflatten(-1, (-1, head_dim))


def layer_key(layer_name: str) -> str:
    """A layer's module path as a ``ModuleDict`` / ``ParameterDict`` key (dots are not allowed there)."""
    return layer_name.replace(".", "_")


def cross_attention_layers(unet: nn.Module) -> list:
    """SDXL: ``[name, latent_dim, cross_dim, inner_dim]`` for every cross-attention layer of ``unet``."""
    layers = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            layers.append([name, module.to_q.in_features, module.to_k.in_features, module.to_k.out_features])
    return layers


def flux_blocks(transformer: nn.Module) -> List[nn.Module]:
    """FLUX: the transformer's blocks in layer-id order, double blocks first."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def flux_block_names(transformer: nn.Module) -> List[str]:
    """FLUX: the module paths of :func:`flux_blocks`, in the same order."""
    return ([f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
            + [f"single_transformer_blocks.{j}" for j in range(len(transformer.single_transformer_blocks))])
