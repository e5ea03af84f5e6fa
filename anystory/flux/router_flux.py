"""The FLUX router: one hard routing map per block, and the router tokens' own pass through the block.

Each subject contributes ``k*k`` router tokens (the Redux features pooled to 3x3). They start from the
``context_embedder`` and go through every block on the text side of a double block / the shared side of a
single block, with the ``anystory_router`` LoRA applied and the image's ``temb``. In each block the mean
router query of subject i is compared with every image key (base projections plus the block processor's
``to_{q,k}_routing_map`` low-rank terms); the argmax over subjects gives that block's one-hot map (decided
as on SDXL: float32, logits floored to a grid, the lowest index winning a tie, ``anystory/routing.py``), which
then decides which image tokens may attend to subject i's redux and reference tokens.

The router stream shares the block's weights, so it reuses what the block computes anyway: the modulation
linear's output (the same ``temb`` goes in; the router adds only its LoRA delta, ``(W + BA)x = Wx + BAx``) and
the base query/key/value products, whose rows the processor appends to the block's own (outside
``confine_subjects``); the base query serves both the routing logits (base + the processor's terms) and the
router's own attention (base + its LoRA delta). The transformer's last block updates no router token, since
nothing reads them after it: it uses only their query (and projects only that one when their rows do not ride).

The router tokens sit at position 0 of FLUX's RoPE, whose rotation is the identity, so no rotary embedding is
applied to them. Their attention reads the image keys/values of the same block plus their own.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from peft.tuners.tuners_utils import BaseTunerLayer

from ..attention_layout import heads_last as _heads
from ..routing import route_decision
from .adapter_scope import ROUTER_ADAPTER, adapter_scope, layers_with_adapter


def lora_delta(layer: nn.Module, adapter: str, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``base`` (the layer's output without ``adapter``) plus what ``adapter`` adds, as PEFT's LoRA ``Linear``
    computes it (input cast to the adapter's dtype, ``B(A(x)) * scaling`` added, the sum in ``base``'s dtype);
    ``base`` unchanged when the layer does not hold the adapter."""
    if not isinstance(layer, BaseTunerLayer) or adapter not in layer.lora_A:
        return base
    a, b = layer.lora_A[adapter], layer.lora_B[adapter]
    delta = b(a(layer.lora_dropout[adapter](x.to(a.weight.dtype)))) * layer.scaling[adapter]
    return (base + delta).to(base.dtype)


@dataclass(frozen=True)
class RouterModules:
    """The modules of one block the router tokens pass through, handed to the block's processor at load time
    instead of the block. Double block: ``norm1_context`` (its LayerNorm and modulation linear),
    ``norm2_context``, ``ff_context``; single block: ``norm``, ``proj_mlp`` + ``act_mlp``, ``proj_out``. The
    attention's own projections are the processor's ``attn``. ``updates``: False for the transformer's last
    block, after which nothing reads the router tokens."""

    double: bool
    norm: nn.Module
    modulation: nn.Module
    mlp: nn.Module
    lora_layers: Tuple[BaseTunerLayer, ...]
    updates: bool = True
    mlp_norm: Optional[nn.Module] = None
    mlp_act: Optional[nn.Module] = None
    out: Optional[nn.Module] = None

    @classmethod
    def of_block(cls, block: nn.Module, last: bool) -> "RouterModules":
        lora = tuple(layers_with_adapter(block, ROUTER_ADAPTER))
        if hasattr(block, "norm1_context"):
            return cls(True, block.norm1_context.norm, block.norm1_context.linear, block.ff_context, lora,
                       not last, mlp_norm=block.norm2_context)
        return cls(False, block.norm.norm, block.norm.linear, block.proj_mlp, lora, not last,
                   mlp_act=block.act_mlp, out=block.proj_out)


@dataclass
class RouterPre:
    """The router tokens of one block before attention: normalised tokens, their base query projection (no
    router LoRA: the routing logits start from it), their query/key/value per head (router LoRA on; None in the
    transformer's last block, where no router attention runs) and the modulation chunks the update after
    attention needs."""

    norm: torch.Tensor
    query_base: torch.Tensor
    qkv: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    mods: Tuple[torch.Tensor, ...]


def routing_map(attn, router_norm: torch.Tensor, router_query: torch.Tensor, image_norm: torch.Tensor,
                image_key_proj: torch.Tensor, image_rope, lora_q, lora_k, num_subjects: int, double: bool,
                closed: Optional[torch.Tensor] = None, logits_out: Optional[list] = None) -> torch.Tensor:
    """One-hot ``[b, N, I]`` map: image token j goes to the subject whose mean router query matches its key best.

    The routing logits use the projections without the router LoRA. router_norm: ``[b, N*k*k, d]`` normalised
    router tokens; router_query: their base query projection (``add_q_proj`` in a double block, ``to_q`` in a
    single one; :attr:`RouterPre.query_base`); image_norm: ``[b, I, d]`` normalised image tokens;
    image_key_proj: ``attn.to_k(image_norm)`` (already computed by the processor); image_rope: the image part of
    the block's rotary embedding; lora_q / lora_k: ``(A, B)`` linear pairs of the processor; closed: optional
    ``[b or 1, N, I]`` bool, True where subject i may not go (a region restriction: its logit is ``-inf``; as in
    the release, the other subjects' router tokens still attend to its router tokens); logits_out: a list that
    gets the ``[b, N, I]`` float32 logits (with their graph: the training's routing loss reads them).
    """
    q_norm = attn.norm_added_q if double else attn.norm_q
    q = router_query + lora_q[1](lora_q[0](router_norm))
    q = q_norm(_heads(q, attn.head_dim))  # [b, N*k*k, h, d]
    q = q.unflatten(1, (num_subjects, -1)).mean(dim=(2, 3))  # [b, N, d]: mean over the subject's tokens and heads
    k = image_key_proj + lora_k[1](lora_k[0](image_norm))
    k = attn.norm_k(_heads(k, attn.head_dim)).mean(dim=2, keepdim=True)  # [b, I, 1, d]
    # RoPE turns every head of a token by the same angles, so it commutes with the mean over heads: rotating the
    # mean (one head's work) is the release's rotate-then-average, up to float rounding
    k = apply_rotary_emb(k, image_rope, sequence_dim=1)[:, :, 0]  # [b, I, d]
    return route_from_means(q, k, num_subjects, closed, logits_out).to(image_norm.dtype)


def route_from_means(query: torch.Tensor, key: torch.Tensor, num_subjects: int,
                     closed: Optional[torch.Tensor] = None, logits_out: Optional[list] = None) -> torch.Tensor:
    """One-hot ``[b, N, I]`` float32 map from the subjects' mean router queries ``[b, N, d]`` and the image tokens'
    head-mean rotated keys ``[b, I, d]`` (shared by the diffusers processor and the ComfyUI node); logits_out gets
    the float32 logits with their graph (the training's routing loss)."""
    logits = torch.bmm(query.float(), key.float().transpose(1, 2))  # [b, N, I], in float32 whatever the dtype
    if logits_out is not None:
        logits_out.append(logits)
    hot = F.one_hot(route_decision(logits.masked_fill(closed, float("-inf")) if closed is not None else logits),
                    num_subjects).transpose(1, 2)
    if closed is not None:
        hot = hot.masked_fill(closed, 0)  # a token closed to every subject goes to none (the argmax picked one)
    return hot.float()


def router_norm(parts: RouterModules, router_hidden: torch.Tensor, modulation: Tuple[torch.Tensor, torch.Tensor]
                ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The router tokens normalised and modulated for this block's attention, and the modulation chunks the update
    after attention needs. modulation: ``(input, output)`` of the block's own call of ``parts.modulation`` in this
    forward (``silu(temb)`` and the chunks without the router LoRA)."""
    emb = lora_delta(parts.modulation, ROUTER_ADAPTER, *modulation)
    if parts.double:
        shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        mods = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
    else:
        shift, scale, gate = emb.chunk(3, dim=1)
        mods = (gate,)
    return parts.norm(router_hidden) * (1 + scale[:, None]) + shift[:, None], mods


def router_projections(attn, double: bool):
    """The query/key/value projections the router tokens go through: the text side's in a double block, the
    joint sequence's in a single one."""
    return (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if double else (attn.to_q, attn.to_k, attn.to_v)


def router_pre_attention(parts: RouterModules, attn, norm: torch.Tensor, mods: Tuple[torch.Tensor, ...],
                         base: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None) -> RouterPre:
    """Projections of the normalised router tokens. base: their query/key/value projections without the router
    LoRA when the block's own products computed them (rows appended to the block's; the processor does that),
    else computed here. The transformer's last block needs only the query (for its routing map)."""
    projections = router_projections(attn, parts.double)
    if base is None:
        base = tuple(p(norm) for p in (projections if parts.updates else projections[:1]))
    qkv = None
    if parts.updates:
        q_norm, k_norm = (attn.norm_added_q, attn.norm_added_k) if parts.double else (attn.norm_q, attn.norm_k)
        q, k, v = (_heads(lora_delta(p, ROUTER_ADAPTER, norm, b), attn.head_dim) for p, b in zip(projections, base))
        qkv = (q_norm(q), k_norm(k), v)
    return RouterPre(norm, base[0], qkv, mods)


def router_post_attention(parts: RouterModules, attn, router_hidden: torch.Tensor, attn_out: torch.Tensor,
                          pre: RouterPre) -> torch.Tensor:
    """Residual updates of the router tokens after attention (``[b, N*k*k, h, d]`` attention output in). Their
    MLP products stay apart from the block's: appending their rows to the block's ``ff_context`` / ``proj_mlp`` /
    ``proj_out`` products (hooks) measured no faster on a CPU (docs/benchmarks.md)."""
    attn_out = attn_out.flatten(2)
    with adapter_scope(parts.lora_layers, ROUTER_ADAPTER):
        if parts.double:
            gate_msa, shift_mlp, scale_mlp, gate_mlp = pre.mods
            router_hidden = router_hidden + gate_msa.unsqueeze(1) * attn.to_add_out(attn_out)
            normed = parts.mlp_norm(router_hidden) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            return router_hidden + gate_mlp.unsqueeze(1) * parts.mlp(normed)
        (gate,) = pre.mods
        mlp = parts.mlp_act(parts.mlp(pre.norm))
        return router_hidden + gate.unsqueeze(1) * parts.out(torch.cat([attn_out, mlp], dim=2))
