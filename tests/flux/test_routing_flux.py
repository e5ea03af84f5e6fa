"""FLUX, learned router: a subject the router may send nowhere (a region restriction on the real routing map)
never reaches the image tokens' reference attention, and under ``confine_subjects`` changes nothing at all."""
import functools

import numpy as np
import pytest
import torch

import anystory.flux.attention_processor_flux as processor
from anystory import Subject
from anystory.flux.router_flux import routing_map
from helpers.flux_pipe import CALL, PROMPT, gen, make_pipe, subject_image

CLOSED_B = torch.tensor([False, True])[None, :, None]  # [1, N=2, 1]: subject 1 closed at every image token


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


@pytest.fixture
def b_closed(monkeypatch):
    monkeypatch.setattr(processor, "routing_map", functools.partial(routing_map, closed=CLOSED_B))


def _a():
    return Subject(*subject_image(0))


def _run(pipe, subs, **kw):
    return pipe(PROMPT, subjects=subs, generator=gen(), ref_start_at=0.0, **CALL, **kw).images


def test_subject_routed_nowhere_changes_nothing_when_confined(pipe, b_closed):
    """Nothing of subject 1 reaches the image: its reference image does not change a bit of the output, and the
    output equals the call without subject 1 (<= 1e-6): each subject's reference pass runs on
    its own, and every query meets exactly the keys it meets in that call (grouped attention)."""
    both = [_run(pipe, [_a(), Subject(*subject_image(seed))], confine_subjects=True) for seed in (1, 5)]
    assert np.array_equal(both[0], both[1])
    assert np.abs(both[0] - _run(pipe, [_a()], confine_subjects=True)).max() <= 1e-6
    assert np.abs(both[0] - _run(pipe, [])).max() > 1e-3  # subject 0 does act, so the equality means something


def _first_step_blocks(pipe, subs):
    """Every block's outputs in the first denoising step: prompt rows and image rows (redux rows differ in
    number between the calls and are left out)."""
    t, state, seen = pipe.transformer, pipe.anystory_state, []
    prompt = CALL["max_sequence_length"]

    def keep(module, args, kwargs, out):
        if state.step == 0 and not state.in_ref_pass:
            text, image = out if isinstance(out, tuple) else (out[:, :0], out)
            seen.append(torch.cat([text[:, :prompt], image], dim=1).clone())

    handles = [b.register_forward_hook(keep, with_kwargs=True)
               for b in list(t.transformer_blocks) + list(t.single_transformer_blocks)]
    try:
        _run(pipe, subs, confine_subjects=True)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_first_step_layers_equal_the_call_without_the_unrouted_subject(pipe, b_closed):
    """Layers of the first step, not only the final image: each block of step 0 (redux and reference on) gives,
    on the prompt and image rows, what it gives without subject 1 (<= 1e-6)."""
    with_b = _first_step_blocks(pipe, [_a(), Subject(*subject_image(1))])
    without = _first_step_blocks(pipe, [_a()])
    assert len(with_b) == len(without) == len(pipe.transformer.transformer_blocks) + \
        len(pipe.transformer.single_transformer_blocks)
    for a, b in zip(with_b, without):
        assert (a - b).abs().max() <= 1e-6


def test_every_block_decides_its_routing_before_it_attends(pipe, monkeypatch):
    """No FLUX layer runs before a routing decision: each block computes its own map from the router tokens
    before its attention reads any subject token, from the first block of the first step on (the reference
    pass, which precedes it, runs each subject's reference alone)."""
    events = []
    decide, attend = processor.routing_map, processor.routed_attention
    monkeypatch.setattr(processor, "routing_map", lambda *a, **k: events.append("map") or decide(*a, **k))
    monkeypatch.setattr(processor, "routed_attention", lambda *a, **k: events.append("attend") or attend(*a, **k))
    _run(pipe, [_a(), Subject(*subject_image(1))], confine_subjects=True)
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert events == ["map", "attend"] * blocks * CALL["num_inference_steps"]


def test_release_attention_keeps_image_tokens_off_an_unrouted_subjects_reference(pipe, b_closed, monkeypatch):
    """Default (the release's attention), both forms: in every block and step, image tokens meet none of subject
    1's redux and reference tokens (dense form: -inf on those columns; sparse CPU form: no image token is
    labelled subject 1); only the text tokens see them, as the release does."""
    biases, labels = [], []
    dense, sparse = processor.attention_bias, processor.routed_attention

    def spy_dense(state, plan, maps, batch, dtype, device):
        bias = dense(state, plan, maps, batch, dtype, device)
        if maps is not None:
            biases.append((bias, state.txt_len, state.redux_len, state.img_len, plan.ref))
        return bias

    def spy_sparse(q, k, v, reference, row_labels, *args, **kwargs):
        labels.append(row_labels.clone())
        return sparse(q, k, v, reference, row_labels, *args, **kwargs)

    monkeypatch.setattr(processor, "attention_bias", spy_dense)
    monkeypatch.setattr(processor, "routed_attention", spy_sparse)
    subs = [_a(), Subject(*subject_image(1))]
    out = pipe(PROMPT, subjects=subs, generator=gen(), return_routing_maps=True, **CALL)
    assert all(m[:, 1].max() == 0 for m in out.routing_maps)
    assert labels and all(bool((row == 0).all()) for row in labels)  # the CPU takes the sparse form
    monkeypatch.setattr(processor, "sparse_pays", lambda q: False)  # the dense form, as on an accelerator
    pipe(PROMPT, subjects=subs, generator=gen(), **CALL)
    assert biases and any(ref for *_, ref in biases)
    for bias, txt, rx, img, ref in biases:
        rows = bias[:, 0, txt:txt + img]
        if rx:
            assert torch.all(rows[..., txt - rx // 2:txt] == float("-inf"))  # subject 1's redux tokens
            assert torch.all(rows[..., txt - rx:txt - rx // 2] == 0)  # subject 0's: open
        if ref:
            per = (bias.shape[-1] - txt - img) // 2
            assert torch.all(rows[..., txt + img + per:] == float("-inf"))  # subject 1's reference keys
    unconfined = _run(pipe, subs)
    assert np.abs(unconfined - _run(pipe, [_a(), Subject(*subject_image(5))])).max() > 1e-6, \
        "the release's text tokens do carry subject 1 (the reason confine_subjects exists)"
