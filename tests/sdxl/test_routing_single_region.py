"""One region per subject (``routing_single_region``, the miniature's inference rule): every layer's map gives
each subject one 8-connected region, and the routing guarantees still hold with the rule on: a subject routed
nowhere changes nothing, and a batch gives what single calls give."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from anystory import Subject
from anystory.sdxl.router import largest_regions, routing_maps
from helpers.routing import PROMPT, assert_routed_nowhere_changes_nothing, noise_image, record_gates, run_routed, tiny_pipe
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
    return tiny_pipe(routing_single_region=True)


@pytest.fixture
def gates(monkeypatch):
    return record_gates(monkeypatch)


def _most_regions(seen) -> int:
    return max(ndimage.label((g[b, i].view(*hw) > 0).numpy(), structure=EIGHT)[1]
               for g, hw in seen for b in range(g.shape[0]) for i in range(g.shape[1] - 1))


def test_every_layer_routes_each_subject_to_one_region(pipe, gates):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    run_routed(pipe, subjects)
    assert len(gates) > 0 and _most_regions(gates) == 1
    pipe.anystory.register_to_config(routing_single_region=False)
    try:
        gates.clear()
        run_routed(pipe, subjects)
        assert _most_regions(gates) > 1, "the untrained router fragments its maps; the rule must be what joins them"
    finally:
        pipe.anystory.register_to_config(routing_single_region=True)


def test_subject_routed_nowhere_changes_nothing_with_the_rule(pipe, monkeypatch):
    assert_routed_nowhere_changes_nothing(pipe, monkeypatch)


def test_batch_equals_single_calls_with_the_rule(pipe):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = [PROMPT, "two toys on a wooden table"]
    singles = [run_routed(pipe, subjects, prompt=prompts[i], latents=latents[i:i + 1]).images[0] for i in range(2)]
    same = run_routed(pipe, subjects, latents=latents, num_images_per_prompt=2).images
    assert np.abs(same[0] - singles[0]).max() <= 1e-4
    assert np.abs(same[1] - run_routed(pipe, subjects, latents=latents[1:]).images[0]).max() <= 1e-4
    batch = run_routed(pipe, subjects, prompt=prompts, latents=latents).images
    for i in range(2):
        assert np.abs(batch[i] - singles[i]).max() <= 1e-4
