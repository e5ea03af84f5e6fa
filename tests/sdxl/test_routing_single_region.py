"""One region per subject (``routing_single_region``, the miniature's inference rule): every layer's map gives
each subject one 8-connected region, and the routing guarantees still hold with the rule on: a subject routed
nowhere changes nothing, and a batch gives what single calls give."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import ndimage

from anystory import AnyStorySDXLPipeline, Subject
from anystory.sdxl.attention_processors import AnyStoryCrossAttnProcessor
from anystory.sdxl.router import largest_regions, routing_maps
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components
from helpers.routing import noise_image

PROMPT = "a red striped star and a blue dotted moon on sand"
EIGHT = np.ones((3, 3))  # 8-connectivity


def _grid(rows: str) -> torch.Tensor:
    """``"00.1|..."`` rows -> labels ``[1, L]``; ``.`` is the background (class 2 of 3)."""
    return torch.tensor([[2 if c == "." else int(c) for c in "".join(rows.split("|"))]])


def test_each_subject_keeps_its_largest_region_and_the_rest_goes_to_the_background():
    labels = _grid("00..11|0...11|.0....|......|..0.1.|..00..")
    # subject 0: a 4-cell region (top-left, the diagonal step joins it under 8-connectivity) and a 3-cell one
    # (bottom); subject 1: a 4-cell region (top-right) and a single cell
    expected = _grid("00..11|0...11|.0....|......|......|......")
    assert torch.equal(largest_regions(labels, (6, 6), 3), expected)
    one_region = _grid("000.11|......|......")
    assert torch.equal(largest_regions(one_region, (3, 6), 3), one_region)


def test_equal_regions_keep_the_first_and_samples_are_independent():
    tie = _grid("0.0|...|...")  # two single cells: the one whose last position comes first is kept
    assert torch.equal(largest_regions(tie, (3, 3), 3), _grid("0..|...|..."))
    torch.manual_seed(0)
    batch = torch.randint(0, 3, (4, 64))
    whole = largest_regions(batch, (8, 8), 3)
    for b in range(4):
        assert torch.equal(whole[b:b + 1], largest_regions(batch[b:b + 1], (8, 8), 3))
    for b in range(4):  # against scipy's labelling
        for i in range(2):
            mask = (whole[b] == i).view(8, 8).numpy()
            assert ndimage.label(mask, structure=EIGHT)[1] <= 1
            before = (batch[b] == i).view(8, 8).numpy()
            regions, n = ndimage.label(before, structure=EIGHT)
            if n:
                assert mask.sum() == np.bincount(regions.ravel())[1:].max()


def test_the_rule_is_inference_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 36)
    gate, _ = routing_maps(logits, training=False, hw=(6, 6), single_region=True)
    plain, _ = routing_maps(logits, training=False)
    assert not torch.equal(gate, plain), "random logits fragment; the rule must cut them"
    assert torch.equal(gate.argmax(1), largest_regions(plain.argmax(1), (6, 6), 3))
    torch.manual_seed(1)
    trained, _ = routing_maps(logits, training=True, hw=(6, 6), single_region=True)
    torch.manual_seed(1)
    assert torch.equal(trained, routing_maps(logits, training=True)[0])


@pytest.fixture(scope="module")
def pipe():
    p = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0))
    p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    p.init_anystory(**TINY_ANYSTORY_CONFIG, routing_single_region=True)
    return p


def _run(pipe, subjects, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(kw.pop("prompt", PROMPT), subjects=subjects, num_inference_steps=2, output_type="np",
                routing_background_bias=1.0, **kw)


@pytest.fixture
def gates(monkeypatch):
    """Every cross-attention layer's gating map, with its grid."""
    seen = []
    original = AnyStoryCrossAttnProcessor._route

    def route(self, hidden, hw):
        gate = original(self, hidden, hw)
        seen.append((gate.clone(), hw))
        return gate

    monkeypatch.setattr(AnyStoryCrossAttnProcessor, "_route", route)
    return seen


def _most_regions(seen) -> int:
    return max(ndimage.label((g[b, i].view(*hw) > 0).numpy(), structure=EIGHT)[1]
               for g, hw in seen for b in range(g.shape[0]) for i in range(g.shape[1] - 1))


def test_every_layer_routes_each_subject_to_one_region(pipe, gates):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    _run(pipe, subjects)
    assert len(gates) > 0 and _most_regions(gates) == 1
    pipe.anystory.register_to_config(routing_single_region=False)
    try:
        gates.clear()
        _run(pipe, subjects)
        assert _most_regions(gates) > 1, "the untrained router fragments its maps; the rule must be what joins them"
    finally:
        pipe.anystory.register_to_config(routing_single_region=True)


def test_subject_routed_nowhere_changes_nothing_with_the_rule(pipe, monkeypatch):
    """B allowed nowhere (``routing_regions``), A routed by the learned router with the rule: the output equals
    the call with A alone, for any reference of B."""
    allowed = torch.zeros(2, 32, 32)
    allowed[0, :, :20] = 1
    original = pipe.anystory.start

    def start(conditioning=None):
        if conditioning is not None:
            conditioning = replace(conditioning, routing_regions=allowed[: conditioning.num_subjects])
        return original(conditioning)

    monkeypatch.setattr(pipe.anystory, "start", start)
    alone = _run(pipe, [Subject(noise_image(1))], return_routing_maps=True)
    assert torch.stack([m[0, 0] for m in alone.routing_maps]).mean() > 0.05, "A must hold part of the image"
    for b_seed in (2, 5):
        both = _run(pipe, [Subject(noise_image(1)), Subject(noise_image(b_seed), scale=2.0)], return_routing_maps=True)
        assert all(m[:, 1].max() == 0 for m in both.routing_maps)
        assert np.abs(both.images - alone.images).max() <= 1e-6


def test_batch_equals_single_calls_with_the_rule(pipe):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = [PROMPT, "two toys on a wooden table"]
    singles = [_run(pipe, subjects, prompt=prompts[i], latents=latents[i:i + 1]).images[0] for i in range(2)]
    same = _run(pipe, subjects, latents=latents, num_images_per_prompt=2).images
    assert np.abs(same[0] - singles[0]).max() <= 1e-4
    assert np.abs(same[1] - _run(pipe, subjects, latents=latents[1:]).images[0]).max() <= 1e-4
    batch = _run(pipe, subjects, prompt=prompts, latents=latents).images
    for i in range(2):
        assert np.abs(batch[i] - singles[i]).max() <= 1e-4
