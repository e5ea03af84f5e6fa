"""The FLUX router: one hard routing map per block, and the router tokens' own pass through the block.

Each subject contributes ``k*k`` router tokens (the Redux features pooled to 3x3). They start from the
``context_embedder`` and go through every block on the text side of a double block / the shared side of a
single block, with the ``anystory_router`` LoRA applied and the image's ``temb``. In each block the mean
router query of subject i is compared with every image key (base projections plus the block processor's
``to_{q,k}_routing_map`` low-rank terms); the argmax over subjects gives that block's one-hot map (decided
as on SDXL: float32, logits floored to a grid, the lowest index winning a tie, ``anystory/sdxl/router.py``), which
then decides which image tokens may attend to subject i's redux and reference tokens.

The router tokens sit at position 0 of FLUX's RoPE, whose rotation is the identity, so no rotary embedding is
applied to them. Their attention reads the image keys/values of the same block plus their own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..routing import route_decision


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def routing_map(attn, router_norm: torch.Tensor, image_norm: torch.Tensor, image_key_proj: torch.Tensor,
                image_rope, lora_q, lora_k, num_subjects: int, double: bool,
                closed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-hot ``[b, N, I]`` map: image token j goes to the subject whose mean router query matches its key best.

    Call outside the router adapter scope: the routing logits use the projections without the router LoRA.

    router_norm: ``[b, N*k*k, d]`` normalised router tokens; image_norm: ``[b, I, d]`` normalised image tokens;
    image_key_proj: ``attn.to_k(image_norm)`` (already computed by the processor); image_rope: the image part of
    the block's rotary embedding; lora_q / lora_k: ``(A, B)`` linear pairs of the processor; closed: optional
    ``[b or 1, N, I]`` bool, True where subject i may not go (a region restriction: its logit is ``-inf``; as in
    the release, the other subjects' router tokens still attend to its router tokens).
    """
    q_proj, q_norm = (attn.add_q_proj, attn.norm_added_q) if double else (attn.to_q, attn.norm_q)
    q = q_proj(router_norm) + lora_q[1](lora_q[0](router_norm))
    q = q_norm(_heads(q, attn.head_dim))  # [b, N*k*k, h, d]
    q = q.unflatten(1, (num_subjects, -1)).mean(dim=(2, 3))  # [b, N, d]: mean over the subject's tokens and heads
    k = image_key_proj + lora_k[1](lora_k[0](image_norm))
    k = attn.norm_k(_heads(k, attn.head_dim))
    k = apply_rotary_emb(k, image_rope, sequence_dim=1).mean(dim=2)  # [b, I, d]
    logits = torch.bmm(q.float(), k.float().transpose(1, 2))  # [b, N, I], in float32 whatever the model's dtype
    hot = F.one_hot(route_decision(logits.masked_fill(closed, float("-inf")) if closed is not None else logits),
                    num_subjects).transpose(1, 2)
    if closed is not None:
        hot = hot.masked_fill(closed, 0)  # a token closed to every subject goes to none (the argmax picked one)
    return hot.to(image_norm.dtype)


def router_pre_attention(block, attn, router_hidden: torch.Tensor, temb: torch.Tensor, double: bool):
    """Modulation and projections of the router tokens (call under the router adapter scope).

    Returns ``(normed tokens, (q, k, v) per head, modulation tensors, single-block MLP branch or None)``."""
    if double:
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(router_hidden, emb=temb)
        mods, mlp = (gate_msa, shift_mlp, scale_mlp, gate_mlp), None
        projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        q_norm, k_norm = attn.norm_added_q, attn.norm_added_k
    else:
        norm, gate = block.norm(router_hidden, emb=temb)
        mods, mlp = (gate,), block.act_mlp(block.proj_mlp(norm))
        projections = (attn.to_q, attn.to_k, attn.to_v)
        q_norm, k_norm = attn.norm_q, attn.norm_k
    q, k, v = (_heads(p(norm), attn.head_dim) for p in projections)
    return norm, (q_norm(q), k_norm(k), v), mods, mlp


def router_post_attention(block, attn, router_hidden: torch.Tensor, attn_out: torch.Tensor, mods, mlp,
                          double: bool) -> torch.Tensor:
    """Residual updates of the router tokens after attention (call under the router adapter scope)."""
    attn_out = attn_out.flatten(2)
    if double:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        router_hidden = router_hidden + gate_msa.unsqueeze(1) * attn.to_add_out(attn_out)
        normed = block.norm2_context(router_hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return router_hidden + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    (gate,) = mods
    return router_hidden + gate.unsqueeze(1) * block.proj_out(torch.cat([attn_out, mlp], dim=2))
