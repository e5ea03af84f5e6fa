"""The routing study's own arithmetic: bootstrap intervals, oracle maps from drawn objects, per-step shares; what
each mode of the one-subject part asks the pipeline for."""
import types

import numpy as np
import torch

from anystory.data.synthetic import IDENTITIES, SyntheticWorld, WorldConfig
from benchmarks.routing_study import STUDY_SEED, bootstrap, mean_of, oracle_maps, single_subject, step_routing


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


class _RecordingPipe:
    """Stands in for the miniature: records each call's prompt, subject count and seed; draws nothing."""
    vae_scale_factor = 4

    def __init__(self):
        self.calls = []
        self.anystory = types.SimpleNamespace(config=types.SimpleNamespace(routing_single_region=True,
                                                                           routing_trajectory_weight=0.0),
                                              register_to_config=lambda **kwargs: None)

    def set_routing_override(self, override):
        pass

    def __call__(self, prompt, subjects, generator, **kwargs):
        self.calls.append((prompt, len(subjects), generator.initial_seed()))
        return types.SimpleNamespace(images=[np.full((64, 64, 3), 0.5, np.float32)])


def test_the_one_subject_part_names_the_identity_only_in_the_named_control_and_counts_a_blank_as_wrong():
    world = SyntheticWorld(STUDY_SEED, WorldConfig(image_size=64, reference_size=64))
    pipe = _RecordingPipe()
    rows = single_subject(pipe, world, None, steps=2, guidance=3.0, modes=["on", "none", "named"], per_identity=1,
                          offset=20_000)
    by_mode = {mode: [c for k, c in enumerate(pipe.calls) if k % 3 == i] for i, mode in enumerate(["on", "none", "named"])}
    first = IDENTITIES[0]
    assert by_mode["on"][0][:2] == ("an object on " + world.config.backgrounds[0], 1)
    assert by_mode["none"][0][:2] == ("an object on " + world.config.backgrounds[0], 0)
    assert by_mode["named"][0][:2] == (f"a {first.name} on {world.config.backgrounds[0]}", 0)
    assert [c[2] for c in by_mode["named"]] == list(range(20_000, 20_000 + len(IDENTITIES)))
    assert all(rows[m]["identity"]["value"] == 0.0 and rows[m]["found"]["value"] == 0.0 for m in rows)
    assert rows["named"]["images"] == len(IDENTITIES)


def test_the_table_states_a_lone_subjects_own_adjustment_only_when_the_model_has_one():
    from benchmarks.routing_study import markdown_table
    report = {"modes": ["on"], "routing_background_bias": 1.087, "routing_single_region": True}
    assert "one subject:" not in markdown_table(report).splitlines()[0]
    head = markdown_table({**report, "routing_background_bias_single": 0.0}).splitlines()[0]
    assert "Background logit adjustment of this model: 1.087 (a call with one subject: 0.000); one region" in head
    assert "gap between subjects: 0 latent positions" in head
    assert "gap between subjects: 2 latent positions" in markdown_table({**report, "routing_subject_gap": 2})
