"""The trajectory router (``router.py``): a second router per layer whose background-adjusted logits are added to
the stage-2 router's for the inference decision. The decision on a built example, removal invariance and batch
independence with it, and a model without one routing as before."""
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anystory import Subject
from anystory.routing import route_decision
from anystory.sdxl.adapter_sdxl import AnyStorySDXLAdapter
from anystory.sdxl.router import routing_maps
from helpers.routing import noise_image

PROMPT = "a red striped star and a blue dotted moon on sand"


def _labels(gate: torch.Tensor) -> torch.Tensor:
    return gate.argmax(1)


def test_the_decision_adds_both_routers_adjusted_logits():
    """Classes: subject 0, subject 1, background; four positions. Stage 2's router adjusted by 3, the trajectory
    router by 1 and weighted 0.5: position 0 changes subject, 1 goes to the background, 2 comes from it, 3 is a tie
    that the lowest index wins."""
    stage2 = torch.tensor([[[2.0, 2.0, 0.0, 1.0], [1.5, 0.0, 0.0, 0.9], [4.0, 4.0, 4.0, 4.0]]])
    trajectory = torch.tensor([[[0.0, 1.0, 4.0, 0.0], [3.0, 0.0, 0.0, 0.0], [2.0, 5.0, 1.0, 1.0]]])
    alone, _ = routing_maps(stage2, training=False, background_bias=3.0)
    assert _labels(alone).tolist() == [[0, 0, 2, 0]]
    both, _ = routing_maps(stage2, training=False, background_bias=3.0, trajectory_logits=trajectory,
                           trajectory_weight=0.5, trajectory_background_bias=1.0)
    assert _labels(both).tolist() == [[1, 2, 0, 0]]
    assert both.sum(1).eq(1).all()
    torch.manual_seed(0)
    reference = F.gumbel_softmax(stage2, hard=True, dim=1)
    torch.manual_seed(0)
    assert torch.equal(routing_maps(stage2, training=True, trajectory_logits=trajectory, trajectory_weight=0.5)[0],
                       reference), "training routes by stage 2's router alone"


def test_without_a_trajectory_router_the_decision_is_the_adjusted_argmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 36) * 3
    adjusted = torch.cat([logits[:, :-1], logits[:, -1:] - 2.5], dim=1)
    gate, _ = routing_maps(logits, training=False, background_bias=2.5, trajectory_weight=0.7)
    assert torch.equal(gate, F.one_hot(route_decision(adjusted), 4).movedim(-1, 1).float())


@pytest.mark.parametrize("rules", [{}, {"hw": (6, 6), "single_region": True},
                                   {"hw": (6, 6), "single_region": True, "subject_gap": 1}])
def test_a_subject_winning_nowhere_leaves_the_others_and_a_batch_equals_its_samples(rules):
    torch.manual_seed(1)
    stage2, trajectory = torch.randn(2, 4, 36) * 2, torch.randn(2, 4, 36) * 2
    stage2[:, 1] -= 1e4
    trajectory[:, 1] -= 1e4  # subject 1 wins nowhere
    kw = dict(training=False, background_bias=1.0, trajectory_weight=0.5, trajectory_background_bias=0.5, **rules)
    labels = _labels(routing_maps(stage2, trajectory_logits=trajectory, **kw)[0])
    assert not (labels == 1).any() and len(labels.unique()) == 3
    keep = [0, 2, 3]
    without = _labels(routing_maps(stage2[:, keep], trajectory_logits=trajectory[:, keep], **kw)[0])
    assert torch.equal(torch.tensor(keep)[without], labels)
    for b in range(2):
        single = _labels(routing_maps(stage2[b:b + 1], trajectory_logits=trajectory[b:b + 1], **kw)[0])
        assert torch.equal(single, labels[b:b + 1])


def _run(pipe, subjects, **kw):
    return pipe(PROMPT, subjects=subjects, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="np", routing_background_bias=1.0, **kw)


def _drop_trajectory_routers(adapter):
    for cond in adapter.layer_conditioning.values():
        del cond.trajectory_router
    adapter.register_to_config(routing_trajectory_weight=0.0, routing_trajectory_background_bias=0.0)


def test_pipeline_with_and_without_trajectory_routers(pipe, tmp_path):
    subjects = [Subject(noise_image(1)), Subject(noise_image(2))]
    adapter = pipe.anystory
    assert not any(".trajectory_router." in k for k in adapter.state_dict())
    base = _run(pipe, subjects, return_routing_maps=True)
    params = adapter.add_trajectory_routers(0.5, 0.5)
    assert params and all(".trajectory_router." in k for k in params)
    try:
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p) * 0.5)
        routed = _run(pipe, subjects, return_routing_maps=True)
        assert any(not torch.equal(a, b) for a, b in zip(routed.routing_maps, base.routing_maps))
        assert np.abs(routed.images - base.images).max() > 1e-4, "the trajectory router must change the decision"
        adapter.save_anystory(str(tmp_path))
        loaded = AnyStorySDXLAdapter.load_anystory(str(tmp_path))
        assert loaded.config.routing_trajectory_weight == 0.5
        assert set(loaded.state_dict()) == set(adapter.state_dict())
    finally:
        _drop_trajectory_routers(adapter)
    assert np.array_equal(_run(pipe, subjects).images, base.images), "without them, routing is as before"
    with pytest.raises(ValueError, match="weight must be > 0"):
        adapter.add_trajectory_routers(0.0, 1.0)


def test_a_subject_allowed_nowhere_changes_nothing_with_trajectory_routers(pipe, monkeypatch):
    adapter = pipe.anystory
    params = adapter.add_trajectory_routers(0.5, 0.5)
    allowed = torch.zeros(2, 32, 32)
    allowed[0, :, :20] = 1
    original = adapter.start

    def start(conditioning=None):
        if conditioning is not None:
            conditioning = replace(conditioning, routing_regions=allowed[: conditioning.num_subjects])
        return original(conditioning)

    monkeypatch.setattr(adapter, "start", start)
    try:
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn_like(p) * 0.5)
        alone = _run(pipe, [Subject(noise_image(1))], return_routing_maps=True)
        assert torch.stack([m[0, 0] for m in alone.routing_maps]).mean() > 0.05
        for seed in (2, 5):
            both = _run(pipe, [Subject(noise_image(1)), Subject(noise_image(seed), scale=2.0)],
                        return_routing_maps=True)
            assert all(m[:, 1].max() == 0 for m in both.routing_maps)
            assert np.abs(both.images - alone.images).max() <= 1e-6
    finally:
        _drop_trajectory_routers(adapter)
