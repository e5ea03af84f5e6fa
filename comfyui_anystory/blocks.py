"""AnyStory's FLUX blocks on ComfyUI's own block modules (``comfy.ldm.flux.layers``).

A denoising step in which the reference or the router acts replaces each block's forward with the same
arithmetic on the same modules (so fp8, GGUF, LoRA-patched and offloaded weights behave as they do in the
block itself), plus what AnyStory adds (``anystory.flux.attention_processor_flux`` is the diffusers twin):

* the image/text queries also attend to the subjects' cached reference keys/values, with the reference bias
  (-100 outside a subject's mask, ``log(reference_scale)``) and, when routing, ``-inf`` on the subjects an image
  token is not routed to (``attention_bias``);
* the router tokens pass through the block on the text side (double) / the joint side (single) with the
  ``router`` LoRA (``weights.StreamLoRA``), and their mean query against every image key decides the block's
  one-hot routing map (``route_from_means``, shared with the diffusers processor).

Tensors are in ComfyUI's layout: queries/keys/values ``[b, heads, L, d]``, ``pe`` its rotary tables. Every other
step, and every step without subjects, runs ComfyUI's block itself (``patch.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from comfy.ldm.flux.math import apply_rope, apply_rope1

from anystory.flux.attention_processor_flux import attention_bias
from anystory.flux.router_flux import route_from_means

from .weights import FluxAnyStoryWeights, RoutingTerms, StreamLoRA


def modulated(norm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift, norm(x), 1 + scale)


def split_heads(qkv: torch.Tensor, heads: int):
    """``[b, L, 3*C]`` -> q, k, v ``[b, heads, L, d]`` (ComfyUI's order)."""
    b, length, _ = qkv.shape
    return qkv.view(b, length, 3, heads, -1).permute(2, 0, 3, 1, 4)


def sdpa(q, k, v, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[b, heads, L, d]`` in, ``[b, L, heads*d]`` out."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2)


def mlp(seq, lora: Optional[StreamLoRA], path: str, x: torch.Tensor) -> torch.Tensor:
    """ComfyUI's ``Linear, GELU, Linear`` MLP, with a stream's LoRA on either linear."""
    if lora is None:
        return seq(x)
    return lora(path + ".2", seq[2], seq[1](lora(path + ".0", seq[0], x)))


def routing(q_norm, k_norm, heads: int, query_base, router_norm, image_norm, image_key_proj, image_pe,
            terms: RoutingTerms, num_subjects: int, closed) -> torch.Tensor:
    """The block's one-hot ``[b, N, I]`` map (``router_flux.routing_map`` in ComfyUI's layout)."""
    q = query_base + terms.apply("query", router_norm)
    q = q_norm(q.unflatten(-1, (heads, -1))).unflatten(1, (num_subjects, -1)).mean(dim=(2, 3))  # [b, N, d]
    k = image_key_proj + terms.apply("key", image_norm)
    k = k_norm(k.unflatten(-1, (heads, -1))).mean(dim=2)  # [b, I, d]: RoPE commutes with the mean over heads
    k = apply_rope1(k[:, None], image_pe)[:, 0]
    closed = None if closed is None else closed.to(k.device)
    return route_from_means(q, k, num_subjects, closed).to(image_norm.dtype)


def attend(q, k, v, state, layer: int, maps) -> torch.Tensor:
    """Joint attention, with the cached reference columns and the AnyStory bias when the step has them."""
    plan, b = state.plan, q.shape[0]
    if plan.ref:
        ref_k, ref_v = (x.transpose(1, 2).to(k.dtype) for x in state.ref_kv_for(layer, b))
        k, v = torch.cat([k, ref_k], dim=2), torch.cat([v, ref_v], dim=2)
    return sdpa(q, k, v, attention_bias(state, plan, maps, b, q.dtype, q.device))


def double_block(block, index: int, img, txt, vec, pe, state, weights: FluxAnyStoryWeights):
    """``DoubleStreamBlock.forward`` with AnyStory; the router tokens move on in ``state.router_hidden``."""
    heads, c, path = block.num_heads, block.hidden_size, f"double_blocks.{index}."
    silu_vec = F.silu(vec[:, None])
    im = block.img_mod.lin(silu_vec).chunk(6, dim=-1)
    txt_mod = block.txt_mod.lin(silu_vec)
    tm = txt_mod.chunk(6, dim=-1)
    img_norm = modulated(block.img_norm1, img, im[0], im[1])
    img_qkv = block.img_attn.qkv(img_norm)
    iq, ik, iv = split_heads(img_qkv, heads)
    iq, ik = block.img_attn.norm(iq, ik, iv)
    tq, tk, tv = split_heads(block.txt_attn.qkv(modulated(block.txt_norm1, txt, tm[0], tm[1])), heads)
    tq, tk = block.txt_attn.norm(tq, tk, tv)
    q, k = apply_rope(torch.cat([tq, iq], dim=2), torch.cat([tk, ik], dim=2), pe)
    v = torch.cat([tv, iv], dim=2)
    t = txt.shape[1]

    maps = router = None
    if state.plan.route:
        lora, rh = weights.router, state.router_hidden
        rm = lora(path + "txt_mod.lin", block.txt_mod.lin, silu_vec, base=txt_mod).chunk(6, dim=-1)
        r_norm = modulated(block.txt_norm1, rh, rm[0], rm[1])
        base = block.txt_attn.qkv(r_norm)
        maps = routing(block.txt_attn.norm.query_norm, block.img_attn.norm.key_norm, heads, base[..., :c], r_norm,
                       img_norm, img_qkv[..., c:2 * c], pe[:, :, t:], weights.routing[index], state.num_subjects,
                       state.closed_regions)
        state.record(maps)
        rq, rk, rv = split_heads(lora(path + "txt_attn.qkv", block.txt_attn.qkv, r_norm, base=base), heads)
        rq, rk = block.txt_attn.norm(rq, rk, rv)
        r_out = sdpa(rq, torch.cat([k[:, :, t:], rk], dim=2), torch.cat([v[:, :, t:], rv], dim=2))
        rh = rh + rm[2] * lora(path + "txt_attn.proj", block.txt_attn.proj, r_out)
        router = rh + rm[5] * mlp(block.txt_mlp, lora, path + "txt_mlp", modulated(block.txt_norm2, rh, rm[3], rm[4]))

    out = attend(q, k, v, state, index, maps)
    txt_attn, img_attn = out[:, :t], out[:, t:]
    img = img + im[2] * block.img_attn.proj(img_attn)
    img = img + im[5] * block.img_mlp(modulated(block.img_norm2, img, im[3], im[4]))
    txt = txt + tm[2] * block.txt_attn.proj(txt_attn)
    txt = txt + tm[5] * block.txt_mlp(modulated(block.txt_norm2, txt, tm[3], tm[4]))
    if txt.dtype == torch.float16:
        txt = torch.nan_to_num(txt, nan=0.0, posinf=65504, neginf=-65504)
    if router is not None:
        state.router_hidden = router
    return img, txt


def single_block(block, index: int, layer: int, x, vec, pe, state, weights: FluxAnyStoryWeights, last: bool):
    """``SingleStreamBlock.forward`` with AnyStory. ``last``: the model's last block, after which nothing reads
    the router tokens (their update is skipped, as in the diffusers processor)."""
    heads, c, path = block.num_heads, block.hidden_size, f"single_blocks.{index}."
    silu_vec = F.silu(vec[:, None])
    mod = block.modulation.lin(silu_vec)
    shift, scale, gate = mod.chunk(3, dim=-1)
    x_norm = modulated(block.pre_norm, x, shift, scale)
    h = block.linear1(x_norm)
    qkv, hidden_mlp = torch.split(h, [3 * c, block.mlp_hidden_dim], dim=-1)
    q, k, v = split_heads(qkv, heads)
    q, k = block.norm(q, k, v)
    q, k = apply_rope(q, k, pe)
    t = state.txt_len

    maps = router = None
    if state.plan.route:
        lora, rh = weights.router, state.router_hidden
        rm = lora(path + "modulation.lin", block.modulation.lin, silu_vec, base=mod).chunk(3, dim=-1)
        r_norm = modulated(block.pre_norm, rh, rm[0], rm[1])
        base = block.linear1(r_norm)
        maps = routing(block.norm.query_norm, block.norm.key_norm, heads, base[..., :c], r_norm, x_norm[:, t:],
                       h[:, t:, c:2 * c], pe[:, :, t:], weights.routing[layer], state.num_subjects,
                       state.closed_regions)
        state.record(maps)
        if not last:
            r_qkv, r_mlp = torch.split(lora(path + "linear1", block.linear1, r_norm, base=base),
                                       [3 * c, block.mlp_hidden_dim], dim=-1)
            rq, rk, rv = split_heads(r_qkv, heads)
            rq, rk = block.norm(rq, rk, rv)
            r_out = sdpa(rq, torch.cat([k[:, :, t:], rk], dim=2), torch.cat([v[:, :, t:], rv], dim=2))
            r_cat = torch.cat([r_out, block.mlp_act(r_mlp)], dim=2)
            router = rh + rm[2] * lora(path + "linear2", block.linear2, r_cat)

    out = attend(q, k, v, state, layer, maps)
    x = x + gate * block.linear2(torch.cat([out, block.mlp_act(hidden_mlp)], dim=2))
    if x.dtype == torch.float16:
        x = torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    if router is not None:
        state.router_hidden = router
    return x
