"""Where AnyStory's conditions enter the UNet, and where routing gates them.

* ``AnyStorySelfAttnProcessor`` (every ``attn1``): *reference attention*. Each subject's ReferenceNet features
  are appended as extra keys/values. Routing gates them with an additive bias on the logits: ``log(map_i *
  reference_scale_i)``, i.e. 0 inside subject i's map (of the preceding cross-attention layer), ``-inf`` outside.
* ``AnyStoryCrossAttnProcessor`` (every ``attn2``): text cross-attention plus *decoupled* cross-attention to
  each subject's semantic tokens (IP-Adapter style, new key/value projections), computed for all subjects in
  one batched SDPA call. The layer's router predicts the map over N subjects + background; subject i's output
  is multiplied by ``scale_i * map_i``. The background gets no subject condition.

Both processors are plain callables holding a reference to one shared :class:`AnyStoryState`, which the pipeline
(or a trainer) fills once per call. With no subjects they run diffusers' ``AttnProcessor2_0`` unchanged, which is
why zero subjects reproduce ``StableDiffusionXLPipeline`` exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn

from .router import RouterLayer, routing_maps


@dataclass
class AnyStoryState:
    """Per-call conditioning shared by all processors. Tensors have batch 1 (shared) or the conditional batch."""

    num_subjects: int = 0
    reference_features: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [b, N, Lr, C]
    semantic_tokens: Optional[torch.Tensor] = None  # [b, N, T, D]
    semantic_uncond_tokens: Optional[torch.Tensor] = None  # [b, N, T, D]: background tokens for the CFG half
    routing_tokens: Optional[torch.Tensor] = None  # [b, N+1, Dr]; the last one is the background
    scales: Optional[torch.Tensor] = None  # [N] semantic strengths (eta)
    reference_scales: Optional[torch.Tensor] = None  # [N]
    cfg: bool = False  # batch = [uncond, cond] halves
    latent_hw: Tuple[int, int] = (0, 0)
    training: bool = False
    gumbel_tau: float = 1.0
    background_bias: float = 0.0  # inference routing's background logit adjustment (see router.py)
    forced_maps: Optional[torch.Tensor] = None  # [N+1, H, W] (test/debug hook) or [Bc, N+1, H, W] (teacher routing) one-hot maps for every layer
    record_maps: bool = False  # accumulate gating maps at latent resolution (for visualisation)
    collect_soft_maps: bool = False  # keep soft maps per layer (for the routing loss)
    # Filled while running:
    prev_map: Optional[torch.Tensor] = None  # [Bc, N+1, h, w] gating map of the preceding cross-attention layer
    soft_maps: Dict[str, torch.Tensor] = field(default_factory=dict)
    map_sum: Optional[torch.Tensor] = None
    map_count: int = 0
    kv_cache: Dict[str, tuple] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.num_subjects > 0

    def layer_hw(self, tokens: int) -> Tuple[int, int]:
        """Spatial size of a layer holding ``tokens`` positions (UNet down-sampling rounds up)."""
        H, W = self.latent_hw
        factor = round(math.sqrt(H * W / tokens))
        h, w = -(-H // factor), -(-W // factor)
        if h * w != tokens:
            raise RuntimeError(f"cannot infer a {tokens}-token layer's shape from latent size {H}x{W}")
        return h, w

    def take_step_maps(self) -> Optional[torch.Tensor]:
        """Mean gating map over this step's cross-attention layers ``[Bc, N+1, H, W]``; resets the accumulator."""
        if self.map_sum is None:
            return None
        out = self.map_sum / self.map_count
        self.map_sum, self.map_count = None, 0
        return out


def _to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a ``[1, ...]`` or ``[batch/2, ...]`` (conditional-only) tensor to the UNet batch."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    if 2 * t.shape[0] == batch:
        return torch.cat([t, t])
    raise ValueError(f"conditioning batch {t.shape[0]} does not fit UNet batch {batch}")


def _resize_map(m: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
    return m if tuple(m.shape[-2:]) == tuple(hw) else F.interpolate(m, size=hw, mode="nearest")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., L, heads*d]`` -> ``[..., heads, L, d]``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


class AnyStorySelfAttnProcessor:
    """Self-attention with routed reference keys/values appended (the ReferenceNet condition)."""

    def __init__(self, name: str, state: AnyStoryState):
        self.name, self.state, self.plain = name, state, AttnProcessor2_0()

    def _reference_kv(self, attn) -> tuple:
        """Project the cached reference features to keys/values once per call, not once per step."""
        cached = self.state.kv_cache.get(self.name)
        if cached is None:
            feats = self.state.reference_features[self.name]
            cached = (attn.to_k(feats), attn.to_v(feats))
            self.state.kv_cache[self.name] = cached
        return cached

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        st = self.state
        if not st.active or encoder_hidden_states is not None or attention_mask is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, length, _ = hidden_states.shape
        n = st.num_subjects
        ref_k, ref_v = self._reference_kv(attn)  # [b, N, Lr, inner]
        lr = ref_k.shape[2]
        key = torch.cat([attn.to_k(hidden_states), _to_batch(ref_k.flatten(1, 2), batch)], dim=1)
        value = torch.cat([attn.to_v(hidden_states), _to_batch(ref_v.flatten(1, 2), batch)], dim=1)
        query = attn.to_q(hidden_states)

        gate = st.reference_scales.to(query.dtype).view(1, n, 1)  # [1, N, 1]
        if st.prev_map is not None:
            prev = _resize_map(st.prev_map, st.layer_hw(length)).flatten(2)  # [Bc, N+1, L]
            prev = prev[:, :n].detach().to(query.dtype)
            gate = (prev if prev.shape[0] == 1 else _to_batch(prev, batch)) * gate  # [1 or B, N, L]; 1 broadcasts
        bias_subject = torch.log(gate).transpose(-1, -2)  # [1 or B, L or 1, N]: 0 inside, -inf outside
        rows = bias_subject.shape[0]
        bias = torch.cat([bias_subject.new_zeros(1, 1, 1, 1).expand(rows, 1, length, length),
                          bias_subject.repeat_interleave(lr, dim=-1).expand(rows, length, n * lr).unsqueeze(1)], dim=-1)

        out = F.scaled_dot_product_attention(_heads(query, attn.heads), _heads(key, attn.heads),
                                             _heads(value, attn.heads), attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


class CrossAttnConditioning(nn.Module):
    """Parameters AnyStory adds to one cross-attention layer: semantic key/value projections and its router."""

    def __init__(self, latent_dim: int, cross_dim: int, inner_dim: int, routing_dim: int, router_dim: int):
        super().__init__()
        self.to_k_sem = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_sem = nn.Linear(cross_dim, inner_dim, bias=False)
        self.router = RouterLayer(latent_dim, routing_dim, router_dim)


class AnyStoryCrossAttnProcessor:
    """Text cross-attention + routed, decoupled cross-attention to each subject's semantic tokens."""

    def __init__(self, name: str, state: AnyStoryState, conditioning: CrossAttnConditioning):
        self.name, self.state, self.cond, self.plain = name, state, conditioning, AttnProcessor2_0()

    def _semantic_kv(self, batch: int) -> tuple:
        """Keys/values of the semantic tokens for the whole UNet batch, projected once per call."""
        cached = self.state.kv_cache.get(self.name)
        if cached is None:
            st = self.state
            tokens = st.semantic_tokens
            if st.cfg:
                half = batch // 2
                tokens = torch.cat([_to_batch(st.semantic_uncond_tokens, half), _to_batch(tokens, half)])
            cached = (self.cond.to_k_sem(tokens), self.cond.to_v_sem(tokens))  # [B or 1, N, T, inner]
            self.state.kv_cache[self.name] = cached
        return cached

    def _route(self, hidden_states: torch.Tensor, hw: Tuple[int, int]) -> torch.Tensor:
        """Gating map ``[Bc, N+1, L]`` for the conditional half (the unconditional half reuses it)."""
        st = self.state
        if st.forced_maps is not None:
            forced = st.forced_maps if st.forced_maps.ndim == 4 else st.forced_maps[None]  # per-sample maps (training)
            forced = _resize_map(forced.to(hidden_states.dtype), hw).flatten(2)
            return forced.expand(hidden_states.shape[0], -1, -1)
        tokens = _to_batch(st.routing_tokens, hidden_states.shape[0])
        logits = self.cond.router(hidden_states, tokens)
        gate, soft = routing_maps(logits, st.training, st.gumbel_tau, st.background_bias)
        if st.collect_soft_maps:
            st.soft_maps[self.name] = soft
        return gate

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        st = self.state
        if not st.active or encoder_hidden_states is None or attention_mask is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, length, _ = hidden_states.shape
        n = st.num_subjects
        hw = st.layer_hw(length)
        query = attn.to_q(hidden_states)
        q = _heads(query, attn.heads)
        text = encoder_hidden_states if not attn.norm_cross else attn.norm_encoder_hidden_states(encoder_hidden_states)
        out = F.scaled_dot_product_attention(q, _heads(attn.to_k(text), attn.heads), _heads(attn.to_v(text), attn.heads))
        out = out.transpose(1, 2).reshape(batch, length, -1)

        cond_half = hidden_states[batch // 2:] if st.cfg else hidden_states
        gate = self._route(cond_half, hw)  # [Bc, N+1, L]
        sem_k, sem_v = self._semantic_kv(batch)
        sem = F.scaled_dot_product_attention(q.unsqueeze(1), _heads(_to_batch(sem_k, batch), attn.heads),
                                             _heads(_to_batch(sem_v, batch), attn.heads))  # [B, N, h, L, d]
        sem = sem.transpose(2, 3).flatten(3)  # [B, N, L, inner]
        weight = _to_batch(gate[:, :n], batch).to(sem.dtype) * st.scales.to(sem.dtype).view(1, n, 1)
        out = out + (weight.unsqueeze(-1) * sem).sum(dim=1)

        st.prev_map = gate.unflatten(-1, hw)
        if st.record_maps:
            full = _resize_map(st.prev_map.detach().float(), st.latent_hw)
            st.map_sum = full if st.map_sum is None else st.map_sum + full
            st.map_count += 1
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
