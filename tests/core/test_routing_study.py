"""The routing study's own arithmetic: bootstrap intervals, oracle maps from drawn objects, per-step shares."""
import numpy as np
import torch

from benchmarks.routing_study import bootstrap, mean_of, oracle_maps, step_routing


def test_bootstrap_interval_brackets_the_value_and_narrows_with_more_units():
    rng = np.random.default_rng(0)
    small = list(rng.normal(1.0, 1.0, 20))
    large = list(rng.normal(1.0, 1.0, 500))
    a, b = bootstrap(small, mean_of), bootstrap(large, mean_of)
    assert a["lo"] <= a["value"] <= a["hi"] and b["lo"] <= b["value"] <= b["hi"]
    assert (b["hi"] - b["lo"]) < (a["hi"] - a["lo"]) / 2
    assert bootstrap([2.0] * 10, mean_of) == {"value": 2.0, "lo": 2.0, "hi": 2.0, "n": 10}


def test_oracle_maps_and_step_shares():
    a = np.zeros((8, 8), bool)
    a[:, :4] = True  # subject 0: left half
    b = np.zeros((8, 8), bool)
    b[:4, 4:] = True  # subject 1: top right
    maps = oracle_maps([a, b], size=8, latent=4)
    assert maps.shape == (3, 4, 4) and torch.equal(maps.sum(0), torch.ones(4, 4))
    assert maps[0, :, :2].all() and maps[1, :2, 2:].all() and maps[2, 2:, 2:].all()
    assert oracle_maps([a, None], 8, 4) is None
    swapped = maps[[1, 0, 2]][None]  # every object routed to the other subject
    (other, own), = step_routing([swapped], [a, b], size=8)
    assert other == 1.0 and own == 0.0
    (other, own), = step_routing([maps[None]], [a, b], size=8)
    assert other == 0.0 and own == 1.0
