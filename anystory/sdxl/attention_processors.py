"""Where AnyStory's conditions enter the UNet, and where routing gates them.

* ``AnyStorySelfAttnProcessor`` (every ``attn1``): *reference attention*. Each subject's ReferenceNet features
  are appended as extra keys/values. Routing gates them with an additive bias on the logits: ``log(map_i *
  reference_scale_i)``, i.e. 0 inside subject i's map (of the preceding cross-attention layer), ``-inf`` outside.
  Hard routing makes that mask exclusive, so on a CPU it is computed sparsely (each query meets only its own
  subject's keys, :func:`_routed_reference_attention`); accelerators and ``torch.compile`` take the equal dense
  form (see :func:`sparse_pays`).
* ``AnyStoryCrossAttnProcessor`` (every ``attn2``): text cross-attention plus *decoupled* cross-attention to
  each subject's semantic tokens (IP-Adapter style, new key/value projections), one SDPA call per subject. The
  layer's router predicts the map over N subjects + background; subject i's output is multiplied by
  ``scale_i * map_i``. The background gets no subject condition; with a background reference (``background.py``)
  it is one more conditioned class after the subjects, acting where the map says background, in both processors.

When routing acts (the guarantees, tested in ``tests/sdxl/test_routing_confinement.py``):

* A self-attention layer uses the map of the cross-attention layer before it. Layers that run before a step's
  first routing decision use the last map of the previous step (the most recent decision; the latent has moved
  one step since). At the first step there is no map yet, so no subject condition acts there: those layers are
  diffusers' own. No layer ever applies a subject's reference where no router decision sent it.
* A subject that wins no position in any layer changes nothing: the router's classes are independent and its
  decision is removal-invariant (``router.py``), and a zero gate removes a subject's terms exactly.
* ``routing_regions`` (``[N, H, W]`` or ``[Bc, N, H, W]``, 1 = allowed) restricts where the router may send
  each subject (its logit is ``-inf`` elsewhere); the carried-over maps above inherit the restriction.

Both processors are plain callables reading one :class:`AnyStoryState`: the call's immutable
:class:`SDXLConditioning` (built by the pipeline or a trainer) and what the processors write during the call; the
adapter starts one per call and hands it to all of them. With no subjects they run diffusers' ``AttnProcessor2_0`` unchanged, which is
why zero subjects reproduce ``StableDiffusionXLPipeline`` exactly.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..attention_layout import heads_first
from ..routing import exclusive_labels, sparse_pays
from .router import RouterLayer, routing_maps


@dataclass(frozen=True)
class SDXLConditioning:
    """One call's encoded inputs, immutable: what the pipeline (or a trainer) hands the processors. Built once per
    call (:meth:`AnyStorySDXLPipeline.conditioning_inputs`, or a trainer from ``encode_subjects``) and started
    with :meth:`AnyStorySDXLAdapter.start`. Tensors have batch 1 (shared) or the conditional batch."""

    num_subjects: int = 0
    background: bool = False  # a background reference follows the subjects in the conditions (class N of the map)
    reference_features: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [b, N, Lr, C]
    semantic_tokens: Optional[torch.Tensor] = None  # [b, N, T, D]
    semantic_uncond_tokens: Optional[torch.Tensor] = None  # [b, N, T, D]: background tokens for the CFG half
    routing_tokens: Optional[torch.Tensor] = None  # [b, N+1, Dr]; the last one is the background
    scales: Optional[torch.Tensor] = None  # [N] semantic strengths (eta)
    reference_scales: Optional[torch.Tensor] = None  # [N]
    background_log_scales: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> the background's learned log-scale (background.py)
    background_kv_deltas: Dict[str, Tuple[nn.Module, nn.Module]] = field(default_factory=dict)  # cross-attention layer -> the background's key/value corrections (background.py)
    cfg: bool = False  # batch = [uncond, cond] halves
    latent_hw: Tuple[int, int] = (0, 0)
    training: bool = False
    gumbel_tau: float = 1.0
    background_bias: float = 0.0  # inference routing's background logit adjustment (see router.py)
    single_region: bool = False  # inference routing keeps each subject's largest region per layer (router.py)
    subject_gap: int = 0  # inference routing keeps this many latent positions of background between subjects (router.py)
    trajectory_weight: float = 0.0  # inference routing adds the trajectory router's logits with this weight (router.py)
    trajectory_background_bias: float = 0.0  # the trajectory router's own background logit adjustment
    forced_maps: Optional[torch.Tensor] = None  # [N+1, H, W] (test/debug hook) or [Bc, N+1, H, W] (teacher routing) one-hot maps for every layer
    routing_regions: Optional[torch.Tensor] = None  # [N, H, W] or [Bc, N, H, W]: where the router may send each subject
    record_maps: bool = False  # accumulate gating maps at latent resolution (for visualisation)
    collect_soft_maps: bool = False  # keep soft maps per layer (for the routing loss)
    start_offset: Optional[torch.Tensor] = None  # the background reference's mean latent for the starting latent (background.start_offset); the pipeline's prepare_latents reads it


class AnyStoryState:
    """What the processors share while the UNet runs one call: the call's :class:`SDXLConditioning` (its fields
    readable here by name, as on FLUX's state) and what the processors write (the latest gating map, soft maps
    for the loss, the recorded maps, cached semantic/reference keys and values)."""

    def __init__(self, conditioning: Optional[SDXLConditioning] = None):
        self.conditioning = SDXLConditioning() if conditioning is None else conditioning
        for f in dataclasses.fields(self.conditioning):
            setattr(self, f.name, getattr(self.conditioning, f.name))
        self.prev_map: Optional[torch.Tensor] = None  # [Bc, N+1, h, w] latest gating map (kept from one step to the next)
        self.soft_maps: Dict[str, torch.Tensor] = {}
        self.map_sum: Optional[torch.Tensor] = None
        self.map_count = 0
        self.kv_cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.scale_list: Optional[List[float]] = None
        if self.forced_maps is not None:  # forced routing holds from the first layer on
            self.prev_map = self.forced_maps if self.forced_maps.ndim == 4 else self.forced_maps[None]

    def reference_scale_list(self) -> List[float]:
        """``reference_scales`` as Python numbers, read once per call (the sparse path branches on them)."""
        if self.scale_list is None:
            self.scale_list = [float(s) for s in self.reference_scales.tolist()]
        return self.scale_list

    @property
    def conditioned(self) -> int:
        """Classes of the map that carry conditions: the subjects, then the background when it has a reference."""
        return self.num_subjects + int(self.background)

    @property
    def active(self) -> bool:
        return self.conditioned > 0

    def layer_hw(self, tokens: int) -> Tuple[int, int]:
        """Spatial size of a layer holding ``tokens`` positions: the latent halved level by level as the UNet's
        stride-2 convolutions do (rounding up with padding 1, down without), until the count matches. Each halving
        shrinks the count strictly until 1x1, so at most one level fits; any size the UNet runs is found."""
        H, W = self.latent_hw
        for rounding in (lambda n: -(-n // 2), lambda n: n // 2):
            h, w = H, W
            while h * w > tokens and (h > 1 or w > 1):
                h, w = max(1, rounding(h)), max(1, rounding(w))
            if h * w == tokens:
                return h, w
        raise RuntimeError(f"cannot infer a {tokens}-token layer's shape from latent size {H}x{W}")

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


class AnyStorySelfAttnProcessor:
    """Self-attention with routed reference keys/values appended (the ReferenceNet condition)."""

    def __init__(self, name: str, state: AnyStoryState):
        self.name, self.state, self.plain = name, state, AttnProcessor2_0()

    def _reference_kv(self, attn: Attention) -> Tuple[torch.Tensor, torch.Tensor]:
        """Project the cached reference features to keys/values once per call, not once per step."""
        cached = self.state.kv_cache.get(self.name)
        if cached is None:
            feats = self.state.reference_features[self.name]
            cached = (attn.to_k(feats), attn.to_v(feats))
            self.state.kv_cache[self.name] = cached
        return cached

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        st = self.state
        if not st.active or encoder_hidden_states is not None or attention_mask is not None or st.prev_map is None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)  # no map: no subject
        batch, length, _ = hidden_states.shape
        ref_k, ref_v = self._reference_kv(attn)  # [b, N, Lr, inner]
        query = heads_first(attn.to_q(hidden_states), attn.heads)
        key = heads_first(attn.to_k(hidden_states), attn.heads)
        value = heads_first(attn.to_v(hidden_states), attn.heads)
        ref_k = heads_first(_to_batch(ref_k.flatten(1, 2), batch), attn.heads)  # [B, h, N*Lr, d]
        ref_v = heads_first(_to_batch(ref_v.flatten(1, 2), batch), attn.heads)

        prev = _resize_map(st.prev_map, st.layer_hw(length)).flatten(2)  # [Bc, N+1, L]
        gate = prev[:, : st.conditioned].detach().to(query.dtype)  # subject i's reference acts where gate_i > 0
        labels = exclusive_labels(gate) if sparse_pays(query) else None
        last = st.background_log_scales.get(self.name) if st.background else None  # a tensor: it trains
        if labels is None:
            out = _dense_reference_attention(query, key, value, ref_k, ref_v, gate, st.reference_scales, last)
        else:
            out = _routed_reference_attention(query, key, value, ref_k, ref_v, labels, st.reference_scale_list(), last)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(hidden_states.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def _dense_reference_attention(query, key, value, ref_k, ref_v, gate, reference_scales, last_log_scale=None):
    """All subjects' reference keys appended to every query, gated by the additive bias ``log(gate_i * scale_i)``
    (plus ``last_log_scale`` for the last class, added so that its gradient stays finite where the gate is 0).

    One SDPA call with static shapes (the path ``torch.compile`` traces), at the cost of attending to
    N x Lr extra keys everywhere and writing an ``[L, L + N*Lr]`` bias. ``query`` etc. are ``[B, h, L|Lr*N, d]``.
    """
    batch, _, length, _ = query.shape
    n, lr = reference_scales.shape[0], ref_k.shape[2] // reference_scales.shape[0]
    weight = reference_scales.to(query.dtype).view(1, n, 1)  # [1, N, 1]
    if gate is not None:
        weight = (gate if gate.shape[0] == 1 else _to_batch(gate, batch)) * weight  # [1 or B, N, L]
    log_weight = torch.log(weight)
    if last_log_scale is not None:
        log_weight = log_weight + F.pad(last_log_scale.to(query.dtype).view(1, 1, 1), (0, 0, n - 1, 0))
    bias_subject = log_weight.transpose(-1, -2).repeat_interleave(lr, dim=-1)  # [1 or B, L or 1, N*Lr]
    rows, positions = bias_subject.shape[:2]
    bias = torch.cat([bias_subject.new_zeros(1, 1, 1).expand(rows, positions, length), bias_subject], dim=-1)
    return F.scaled_dot_product_attention(query, torch.cat([key, ref_k], dim=2), torch.cat([value, ref_v], dim=2),
                                          attn_mask=bias.unsqueeze(1))


def _routed_reference_attention(query, key, value, ref_k, ref_v, labels, scales: List[float],
                                last_log_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hard routing, computed sparsely: the queries routed to subject i attend to the image keys plus subject i's
    reference keys only, the others to the image keys alone.

    Equal to :func:`_dense_reference_attention` for exclusive maps, but each query meets at most one subject's
    Lr extra keys instead of all N x Lr, and no bias is written unless a scale differs from 1 (one broadcast row
    adding ``log(scale_i)``); docs/benchmarks.md has what that saves per layer. ``labels`` is ``[R, L]`` with
    R = 1 (one map for the batch) or the conditional batch (the unconditional half reuses its sample's row);
    positions are grouped by class with one sort per row. ``last_log_scale`` (a tensor, so it trains) is added to
    the last class's reference logits.
    """
    length, n, rows = query.shape[2], len(scales), labels.shape[0]
    lr = ref_k.shape[2] // n
    out = torch.empty_like(query)
    for row in range(rows):
        samples = slice(row, None, rows)  # sample j uses row j % R
        q, k, v = query[samples], key[samples], value[samples]
        order = torch.argsort(labels[row], stable=True)
        counts = torch.bincount(labels[row], minlength=n + 1).tolist()
        parts = []
        for cls, q_cls in enumerate(q[:, :, order].split(counts, dim=2)):
            if not counts[cls]:
                continue
            if cls == n or scales[cls] == 0:
                parts.append(F.scaled_dot_product_attention(q_cls, k, v))
                continue
            span = slice(cls * lr, (cls + 1) * lr)
            keys = torch.cat([k, ref_k[samples, :, span]], dim=2)
            bias = None
            if cls == n - 1 and last_log_scale is not None:
                extra = (math.log(scales[cls]) + last_log_scale).to(keys.dtype).expand(1, 1, 1, lr)
                bias = torch.cat([keys.new_zeros(1, 1, 1, length), extra], dim=-1)
            elif scales[cls] != 1:
                bias = keys.new_zeros(1, 1, 1, length + lr)
                bias[..., length:] = math.log(scales[cls])
            parts.append(F.scaled_dot_product_attention(q_cls, keys, torch.cat([v, ref_v[samples, :, span]], dim=2),
                                                        attn_mask=bias))
        out[samples].index_copy_(2, order, torch.cat(parts, dim=2))  # a view: writes into ``out``
    return out


def _closed_off(logits: torch.Tensor, closed: torch.Tensor) -> torch.Tensor:
    """Router logits ``[Bc, N+1, L]`` with each subject's ``-inf`` where ``closed`` ``[1 or Bc, N, L]``."""
    return torch.cat([logits[:, :-1].masked_fill(closed, float("-inf")), logits[:, -1:]], dim=1)


class CrossAttnConditioning(nn.Module):
    """Parameters AnyStory adds to one cross-attention layer: semantic key/value projections and its router."""

    def __init__(self, latent_dim: int, cross_dim: int, inner_dim: int, routing_dim: int, router_dim: int,
                 trajectory_router: bool = False):
        super().__init__()
        self.to_k_sem = nn.Linear(cross_dim, inner_dim, bias=False)
        self.to_v_sem = nn.Linear(cross_dim, inner_dim, bias=False)
        self.router = RouterLayer(latent_dim, routing_dim, router_dim)
        if trajectory_router:  # a second router for the inference decision only (router.py, "Trajectory router")
            self.trajectory_router = RouterLayer(latent_dim, routing_dim, router_dim)


class AnyStoryCrossAttnProcessor:
    """Text cross-attention + routed, decoupled cross-attention to each subject's semantic tokens."""

    def __init__(self, name: str, state: AnyStoryState, conditioning: CrossAttnConditioning):
        self.name, self.state, self.cond, self.plain = name, state, conditioning, AttnProcessor2_0()

    def _semantic_kv(self, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of the semantic tokens for the whole UNet batch, projected once per call."""
        cached = self.state.kv_cache.get(self.name)
        if cached is None:
            st = self.state
            tokens = st.semantic_tokens
            if st.cfg:
                half = batch // 2
                tokens = torch.cat([_to_batch(st.semantic_uncond_tokens, half), _to_batch(tokens, half)])
            key, value = self.cond.to_k_sem(tokens), self.cond.to_v_sem(tokens)  # [B or 1, N, T, inner]
            delta = st.background_kv_deltas.get(self.name) if st.background else None
            if delta is not None:  # the background's own projections: its class (the last) only
                last = tokens[:, -1:]
                key = torch.cat([key[:, :-1], key[:, -1:] + delta[0](last)], 1)
                value = torch.cat([value[:, :-1], value[:, -1:] + delta[1](last)], 1)
            cached = (key, value)
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
        second = getattr(self.cond, "trajectory_router", None)
        second = second(hidden_states, tokens) if second is not None and st.trajectory_weight and not st.training else None
        if st.routing_regions is not None:
            regions = st.routing_regions if st.routing_regions.ndim == 4 else st.routing_regions[None]
            closed = _resize_map(regions.float(), hw).flatten(2) < 0.5  # [1 or Bc, N, L]
            logits = _closed_off(logits, closed)
            second = None if second is None else _closed_off(second, closed)
        gap = math.ceil(st.subject_gap * hw[0] / st.latent_hw[0]) if st.subject_gap else 0  # on this layer's grid
        gate, soft = routing_maps(logits, st.training, st.gumbel_tau, st.background_bias, hw=hw,
                                  single_region=st.single_region, subject_gap=gap, trajectory_logits=second,
                                  trajectory_weight=st.trajectory_weight,
                                  trajectory_background_bias=st.trajectory_background_bias)
        if st.collect_soft_maps:
            st.soft_maps[self.name] = soft
        return gate

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        st = self.state
        if not st.active or encoder_hidden_states is None or attention_mask is not None:
            return self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, length, _ = hidden_states.shape
        n = st.conditioned
        hw = st.layer_hw(length)
        query = attn.to_q(hidden_states)
        q = heads_first(query, attn.heads)
        text = encoder_hidden_states if not attn.norm_cross else attn.norm_encoder_hidden_states(encoder_hidden_states)
        out = F.scaled_dot_product_attention(q, heads_first(attn.to_k(text), attn.heads), heads_first(attn.to_v(text), attn.heads))
        out = out.transpose(1, 2).reshape(batch, length, -1)

        cond_half = hidden_states[batch // 2:] if st.cfg else hidden_states
        gate = self._route(cond_half, hw)  # [Bc, N+1, L]
        sem_k, sem_v = self._semantic_kv(batch)  # [B or 1, N, T, inner]
        scales = st.scales.to(q.dtype)
        last = st.background_log_scales.get(self.name) if st.background else None
        if last is not None:  # the background's learned scale (a tensor: it trains)
            scales = torch.cat([scales[:-1], scales[-1:] * last.to(q.dtype).exp()])
        weight = _to_batch(gate[:, :n], batch).to(q.dtype) * scales.view(1, n, 1)  # [B, N, L]
        for i in range(n):  # a 4-D SDPA call per subject: one 5-D broadcast call is slower on a CPU (docs/benchmarks.md)
            sem = F.scaled_dot_product_attention(q, heads_first(_to_batch(sem_k[:, i], batch), attn.heads),
                                                 heads_first(_to_batch(sem_v[:, i], batch), attn.heads))
            out = out + weight[:, i, :, None] * sem.transpose(1, 2).reshape(batch, length, -1)

        st.prev_map = gate.unflatten(-1, hw)
        if st.record_maps:
            full = _resize_map(st.prev_map.detach().float(), st.latent_hw)
            st.map_sum = full if st.map_sum is None else st.map_sum + full
            st.map_count += 1
        out = attn.to_out[1](attn.to_out[0](out.to(query.dtype)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
