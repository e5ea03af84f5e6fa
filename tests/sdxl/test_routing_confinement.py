"""Confinement with the *learned* router (no ``set_routing_override``): a subject that the router sends nowhere
changes nothing, and no layer applies a subject before a routing decision sent it there."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from anystory import Subject
from anystory.sdxl.attention_processors import AnyStoryCrossAttnProcessor, AnyStorySelfAttnProcessor
from anystory.sdxl.router import RouterLayer
from helpers.routing import noise_image

PROMPT = "a red striped star and a blue dotted moon on sand"
FIRST_SELF_ATTENTION = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"  # runs before any router


def _run(pipe, subjects, steps=2, **kw):
    return pipe(PROMPT, subjects=subjects, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


@pytest.fixture
def regions(pipe, monkeypatch):
    """Set ``state.routing_regions`` for the calls of one test (``regions.value``: ``[N, H, W]`` or None)."""
    class Holder:
        value = None

    original = pipe.anystory.start

    def start(conditioning=None):
        if conditioning is not None and Holder.value is not None:
            conditioning = replace(conditioning, routing_regions=Holder.value[: conditioning.num_subjects])
        return original(conditioning)

    monkeypatch.setattr(pipe.anystory, "start", start)
    return Holder


def test_single_subject_routed_nowhere_equals_no_subject(pipe):
    """Background bias -1e4: the learned router gives the subject no position in any layer of any step."""
    plain = _run(pipe, []).images
    for seed in (1, 2, 3):
        out = _run(pipe, [Subject(noise_image(seed))], routing_background_bias=-1e4, return_routing_maps=True)
        assert all(m[:, 0].max() == 0 for m in out.routing_maps), "the subject was routed somewhere"
        assert np.abs(out.images - plain).max() <= 1e-6
    assert np.abs(_run(pipe, [Subject(noise_image(1))]).images - plain).max() > 1e-4, "a routed subject must act"


def test_second_subject_routed_nowhere_equals_the_call_without_it(pipe, regions):
    """Subject A routed by the learned router over part of the image; subject B allowed nowhere. For any reference
    of B the output is the call with A alone, to <= 1e-6 (bit-identical here)."""
    allowed = torch.zeros(2, 32, 32)
    allowed[0, :, :20] = 1  # A may take the left part only
    regions.value = allowed
    alone = _run(pipe, [Subject(noise_image(1))], routing_background_bias=1.0, return_routing_maps=True)
    share = torch.stack([m[0, 0] for m in alone.routing_maps]).mean().item()
    assert 0.05 < share <= 20 / 32, f"A should hold part of the image, holds {share:.2f}"
    for b_seed in (2, 5, 9):
        both = _run(pipe, [Subject(noise_image(1)), Subject(noise_image(b_seed), scale=2.0)], routing_background_bias=1.0,
                    return_routing_maps=True)
        assert all(m[:, 1].max() == 0 for m in both.routing_maps)
        assert np.abs(both.images - alone.images).max() <= 1e-6
    regions.value = None
    assert np.abs(_run(pipe, [Subject(noise_image(1)), Subject(noise_image(2))], routing_background_bias=1.0).images
                  - alone.images).max() > 1e-4, "B, when routed, must act"


def test_router_classes_are_independent():
    """A class's logits do not depend on the other classes' tokens: the precondition of removal invariance."""
    torch.manual_seed(0)
    router = RouterLayer(16, 8, 12)
    latent, tokens = torch.randn(2, 30, 16), torch.randn(2, 3, 8)
    full = router(latent, tokens)
    without_middle = router(latent, tokens[:, [0, 2]])
    assert torch.allclose(full[:, [0, 2]], without_middle, atol=1e-6, rtol=0)
    changed = tokens.clone()
    changed[:, 1] = torch.randn(2, 8) * 10
    assert torch.allclose(router(latent, changed)[:, [0, 2]], full[:, [0, 2]], atol=1e-6, rtol=0)


@pytest.fixture
def recorder(monkeypatch):
    """Per UNet call (= step): the map the first self-attention layer saw and its output; every layer's gate."""
    class Record:
        first, gates = [], []

    original_call, original_route = AnyStorySelfAttnProcessor.__call__, AnyStoryCrossAttnProcessor._route

    def call(self, attn, hidden_states, *args, **kwargs):
        out = original_call(self, attn, hidden_states, *args, **kwargs)
        if self.name == FIRST_SELF_ATTENTION:
            prev = self.state.prev_map
            Record.first.append((None if prev is None else prev.clone(), out.clone()))
        return out

    def route(self, hidden, hw):
        gate = original_route(self, hidden, hw)
        Record.gates.append(gate.clone())
        return gate

    monkeypatch.setattr(AnyStorySelfAttnProcessor, "__call__", call)
    monkeypatch.setattr(AnyStoryCrossAttnProcessor, "_route", route)
    return Record


def test_layers_before_the_first_map_are_gated(pipe, recorder):
    """Step 0: the layers before the first routing decision are diffusers' own (no subject, whatever the
    references). Later steps: they use the last map of the previous step."""
    _run(pipe, [], steps=2)
    plain_first = recorder.first[0][1]
    runs = []
    for seed in (1, 2):
        recorder.first, recorder.gates = [], []
        _run(pipe, [Subject(noise_image(seed))], steps=2, routing_background_bias=1e4)  # the subject goes everywhere
        runs.append((recorder.first, recorder.gates))
    for first, gates in runs:
        assert len(first) == 2
        prev0, out0 = first[0]
        assert prev0 is None and torch.equal(out0, plain_first), "a subject acted before the first routing map"
        last_of_step0 = gates[len(gates) // 2 - 1]
        prev1 = first[1][0]
        assert torch.equal(prev1.flatten(2), last_of_step0), "step 1 must start from step 0's last map"
        assert prev1[:, 0].min() == 1, "with the subject routed everywhere, step 1 starts routed"
    assert not torch.equal(runs[0][0][1][1], runs[1][0][1][1]), "at step 1 the first layer must use the reference"
