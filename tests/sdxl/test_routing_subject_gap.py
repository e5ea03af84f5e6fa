"""The gap between subjects (``routing_subject_gap``, the miniature's inference rule): at every layer, any two
subjects' regions are parted by at least the gap (scaled to the layer's grid) of background, and the routing
guarantees still hold with it: a subject routed nowhere changes nothing, and a batch gives what single calls give."""
import math

import numpy as np
import pytest
import torch

from anystory import Subject
from anystory.sdxl.router import kept_apart, largest_regions, routing_maps
from helpers.routing import PROMPT, assert_routed_nowhere_changes_nothing, noise_image, record_gates, run_routed, tiny_pipe

LATENT = 32  # the tiny pipeline's latent side at its default size


def _grid(rows: str) -> torch.Tensor:
    """``"00.1|..."`` rows -> labels ``[1, L]``; ``.`` is the background (class 2 of 3)."""
    return torch.tensor([[2 if c == "." else int(c) for c in "".join(rows.split("|"))]])


def _closest(labels: torch.Tensor, hw, a: int, b: int) -> float:
    """Chebyshev distance between the nearest positions of classes ``a`` and ``b`` (inf when one is absent)."""
    grid = labels.view(*hw)
    pa, pb = (grid == a).nonzero().float(), (grid == b).nonzero().float()
    if not len(pa) or not len(pb):
        return math.inf
    return float((pa[:, None] - pb[None]).abs().amax(-1).min())


def test_touching_regions_give_way_to_the_background():
    labels = _grid("000111|000111|000111")
    assert torch.equal(kept_apart(labels, (3, 6), 3, 1), _grid("00..11|00..11|00..11"))
    assert torch.equal(kept_apart(labels, (3, 6), 3, 2), _grid("0....1|0....1|0....1"))
    apart = _grid("00...1|00...1|.....1")  # already three cells apart: nothing changes for gaps up to 3
    assert torch.equal(kept_apart(apart, (3, 6), 3, 3), apart)
    diagonal = _grid("0..|.1.|...")  # 8-neighbours are one cell apart
    assert torch.equal(kept_apart(diagonal, (3, 3), 3, 1), diagonal)


def test_a_subject_that_would_vanish_keeps_its_positions_and_the_other_gives_way():
    labels = _grid("0111|.111|.111")
    assert torch.equal(kept_apart(labels, (3, 4), 3, 1), _grid("0.11|..11|.111"))


def _reference(labels: torch.Tensor, hw, subjects: int, gap: int) -> torch.Tensor:
    """The rule position by position: a subject's position with another subject's within ``gap`` goes to the
    background, unless that leaves the subject nothing."""
    cells = [[divmod(k, hw[1]) for k in (labels == i).nonzero().flatten().tolist()] for i in range(subjects)]
    out = labels.clone()
    for i in range(subjects):
        others = [q for j in range(subjects) if j != i for q in cells[j]]
        near = [p for p in cells[i] if any(max(abs(p[0] - q[0]), abs(p[1] - q[1])) <= gap for q in others)]
        if len(near) < len(cells[i]):
            for r, c in near:
                out[r * hw[1] + c] = subjects
    return out


def test_random_maps_follow_the_rule_keep_the_gap_and_samples_are_independent():
    torch.manual_seed(0)
    batch = torch.randint(0, 4, (6, 100))  # three subjects and the background on a 10x10 grid
    for gap in (1, 2):
        whole = kept_apart(batch, (10, 10), 4, gap)
        for b in range(6):
            one = kept_apart(batch[b:b + 1], (10, 10), 4, gap)
            assert torch.equal(whole[b:b + 1], one)
            assert torch.equal(one[0], _reference(batch[b], (10, 10), 3, gap))
            kept_all = [i for i in range(3) if torch.equal(one[0] == i, batch[b] == i)]
            for i in range(3):
                assert (batch[b] == i).any() <= (one[0] == i).any(), "a subject that wins a position keeps one"
                for j in range(i + 1, 3):
                    if not (i in kept_all and j in kept_all):
                        assert _closest(one[0], (10, 10), i, j) > gap
    sparse = torch.full((1, 100), 3)
    sparse[0, [0, 2, 55, 57, 99]] = torch.tensor([0, 1, 0, 2, 1])
    assert torch.equal(kept_apart(sparse, (10, 10), 4, 1), sparse), "nothing to part"


def test_a_subject_winning_nowhere_removes_nothing():
    """Labels over three subjects where the third wins nowhere give what the same labels over two subjects give."""
    torch.manual_seed(1)
    two = torch.randint(0, 3, (4, 64))  # classes 0, 1 and the background 2
    three = torch.where(two == 2, 3, two)  # the same map with a third subject that wins nowhere
    got = kept_apart(three, (8, 8), 4, 1)
    assert torch.equal(torch.where(got == 3, 2, got), kept_apart(two, (8, 8), 3, 1))


def test_the_rule_is_inference_only_and_needs_the_grid():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 36)
    gate, _ = routing_maps(logits, training=False, hw=(6, 6), single_region=True, subject_gap=1)
    plain, _ = routing_maps(logits, training=False)
    expected = largest_regions(kept_apart(largest_regions(plain.argmax(1), (6, 6), 3), (6, 6), 3, 1), (6, 6), 3)
    assert torch.equal(gate.argmax(1), expected)
    assert not torch.equal(expected, largest_regions(plain.argmax(1), (6, 6), 3)), "the rule must cut something"
    torch.manual_seed(1)
    trained, _ = routing_maps(logits, training=True, hw=(6, 6), subject_gap=1)
    torch.manual_seed(1)
    assert torch.equal(trained, routing_maps(logits, training=True)[0])
    with pytest.raises(ValueError, match="grid"):
        routing_maps(logits, training=False, subject_gap=1)


def test_the_adapter_refuses_a_gap_that_is_not_a_whole_number():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="routing_subject_gap"):
            tiny_pipe(routing_subject_gap=bad)


GAP = 4  # latent positions; each layer parts the subjects by the gap scaled to its grid, rounded up


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipe(routing_single_region=True, routing_subject_gap=GAP)


@pytest.fixture
def gates(monkeypatch):
    return record_gates(monkeypatch)


def _closest_at_each_layer(seen) -> list:
    """Per layer and sample: (distance between the two subjects' nearest positions, the layer's gap in cells)."""
    return [(_closest(g[b].argmax(0), hw, 0, 1), math.ceil(GAP * hw[0] / LATENT))
            for g, hw in seen for b in range(g.shape[0])]


def test_every_layer_parts_the_subjects_by_the_gap(pipe, gates):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    run_routed(pipe, subjects)
    rows = _closest_at_each_layer(gates)
    assert rows and all(d > gap for d, gap in rows)
    assert any(d < math.inf for d, _ in rows), "both subjects must hold positions somewhere"
    pipe.anystory.register_to_config(routing_subject_gap=0)
    try:
        gates.clear()
        run_routed(pipe, subjects)
        assert any(d <= gap for d, gap in _closest_at_each_layer(gates)), "without the rule the subjects must meet"
    finally:
        pipe.anystory.register_to_config(routing_subject_gap=GAP)


def test_subject_routed_nowhere_changes_nothing_with_the_gap(pipe, monkeypatch):
    assert_routed_nowhere_changes_nothing(pipe, monkeypatch, LATENT)


def test_batch_equals_single_calls_with_the_gap(pipe):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    latents = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(3))
    prompts = [PROMPT, "two toys on a wooden table"]
    singles = [run_routed(pipe, subjects, prompt=prompts[i], latents=latents[i:i + 1]).images[0] for i in range(2)]
    batch = run_routed(pipe, subjects, prompt=prompts, latents=latents).images
    for i in range(2):
        assert np.abs(batch[i] - singles[i]).max() <= 1e-4
