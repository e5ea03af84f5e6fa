"""FLUX's routed attention computed sparsely: each image token meets only its own subject's tokens.

With the router's hard maps an image token may attend to the redux and reference tokens of one subject only.
The dense form (``attention_bias``) still multiplies every image query against every subject's tokens and
masks all but one subject with ``-inf``: at 512 px and 2 subjects a block's attention then spans 1536 x 3584
query-key pairs against the bare model's 1536 x 1536. Here the image queries are grouped by subject and
group i attends to ``[text, subject i's redux, image, subject i's reference]``; the text (and redux) rows
attend to every key, as in the release. No ``[Lq, Lk]`` bias is written: at most one broadcast row carries the
reference columns' bias (-100 outside a subject's mask, ``log(reference_scale)``), and none when it is zero.

The result equals the dense form up to float summation order (float32: ``tests/flux/test_flux_routed_attention.py``),
not to the last bit, so the processor takes it only where routing acts (>= 2 subjects with the router, or a
routing override), never for one subject or with the router off, where bfloat16 stays the release's bit for bit.
As on SDXL (:func:`anystory.routing.sparse_pays`), only on a CPU outside ``torch.compile``: the group sizes are read
on the host once per block.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F


def _bias_row(columns: Optional[torch.Tensor], before: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """``[1, 1, 1, before + R]``: 0 on the first ``before`` keys, ``columns`` on the reference keys; ``None``
    when there is no reference or its bias is all zero (then SDPA runs without a mask)."""
    if columns is None or not bool(columns.any()):
        return None
    row = like.new_zeros(1, 1, 1, before + columns.numel())
    row[..., before:] = columns
    return row


def _spans(cls: int, n: int, txt: int, redux_len: int, length: int) -> List[Tuple[int, int]]:
    """Joint key ranges an image token of class ``cls`` sees: text, its subject's redux tokens, image."""
    per = redux_len // n
    if not per or cls == n:
        return [(0, txt - redux_len), (txt, length)] if per else [(0, length)]
    start = txt - redux_len + cls * per
    return [(0, start + per), (txt, length)] if cls == 0 else [(0, txt - redux_len), (start, start + per),
                                                                 (txt, length)]


def _text_labels(txt: int, redux_len: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Under ``confine``: class of each text row, ``n`` for the prompt's tokens and its owner for a redux token."""
    per = redux_len // n if n else 0
    owner = torch.arange(n, device=like.device).repeat_interleave(per)
    return torch.cat([torch.full((txt - redux_len,), n, device=like.device, dtype=owner.dtype), owner])


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref_k: Optional[torch.Tensor],
                     ref_v: Optional[torch.Tensor], ref_bias: Optional[torch.Tensor], labels: torch.Tensor,
                     txt: int, redux_len: int, n: int, confine: bool = False) -> torch.Tensor:
    """Attention of queries ``[text + redux, image]`` under exclusive routing, ``[b, L, h, d]`` in and out.

    k, v: the joint keys/values (same layout as q); ref_k, ref_v: ``[b, N*R, h, d]`` or None (reference off);
    ref_bias: ``[N*R]`` additive bias of the reference columns (in q's dtype) or None; labels: ``[b, I]``
    subject of each image token (``n`` = none, e.g. a routing override's background); the redux tokens are the
    last ``redux_len`` text tokens, ``redux_len // n`` per subject.

    ``confine`` (``confine_subjects``): the prompt's rows join the class "none" and subject i's redux rows join
    class i, so every query meets exactly the keys the masked form leaves it, and a class's call sees the same
    tensors whatever other subjects the call holds: a subject routed nowhere then changes no other row's
    arithmetic, to the last bit.
    """
    length, r = q.shape[1], (ref_k.shape[1] // n if ref_k is not None else 0)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, s, d]
    rkt, rvt = (None, None) if ref_k is None else (ref_k.transpose(1, 2), ref_v.transpose(1, 2))
    out = torch.empty_like(qt)
    first = 0 if confine else txt  # the rows that are grouped by class
    text_labels = _text_labels(txt, redux_len, n, labels) if confine else None
    for row in range(q.shape[0]):
        one = slice(row, row + 1)
        kr, vr = kt[one], vt[one]
        row_labels = labels[row] if text_labels is None else torch.cat([text_labels, labels[row].to(text_labels)])
        if not confine and rkt is None:
            out[one, :, :txt] = F.scaled_dot_product_attention(qt[one, :, :txt], kr, vr)
        elif not confine:
            out[one, :, :txt] = F.scaled_dot_product_attention(
                qt[one, :, :txt], torch.cat([kr, rkt[one]], dim=2), torch.cat([vr, rvt[one]], dim=2),
                attn_mask=_bias_row(ref_bias, length, qt))
        order = torch.argsort(row_labels, stable=True)
        counts = torch.bincount(row_labels, minlength=n + 1).tolist()
        parts = []
        for cls, q_cls in enumerate(qt[one, :, first:].index_select(2, order).split(counts, dim=2)):
            if not counts[cls]:
                continue
            spans = _spans(cls, n, txt, redux_len, length)
            keys, values = [kr[:, :, a:b] for a, b in spans], [vr[:, :, a:b] for a, b in spans]
            columns = None
            if rkt is not None and cls < n:
                keys.append(rkt[one, :, cls * r:(cls + 1) * r])
                values.append(rvt[one, :, cls * r:(cls + 1) * r])
                columns = None if ref_bias is None else ref_bias[cls * r:(cls + 1) * r]
            before = sum(b - a for a, b in spans)
            parts.append(F.scaled_dot_product_attention(q_cls, torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                                        attn_mask=_bias_row(columns, before, qt)))
        out[one, :, first:].index_copy_(2, order, torch.cat(parts, dim=2))  # a view: writes into ``out``
    return out.transpose(1, 2)
