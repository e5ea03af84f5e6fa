"""FLUX's sparse routed attention equals the dense masked form, and the pipeline takes it only where routing acts."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import anystory.flux.attention_processor_flux as processor_module
from anystory.flux.attention_processor_flux import _attention, attention_bias
import anystory.flux.routed_attention_flux as routed_module
from anystory.flux.routed_attention_flux import kept_columns, reference_columns, routed_attention
from helpers.flux_pipe import CALL, PROMPT, gen, make_pipe, subjects

HEADS, DIM, TXT, IMG, R = 2, 8, 6, 20, 5


def dense(q, k, v, ref_k, ref_v, ref_bias, labels, txt, redux_len, n, confine=False):
    """The processor's dense form: every key for every query, the routing as an ``-inf`` bias."""
    state = SimpleNamespace(num_subjects=n, txt_len=txt, redux_len=redux_len, img_len=labels.shape[1],
                            ref_bias=ref_bias, confine=confine)
    maps = F.one_hot(labels, n + 1)[..., :n].transpose(1, 2).to(q.dtype)  # [b, N, I]; class n routes nowhere
    plan = SimpleNamespace(ref=ref_k is not None)
    keys, values = (k, v) if ref_k is None else (torch.cat([k, ref_k], 1), torch.cat([v, ref_v], 1))
    return _attention(q, keys, values, attention_bias(state, plan, maps, q.shape[0], q.dtype, q.device))


def sparse(q, k, v, ref_k, ref_v, ref_bias, labels, txt, redux_len, n, confine=False, kept=None):
    """The sparse form, the reference laid out as the processor lays it out once per call."""
    reference = None if ref_k is None else reference_columns(ref_k, ref_v, ref_bias, kept, n)
    return routed_attention(q, k, v, reference, labels, txt, redux_len, n, confine)


def inputs(n, redux_per, batch, reference=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    txt = TXT + n * redux_per
    q, k, v = (torch.randn(batch, txt + IMG, HEADS, DIM, generator=g) for _ in range(3))
    ref_k, ref_v = (torch.randn(batch, n * R, HEADS, DIM, generator=g) for _ in range(2)) if reference else (None,) * 2
    return q, k, v, ref_k, ref_v, txt


@pytest.mark.parametrize("n,redux_per,batch,reference", [(2, 0, 1, True), (2, 3, 1, True), (3, 2, 2, True),
                                                          (4, 1, 2, True), (2, 3, 1, False)])
@pytest.mark.parametrize("bias", ["zero", "mask and scales", "mask and scales, masked columns left out"])
@pytest.mark.parametrize("confine", [False, True])
def test_sparse_equals_dense(n, redux_per, batch, reference, bias, confine):
    """Per-sample labels with a subject routed nowhere and tokens routed to no subject (an override's
    background); reference bias zero (no mask is written) or -100 outside masks (with 3+ subjects one mask is
    empty), log-scales and a zero scale; the sparse forms given the in-mask columns leave the others out."""
    q, k, v, ref_k, ref_v, txt = inputs(n, redux_per, batch, reference)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, n, (batch, IMG), generator=g)
    labels[0, :3] = n  # no subject
    labels[0][labels[0] == 1] = 0  # subject 1 routed nowhere in sample 0
    ref_bias = kept = None
    if reference:
        ref_bias = torch.zeros(n * R)
        if bias != "zero":
            inside = torch.rand(n * R, generator=g) >= 0.4
            inside[2 * R:3 * R] = False  # subject 2 (if any): an empty mask
            ref_bias[~inside] = -100.0
            ref_bias[:R] += 0.7  # log(reference_scale) of subject 0
            ref_bias[R:2 * R] = float("-inf")  # subject 1 at reference_scale 0
            if bias.endswith("left out"):
                kept = kept_columns(inside, n)
                assert any(index is not None for index in kept)
    args = (q, k, v, ref_k, ref_v, ref_bias, labels, txt, n * redux_per, n)
    expected = dense(*args, confine=confine)
    got = sparse(*args, confine=confine, kept=kept)
    assert got.shape == q.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_masked_reference_columns_are_left_out():
    """Given the in-mask columns, a subject's masked-out reference keys take no part: changing them changes
    nothing (without the list they still take their e^-100 share, as in the release)."""
    n = 2
    q, k, v, ref_k, ref_v, txt = inputs(n, 0, 1)
    labels = (torch.arange(IMG) % 2)[None]
    inside = torch.ones(n * R, dtype=torch.bool)
    inside[[1, 3, R + 2]] = False
    kept = kept_columns(inside, n)
    assert [index.tolist() for index in kept] == [[0, 2, 4], [0, 1, 3, 4]]
    assert kept_columns(torch.ones(n * R, dtype=torch.bool), n) == (None, None)
    ref_bias = torch.where(inside, 0.0, -100.0)
    before = sparse(q, k, v, ref_k, ref_v, ref_bias, labels, txt, 0, n, kept=kept)
    ref_k2, ref_v2 = ref_k.clone(), ref_v.clone()
    ref_k2[:, ~inside] = 50.0 * q[:, :n * R][:, ~inside]  # masked keys that would now win every softmax
    ref_v2[:, ~inside] = 1e3
    assert torch.equal(sparse(q, k, v, ref_k2, ref_v2, ref_bias, labels, txt, 0, n, kept=kept), before)
    assert not torch.allclose(sparse(q, k, v, ref_k2, ref_v2, ref_bias, labels, txt, 0, n), before)


def test_an_image_token_meets_only_its_own_subjects_tokens():
    """Changing subject 1's redux and reference tokens moves only the image tokens routed to subject 1 (and the
    text rows, which see every subject, as in the release)."""
    n, redux_per = 2, 3
    q, k, v, ref_k, ref_v, txt = inputs(n, redux_per, 1)
    labels = (torch.arange(IMG) % 2)[None]
    before = sparse(q, k, v, ref_k, ref_v, None, labels, txt, n * redux_per, n)
    k2, v2, ref_v2 = k.clone(), v.clone(), ref_v.clone()
    k2[:, TXT + redux_per:txt] += 1.0
    v2[:, TXT + redux_per:txt] += 1.0
    ref_v2[:, R:] += 1.0
    after = sparse(q, k2, v2, ref_k, ref_v2, None, labels, txt, n * redux_per, n)
    moved = (after - before).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert moved[:txt].all()
    assert torch.equal(moved[txt:], labels[0] == 1)


def _call(pipe, n, **kwargs):
    return pipe(PROMPT, subjects=subjects(n), generator=gen(), **CALL, **kwargs).images


def test_pipeline_routes_sparsely_only_where_routing_acts(monkeypatch):
    """2 subjects with the router: the sparse form runs in every block of every routed step, leaving out the
    reference columns outside the subjects' masks, and the images equal the dense form's (float32 rounding);
    1 subject and the router off never take it (bfloat16 stays exact)."""
    pipe = make_pipe()
    calls = []

    def counted(*args, **kwargs):  # the reference columns laid out for the call, and how many are cached
        calls.append((args[3], next(iter(pipe.anystory_state.ref_kv.values()))[0].shape[1]))
        return routed_attention(*args, **kwargs)

    monkeypatch.setattr(processor_module, "routed_attention", counted)
    sparse = _call(pipe, 2)
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert len(calls) == blocks * CALL["num_inference_steps"]
    for reference, cached in calls:  # every subject keeps some of its columns, the masked-out ones are left out
        assert reference is not None and all(span is not None for span in reference.spans)
        assert 0 < reference.keys.shape[2] < cached
    calls.clear()
    _call(pipe, 1)
    _call(pipe, 2, use_router=False)
    assert calls == []
    monkeypatch.setattr(processor_module, "sparse_pays", lambda q: False)
    dense_images = _call(pipe, 2)
    assert calls == []
    assert abs(sparse - _call(pipe, 0)).max() > 1e-3  # the subjects matter, so the comparison means something
    assert abs(sparse - dense_images).max() <= 1e-5


@pytest.mark.parametrize("kernel", ["cpu flash", "math"])
def test_attention_over_two_key_sets_joins_exactly(monkeypatch, kernel):
    """What the default sparse form rests on: attention over disjoint key sets, each with its rows' log-sum-exp,
    joins into the attention over their union (a set with an -inf / -100 bias column included); also on the
    math form other devices take."""
    if kernel == "math":
        monkeypatch.setattr(routed_module, "_FLASH_CPU", None)  # as where the CPU kernel is absent
    g = torch.Generator().manual_seed(3)
    q, k1, v1 = (torch.randn(2, HEADS, 7, DIM, generator=g) for _ in range(3))
    k2, v2 = (torch.randn(2, HEADS, 5, DIM, generator=g) for _ in range(2))
    bias = torch.zeros(1, 1, 1, 5)
    bias[..., 1], bias[..., 3] = -100.0, float("-inf")
    whole = F.scaled_dot_product_attention(q, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2),
                                           attn_mask=torch.cat([torch.zeros(1, 1, 1, 7), bias], -1))
    out, lse = routed_module.attention_with_lse(q, k1, v1)
    part, part_lse = routed_module.attention_with_lse(q, k2, v2, bias)
    assert lse.shape == (2, HEADS, 7) and lse.dtype == torch.float32
    joined, joined_lse = routed_module.merge(out, lse, part, part_lse)
    torch.testing.assert_close(joined, whole, rtol=1e-5, atol=1e-6)
    scores = torch.cat([q @ k1.transpose(-1, -2), q @ k2.transpose(-1, -2)], -1) * DIM ** -0.5
    torch.testing.assert_close(joined_lse, (scores + torch.cat([torch.zeros(1, 1, 1, 7), bias], -1)).logsumexp(-1))
