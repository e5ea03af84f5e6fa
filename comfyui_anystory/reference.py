"""The reference pass on ComfyUI's FLUX: the subjects' reference latents through the model's own modules, once per
sampling run, at timestep 0, with no text and the ``ref`` LoRA on the reference stream; each block's rotated keys
and values are kept (``AnyStoryFluxState.store_ref_kv``) for the denoising steps to attend to.

As in the diffusers pipeline (``conditioning_flux``), the pooled text vector and the guidance of the call enter the
pass's modulation, all subjects go in one batch (one row each, so a subject attends only to itself), and rows of
the batch with the same pooled vector share one pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy.ldm.flux.layers import timestep_embedding
from comfy.ldm.flux.math import apply_rope

from anystory.flux.conditioning_flux import distinct_rows

from .blocks import mlp, modulated, sdpa, split_heads
from .weights import StreamLoRA


def _double(block, index: int, img, vec, pe, lora: StreamLoRA, state):
    path = f"double_blocks.{index}."
    m = lora(path + "img_mod.lin", block.img_mod.lin, F.silu(vec[:, None])).chunk(6, dim=-1)
    x = modulated(block.img_norm1, img, m[0], m[1])
    q, k, v = split_heads(lora(path + "img_attn.qkv", block.img_attn.qkv, x), block.num_heads)
    q, k = block.img_attn.norm(q, k, v)
    q, k = apply_rope(q, k, pe)
    state.store_ref_kv(index, k.transpose(1, 2), v.transpose(1, 2))
    img = img + m[2] * lora(path + "img_attn.proj", block.img_attn.proj, sdpa(q, k, v))
    return img + m[5] * mlp(block.img_mlp, lora, path + "img_mlp", modulated(block.img_norm2, img, m[3], m[4]))


def _single(block, index: int, layer: int, x, vec, pe, lora: StreamLoRA, state):
    path = f"single_blocks.{index}."
    shift, scale, gate = lora(path + "modulation.lin", block.modulation.lin, F.silu(vec[:, None])).chunk(3, dim=-1)
    h = lora(path + "linear1", block.linear1, modulated(block.pre_norm, x, shift, scale))
    qkv, hidden_mlp = torch.split(h, [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    q, k, v = split_heads(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    q, k = apply_rope(q, k, pe)
    state.store_ref_kv(layer, k.transpose(1, 2), v.transpose(1, 2))
    out = torch.cat([sdpa(q, k, v), block.mlp_act(hidden_mlp)], dim=2)
    return x + gate * lora(path + "linear2", block.linear2, out)


def reference_pass(model, state, lora: StreamLoRA, y: torch.Tensor, guidance, dtype, device) -> None:
    """Fill ``state.ref_kv`` for the batch's pooled vectors ``y`` (``model``: ComfyUI's ``Flux`` module)."""
    distinct, index = distinct_rows(y[:, :model.params.vec_in_dim])
    n = state.num_subjects
    latents = state.ref_latents.to(device=device, dtype=dtype).repeat(len(distinct), 1, 1)
    rows = latents.shape[0]
    img = lora("img_in", model.img_in, latents)
    vec = model.time_in(timestep_embedding(torch.zeros(rows, device=device, dtype=dtype), 256).to(dtype))
    if model.params.guidance_embed and guidance is not None:
        vec = vec + model.guidance_in(timestep_embedding(guidance[:1].expand(rows), 256).to(dtype))
    vec = vec + model.vector_in(torch.stack(distinct).repeat_interleave(n, dim=0).to(dtype))
    pe = model.pe_embedder(state.ref_ids[None].to(device=device, dtype=dtype))
    state.ref_group, state._ref_parts, state.in_ref_pass = n, {}, True
    try:
        for i, block in enumerate(model.double_blocks):
            img = _double(block, i, img, vec, pe, lora, state)
        depth = len(model.double_blocks)
        for j, block in enumerate(model.single_blocks):
            img = _single(block, j, depth + j, img, vec, pe, lora, state)
    finally:
        state.in_ref_pass = False
    state.end_reference(index, device)
