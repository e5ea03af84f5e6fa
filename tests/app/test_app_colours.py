"""Subject colours: CIEDE2000 >= 25 between subjects and from each subject's own dominant colour."""
import itertools

import numpy as np
import pytest

from anystory.app.colours import MIN_DISTANCE, distances, pick_colours
from anystory.visualize import PALETTE


def _grid(step=17):
    axis = np.arange(0, 256, step)
    return [tuple(int(v) for v in c) for c in np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)]


def test_ciede2000_on_cases_with_a_known_answer():
    """A colour with itself, and black against white (on the neutral axis Delta E00 is Delta L*)."""
    assert distances([(255, 0, 0)], [(255, 0, 0)])[0, 0] == pytest.approx(0.0, abs=1e-9)
    d = distances([(0, 0, 0)], [(255, 255, 255)])[0, 0]
    assert d == pytest.approx(100.0, abs=0.01)  # L* 0 -> 100 on the neutral axis: Delta E00 = Delta L* = 100


def test_every_two_palette_colours_are_far_enough_apart():
    d = distances(PALETTE, PALETTE)
    pairs = [(d[i, j], PALETTE[i], PALETTE[j]) for i, j in itertools.combinations(range(len(PALETTE)), 2)]
    assert min(pairs)[0] >= MIN_DISTANCE, min(pairs)


def test_no_colour_is_near_more_than_three_palette_colours():
    """So any 4 subjects, whatever their colours, each keep >= 5 far palette colours: a valid choice exists."""
    near = (distances(_grid(), PALETTE) < MIN_DISTANCE).sum(axis=1)
    assert near.max() <= 3


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_chosen_colours_are_far_from_each_other_and_from_each_subjects_own(n):
    rng = np.random.default_rng(n)
    grid = _grid(51)
    cases = [list(PALETTE[:n]), list(PALETTE[-n:])] + [[grid[k] for k in rng.choice(len(grid), n)]
                                                       for _ in range(150)]
    cases += [[(145, 30, 180)] * n, [(128, 128, 128)] * n]  # purple subjects, grey subjects
    for own in cases:
        chosen = pick_colours(own)
        assert len(set(chosen)) == n and all(c in PALETTE for c in chosen)
        to_own = distances(own, chosen).diagonal()
        assert to_own.min() >= MIN_DISTANCE, (own, chosen, to_own)
        between = distances(chosen, chosen) + np.eye(n) * 1e9
        assert between.min() >= MIN_DISTANCE, (chosen, between)
