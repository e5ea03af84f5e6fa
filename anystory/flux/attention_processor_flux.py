"""``AnyStoryFluxAttnProcessor``: FLUX attention with subjects' redux/reference tokens, routed.

One processor per block (double and single). Without active subjects it is diffusers' ``FluxAttnProcessor``.
During the reference pass it computes ordinary attention and keeps the block's reference keys/values. During
denoising, when the reference is on, the image/text queries also attend to the cached reference keys, with a
logit bias per reference column: -100 outside the subject's mask (the release's ``ref_mask``) and
``log(reference_scale)`` per subject (0 at the default scale 1). When routing is on, an image token that the
block's map does not send to subject i gets ``-inf`` on subject i's redux and reference columns (the release
uses -100; the difference is below float resolution, and ``-inf`` makes the confinement exact). Such hard
routing is computed sparsely on a CPU (``routed_attention_flux``: an image token meets one subject's tokens).

``confine_subjects`` (our option, off by default; the release does not do it): the text tokens see no subject
tokens, and subject i's redux tokens see only subject i's tokens, whatever the number of subjects and whether
the router is on. Then a subject routed nowhere cannot reach the image at all (in the release's attention it
still can, through the shared text tokens), and changes nothing to the last bit: each subject's reference pass
runs alone, and the attention is computed grouped by the keys each query may meet (``routed_attention_flux``),
so no other query's arithmetic depends on the extra subject.

The processor's four linear layers are the release's ``to_{q,k}_routing_map_lora_{A,B}`` (the router's own
low-rank query/key terms); their state-dict keys are ``...attn.processor.<name>`` as in the released file.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

from ..attention_layout import heads_last as _heads
from ..routing import exclusive_labels, sparse_pays
from .routed_attention_flux import routed_attention
from .router_flux import RouterModules, router_norm, router_post_attention, router_pre_attention, routing_map

NEG_INF = float("-inf")


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[b, s, h, d]`` in and out."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    return out.transpose(1, 2)


def attention_bias(state, plan, maps, batch: int, dtype, device):
    """``[b, 1, Lq, Lk]`` additive bias for queries [text, redux, image] and keys [text, redux, image, reference],
    or ``None`` when nothing is masked. maps: ``[b, N, I]`` (1 = image token routed to subject i) or None."""
    n, txt, rx, img = state.num_subjects, state.txt_len, state.redux_len, state.img_len
    t0, lq = txt - rx, txt + img
    rf = state.ref_bias.numel() if plan.ref else 0
    if not rf and maps is None and not (state.confine and rx):
        return None
    bias = torch.zeros(batch, 1, lq, lq + rf, dtype=dtype, device=device)
    if rf:
        bias[..., lq:] = state.ref_bias.to(device=device, dtype=dtype)
    if maps is not None:
        off = (maps < 0.5).transpose(1, 2)  # [b, I, N]: image token j is not routed to subject i
        rows = bias[:, 0, txt:lq]
        if rx:
            rows[..., t0:txt].masked_fill_(off.repeat_interleave(rx // n, dim=2), NEG_INF)
        if rf:
            rows[..., lq:].masked_fill_(off.repeat_interleave(rf // n, dim=2), NEG_INF)
    if state.confine:
        bias[:, 0, :t0, t0:txt] = NEG_INF
        bias[:, 0, :t0, lq:] = NEG_INF
        if rx:
            redux_owner = torch.arange(n, device=device).repeat_interleave(rx // n)
            bias[:, 0, t0:txt, t0:txt].masked_fill_(redux_owner[:, None] != redux_owner[None, :], NEG_INF)
            if rf:
                ref_owner = torch.arange(n, device=device).repeat_interleave(rf // n)
                bias[:, 0, t0:txt, lq:].masked_fill_(redux_owner[:, None] != ref_owner[None, :], NEG_INF)
    return bias


def _grouped(state, q: torch.Tensor) -> bool:
    """The grouped (sparse) attention: on a CPU, where it is the faster form (``sparse_pays``), and under
    ``confine_subjects`` on every device outside ``torch.compile``, because that option's promise, a subject
    routed nowhere changes nothing, needs each query to meet exactly the keys of the call without that subject
    (the masked form sums over the extra ``-inf`` columns in another order)."""
    return sparse_pays(q) or (state.confine and not torch.compiler.is_compiling())


Rope = Tuple[torch.Tensor, torch.Tensor]
Output = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class AnyStoryFluxAttnProcessor(nn.Module):
    """One block's attention. It reads the call's :class:`~anystory.flux.conditioning_flux.AnyStoryFluxState`
    and, for the router tokens, the block's :class:`~anystory.flux.router_flux.RouterModules`; both are handed
    to it by :meth:`bind` when the weights load."""

    def __init__(self, hidden_size: int, rank: int = 128, bias: bool = True, layer_id: int = 0):
        super().__init__()
        self.to_q_routing_map_lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.to_q_routing_map_lora_B = nn.Linear(rank, hidden_size, bias=bias)
        self.to_k_routing_map_lora_A = nn.Linear(hidden_size, rank, bias=False)
        self.to_k_routing_map_lora_B = nn.Linear(rank, hidden_size, bias=bias)
        self.layer_id = layer_id
        self.state = None  # AnyStoryFluxState, shared by all processors of the transformer
        self.stock = FluxAttnProcessor()
        self._router: Tuple[RouterModules, ...] = ()  # kept out of the module tree (they are the block's)

    def bind(self, state, router: RouterModules) -> None:
        self.state, self._router = state, (router,)

    def forward(self, attn: FluxAttention, hidden_states: torch.Tensor,
                encoder_hidden_states: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
                image_rotary_emb: Optional[Rope] = None) -> Output:
        """diffusers' ``FluxAttnProcessor`` interface: a double block passes the image and text streams and gets
        ``(image, text)`` back; a single block passes the joint sequence and gets it back."""
        state = self.state
        if state is None or not state.active:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if state.in_ref_pass:
            return self._reference(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        plan = state.plan
        if plan is None or not (plan.ref or plan.route):
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        return self._conditioned(attn, hidden_states, encoder_hidden_states, image_rotary_emb, plan)

    # ---- shared pieces -----------------------------------------------------------------------------------------
    @staticmethod
    def _project(attn: FluxAttention, hidden: torch.Tensor, text: Optional[torch.Tensor], rope: Optional[Rope],
                 extra: Optional[torch.Tensor] = None):
        """Joint [text, image] queries/keys/values per head, normalised and rotated, plus ``to_k(hidden)``; and
        when ``extra`` (``[b, m, C]``, the router tokens) is given, its rows' plain query/key/value products,
        computed in the same products as the text side (double block) or the joint sequence (single block)."""
        d = attn.head_dim

        def products(x, layers, rows):
            """``layer(x)`` per layer; with ``rows``, one product over ``[x, rows]`` each, split after."""
            if rows is None:
                return [layer(x) for layer in layers], None
            joined, m = torch.cat([x, rows], dim=1), rows.shape[1]
            outs = [layer(joined) for layer in layers]
            return [o[:, :-m] for o in outs], tuple(o[:, -m:] for o in outs)

        (q, key_proj, v), extra_out = products(hidden, (attn.to_q, attn.to_k, attn.to_v),
                                               extra if text is None else None)
        q = attn.norm_q(_heads(q, d))
        k = attn.norm_k(_heads(key_proj, d))
        v = _heads(v, d)
        if text is not None:
            (tq, tk, tv), extra_out = products(text, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj), extra)
            q = torch.cat([attn.norm_added_q(_heads(tq, d)), q], dim=1)
            k = torch.cat([attn.norm_added_k(_heads(tk, d)), k], dim=1)
            v = torch.cat([_heads(tv, d), v], dim=1)
        if rope is not None:
            q = apply_rotary_emb(q, rope, sequence_dim=1)
            k = apply_rotary_emb(k, rope, sequence_dim=1)
        return q, k, v, key_proj, extra_out

    @staticmethod
    def _finish(attn: FluxAttention, out: torch.Tensor, text: Optional[torch.Tensor], dtype: torch.dtype) -> Output:
        out = out.flatten(2, 3).to(dtype)
        if text is None:
            return out
        text_out, image_out = out.split_with_sizes([text.shape[1], out.shape[1] - text.shape[1]], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())

    # ---- modes -------------------------------------------------------------------------------------------------
    def _reference(self, attn: FluxAttention, hidden: torch.Tensor, text: Optional[torch.Tensor],
                   rope: Optional[Rope]) -> Output:
        """Reference pass: one subject per batch row, no text; keep this layer's keys/values."""
        q, k, v, _, _ = self._project(attn, hidden, text, rope)
        self.state.store_ref_kv(self.layer_id, k, v)
        n = self.state.num_subjects
        if n == 1 or self.state.confine:
            # confine_subjects (not in the release): one batch row per subject on every count, so a subject's
            # reference keys are computed the same way whatever other subjects the call holds
            return self._finish(attn, _attention(q, k, v), text, q.dtype)
        # the release's layout: one [b, h, N, R, d] call, which SDPA computes on its math path; a batch of N
        # rows would take the fused kernel and round differently in bfloat16
        q5, k5, v5 = (x.unflatten(0, (-1, n)).permute(0, 3, 1, 2, 4) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q5, k5, v5).permute(0, 2, 3, 1, 4).flatten(0, 1)
        return self._finish(attn, out, text, q.dtype)

    def _conditioned(self, attn: FluxAttention, hidden: torch.Tensor, text: Optional[torch.Tensor], rope: Rope,
                     plan) -> Output:
        state = self.state
        double = text is not None
        batch, img, n = hidden.shape[0], state.img_len, state.num_subjects
        parts = norm = None
        if plan.route and state.forced_maps is None:  # the router decides: its tokens' norm comes first
            parts = self._router[0]
            router_hidden = state.router_input(hidden.dtype)
            norm, mods = router_norm(parts, router_hidden, state.modulation[self.layer_id])
        # the router tokens' base projections ride in the block's own products; not under confine_subjects, whose
        # promise (a subject routed nowhere changes no bit) needs the block's products the same for any count
        q, k, v, key_proj, router_base = self._project(attn, hidden, text, rope,
                                                       None if norm is None or state.confine else norm)

        maps, router = None, None
        if plan.route:
            if state.forced_maps is not None:
                maps = state.forced_maps.to(device=q.device, dtype=q.dtype).expand(batch, -1, -1)
            else:
                pre = router_pre_attention(parts, attn, norm, mods, router_base)
                image_norm = hidden if double else hidden[:, -img:]
                image_rope = (rope[0][-img:], rope[1][-img:])
                maps = routing_map(attn, pre.norm, pre.query_base, image_norm, key_proj[:, -img:], image_rope,
                                   (self.to_q_routing_map_lora_A, self.to_q_routing_map_lora_B),
                                   (self.to_k_routing_map_lora_A, self.to_k_routing_map_lora_B), n, double,
                                   **({} if state.closed_regions is None else {"closed": state.closed_regions}),
                                   logits_out=state.router_logits)
                if parts.updates:
                    router = (parts, router_hidden, pre)
            state.record(maps)

        labels = None
        if _grouped(state, q):  # hard routing: each image token meets one subject's tokens only
            if maps is not None:
                labels = exclusive_labels(maps)
            elif n == 1 and state.confine:
                labels = torch.zeros(batch, img, dtype=torch.long, device=q.device)
        if labels is not None:
            reference = state.ref_columns_for(self.layer_id, batch, k.dtype) if plan.ref else None
            out = routed_attention(q, k, v, reference, labels, state.txt_len, state.redux_len, n, state.confine)
        else:
            keys, values = k, v
            if plan.ref:
                ref_k, ref_v = (x.to(k.dtype) for x in state.ref_kv_for(self.layer_id, batch))
                keys, values = torch.cat([k, ref_k], dim=1), torch.cat([v, ref_v], dim=1)
            out = _attention(q, keys, values, attention_bias(state, plan, maps, batch, q.dtype, q.device))

        if router is not None:  # the router tokens' own attention and update (not in the last block)
            parts, router_hidden, pre = router
            rq, rk, rv = pre.qkv
            r_out = _attention(rq, torch.cat([k[:, -img:], rk], dim=1), torch.cat([v[:, -img:], rv], dim=1))
            state.router_hidden = router_post_attention(parts, attn, router_hidden, r_out.to(rq.dtype), pre)
        return self._finish(attn, out, text, q.dtype)
