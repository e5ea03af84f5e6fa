"""FLUX's routed attention computed sparsely: each image token meets only its own subject's tokens.

With the router's hard maps an image token may attend to the redux and reference tokens of one subject only.
The dense form (``attention_bias``) still multiplies every image query against every subject's tokens and
masks all but one subject with ``-inf``: at 512 px and 2 subjects a block's attention then spans 1536 x 3584
query-key pairs against the bare model's 1536 x 1536. Here each query meets only the keys it may see, and no
``[Lq, Lk]`` bias over the reference columns is written.

Default (the release's semantics): every query attends to the joint ``[text, image]`` keys in one call (the bare
model's call; in a redux step the image rows' other subjects' redux columns are masked), then the text rows
attend to every subject's reference keys in one call, and the image rows routed to subject i to subject i's; each
part is joined to the first exactly through each row's log-sum-exp (:func:`merge`). Splitting by key set rather
than by query keeps the calls' query counts large (SDPA's CPU kernel is least efficient on a few hundred rows) and
copies no keys.

``confine`` (``confine_subjects``): the queries are grouped by class instead (the prompt's rows and unrouted
image tokens: class "none"; subject i's redux rows and image tokens: class i), and each class attends to its keys
in one call, so a class's call sees the same tensors whatever other subjects the call holds: a subject routed
nowhere then changes no other row's arithmetic, to the last bit.

Both leave out the reference columns outside each subject's mask (the release's ``ref_mask``, biased by -100 in
the dense form): such a column's softmax weight is ``e^-100`` times what it would be unmasked, below float32's
resolution unless its logit exceeded the row's largest by more than 80, and these columns are most of a segmented
reference (60% of the reference tokens of the authors' 12 example masks; docs/benchmarks.md).

The reference columns each subject may use are laid out once per call (:func:`reference_columns`): gathered into
one contiguous ``[b, h, C, d]`` tensor, subject after subject, since the cached keys do not change between steps.
So a step copies no reference key: the text rows meet all subjects' columns in one call, subject i's image rows
a slice of it.

Both equal the dense form up to float summation order (float32: ``tests/flux/test_flux_routed_attention.py``),
not to the last bit, so the processor takes them only where routing acts (>= 2 subjects with the router, or a
routing override), never for one subject or with the router off, where bfloat16 stays the release's bit for bit.
As on SDXL (:func:`anystory.routing.sparse_pays`), only on a CPU outside ``torch.compile``: the group sizes are read
on the host once per block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

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


def kept_columns(ref_mask: torch.Tensor, n: int) -> Tuple[Optional[torch.Tensor], ...]:
    """Per subject, the indices of its reference tokens inside its mask (``ref_mask``: ``[N*R]`` bool), ``None``
    where that is all of them (nothing to leave out). Computed once per call."""
    return tuple(None if bool(m.all()) else m.nonzero()[:, 0] for m in ref_mask.view(n, -1))


@dataclass(frozen=True)
class ReferenceColumns:
    """The reference columns that can take softmax mass, laid out for attention once per call: ``keys`` and
    ``values`` ``[b, h, C, d]`` hold each subject's kept columns back to back; ``bias`` ``[C]`` their additive bias
    (``None`` when all zero); ``spans[i]`` subject i's column range, ``None`` when it takes no mass (an empty mask,
    or ``reference_scale`` 0)."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: Optional[torch.Tensor]
    spans: Tuple[Optional[Tuple[int, int]], ...]

    def subject(self, i: int):
        """Subject i's keys, values and bias columns (views), or ``None``."""
        if self.spans[i] is None:
            return None
        a, b = self.spans[i]
        return self.keys[:, :, a:b], self.values[:, :, a:b], None if self.bias is None else self.bias[a:b]

    def rows(self, index: Optional[torch.Tensor], batch: int) -> "ReferenceColumns":
        """The layout for a batch of ``batch`` rows: row j is stored row ``index[j]`` (``None``: one stored row,
        shared by every row)."""
        if index is None:
            keys, values = (x.expand(batch, -1, -1, -1) for x in (self.keys, self.values))
        else:
            keys, values = self.keys[index], self.values[index]
        return ReferenceColumns(keys, values, self.bias, self.spans)


def reference_columns(ref_k: torch.Tensor, ref_v: torch.Tensor, ref_bias: Optional[torch.Tensor],
                      kept: Optional[Sequence[Optional[torch.Tensor]]], n: int) -> ReferenceColumns:
    """Lay out ``ref_k``/``ref_v`` (``[b, N*R, h, d]``, the cached keys of one layer) for :func:`routed_attention`:
    per subject only the columns inside its mask (``kept``, :func:`kept_columns`; ``None``: all), none of a subject
    whose columns are all ``-inf`` (``reference_scale`` 0). ``ref_bias``: ``[N*R]`` or ``None``."""
    r = ref_k.shape[1] // n
    columns, spans, at = [], [], 0
    for i in range(n):
        index = torch.arange(i * r, (i + 1) * r, device=ref_k.device)
        if kept is not None and kept[i] is not None:
            index = index[kept[i]]
        if not index.numel() or (ref_bias is not None and bool((ref_bias[index] == float("-inf")).all())):
            spans.append(None)
            continue
        columns.append(index)
        spans.append((at, at + index.numel()))
        at += index.numel()
    index = torch.cat(columns) if columns else torch.zeros(0, dtype=torch.long, device=ref_k.device)
    keys, values = (x.index_select(1, index).transpose(1, 2).contiguous() for x in (ref_k, ref_v))
    bias = None if ref_bias is None else ref_bias.index_select(0, index)
    return ReferenceColumns(keys, values, None if bias is None or not bool(bias.any()) else bias, tuple(spans))


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """SDPA (``[b, h, s, d]`` in and out) and each query row's log-sum-exp of its scores (``[b, h, s]``, float32),
    from SDPA's own CPU kernel, which computes it anyway; the math form elsewhere."""
    if q.device.type == "cpu" and _FLASH_CPU is not None:
        return _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.float()
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype), lse


def merge(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of two disjoint key sets, from the attention over each: a key's softmax
    weight over the union is its weight in its own set times ``exp(lse_set - lse_union)``. Float32 out."""
    share = torch.sigmoid(lse - part_lse).unsqueeze(-1)  # the first set's share of each row's softmax mass
    return torch.lerp(part.float(), out.float(), share), torch.logaddexp(lse, part_lse)


def _redux_mask(labels: torch.Tensor, txt: int, redux_len: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """``[1, 1, L, L]`` bias of the joint keys for one sample: an image token of class c sees no redux token of
    another subject (class ``n``: none); the text rows see every key."""
    per, t0, length = redux_len // n, txt - redux_len, txt + labels.shape[0]
    owner = torch.arange(n, device=like.device).repeat_interleave(per)
    bias = like.new_zeros(1, 1, length, length)
    bias[0, 0, txt:, t0:txt].masked_fill_(labels[:, None] != owner[None, :], float("-inf"))
    return bias


def _merged(qt, kt, vt, reference: Optional[ReferenceColumns], labels, txt: int, redux_len: int, n: int
            ) -> torch.Tensor:
    """The default form for one sample (``[1, h, s, d]`` tensors; labels ``[I]``): joint keys for every query,
    then the text rows meet every subject's reference columns in one call, and the image rows routed to subject i
    meet subject i's; each part joins the joint one through the rows' log-sum-exp."""
    bias = _redux_mask(labels, txt, redux_len, n, qt) if redux_len else None
    out, lse = attention_with_lse(qt, kt, vt, bias)
    if reference is None or all(span is None for span in reference.spans):
        return out
    out = out.float()
    if out.requires_grad:  # training: SDPA's backward reads its own output, which the merges below overwrite
        out = out.clone()
    part, part_lse = attention_with_lse(qt[:, :, :txt], reference.keys, reference.values,
                                        _bias_row(reference.bias, 0, qt))
    out[:, :, :txt] = merge(out[:, :, :txt], lse[:, :, :txt], part, part_lse)[0]
    for i in range(n):
        mine = reference.subject(i)
        rows = txt + (labels == i).nonzero()[:, 0]
        if mine is None or not rows.numel():
            continue
        keys, values, columns = mine
        part, part_lse = attention_with_lse(qt.index_select(2, rows), keys, values, _bias_row(columns, 0, qt))
        out.index_copy_(2, rows, merge(out.index_select(2, rows), lse.index_select(2, rows), part, part_lse)[0])
    return out.to(qt.dtype)


def _grouped_by_class(qt, kt, vt, reference: Optional[ReferenceColumns], labels, txt: int, redux_len: int, n: int
                      ) -> torch.Tensor:
    """The ``confine`` form for one sample: every query grouped by class, one call per class over its keys."""
    length = qt.shape[2]
    out = torch.empty_like(qt)
    text_labels = _text_labels(txt, redux_len, n, labels)
    row_labels = torch.cat([text_labels, labels.to(text_labels.dtype)])
    order = torch.argsort(row_labels, stable=True)
    counts = torch.bincount(row_labels, minlength=n + 1).tolist()
    parts = []
    for cls, q_cls in enumerate(qt.index_select(2, order).split(counts, dim=2)):
        if not counts[cls]:
            continue
        spans = _spans(cls, n, txt, redux_len, length)
        keys, values = [kt[:, :, a:b] for a, b in spans], [vt[:, :, a:b] for a, b in spans]
        columns = None
        mine = reference.subject(cls) if reference is not None and cls < n else None
        if mine is not None:
            keys.append(mine[0])
            values.append(mine[1])
            columns = mine[2]
        before = sum(b - a for a, b in spans)
        parts.append(F.scaled_dot_product_attention(q_cls, torch.cat(keys, dim=2), torch.cat(values, dim=2),
                                                    attn_mask=_bias_row(columns, before, qt)))
    out.index_copy_(2, order, torch.cat(parts, dim=2))
    return out


def routed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reference: Optional[ReferenceColumns],
                     labels: torch.Tensor, txt: int, redux_len: int, n: int, confine: bool = False) -> torch.Tensor:
    """Attention of queries ``[text + redux, image]`` under exclusive routing, ``[b, L, h, d]`` in and out.

    k, v: the joint keys/values (same layout as q); reference: the subjects' reference columns
    (:func:`reference_columns`, batch rows as q's) or None (reference off); labels: ``[b, I]`` subject of each
    image token (``n`` = none, e.g. a routing override's background); the redux tokens are the last ``redux_len``
    text tokens, ``redux_len // n`` per subject. ``confine``: ``confine_subjects``'s form.
    """
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [b, h, s, d]
    form = _grouped_by_class if confine else _merged
    rows = []
    for row in range(q.shape[0]):
        one = slice(row, row + 1)
        mine = None if reference is None else ReferenceColumns(reference.keys[one], reference.values[one],
                                                               reference.bias, reference.spans)
        rows.append(form(qt[one], kt[one], vt[one], mine, labels[row], txt, redux_len, n))
    return (rows[0] if len(rows) == 1 else torch.cat(rows)).transpose(1, 2)
