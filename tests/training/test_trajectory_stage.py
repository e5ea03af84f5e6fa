"""The trajectory part of stage 2: every router's input is recorded at every sampling step, and training on the
recordings moves the routers (only them) toward the objects finally drawn."""
import numpy as np
import pytest
import torch

from anystory.data.synthetic import SyntheticWorld, WorldConfig
from anystory.training import trajectory
from helpers.routing import tiny_pipe

STEPS = 3


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_pipe()


@pytest.fixture(scope="module")
def world(pipe):
    size = pipe.default_sample_size * pipe.vae_scale_factor
    return SyntheticWorld(0, WorldConfig(image_size=size, reference_size=pipe.anystory.config.reference_size))


def _halves(image, subjects, classifier):
    """Stand-in for the chroma + classifier matching: subject i drew the i-th vertical half of the image."""
    h, w = image.shape[:2]
    masks = [np.zeros((h, w), bool) for _ in subjects]
    masks[0][:, : w // 2] = True
    masks[1][:, w // 2:] = True
    return masks


@pytest.fixture(scope="module")
def recorded(pipe, world):
    patch = pytest.MonkeyPatch()
    calls = []

    def drawn(image, subjects, classifier):
        calls.append(len(calls))
        return [None, None] if len(calls) == 2 else _halves(image, subjects, classifier)  # the 2nd: nothing found

    patch.setattr(trajectory, "drawn_objects", drawn)
    try:
        data = trajectory.record_trajectories(pipe, None, world, [5, 6, 7], steps=STEPS, guidance=2.0, log=None)
    finally:
        patch.undo()
    return data


def test_every_step_of_every_router_is_recorded_and_failed_samples_are_dropped(pipe, recorded):
    assert len(recorded) == 2  # sample 6 drew nothing for its subjects
    layers = trajectory.router_layers(pipe.anystory)
    for t in recorded:
        assert set(t.latents) == set(layers)
        for name, latent in t.latents.items():
            assert latent.shape[0] == STEPS and latent.dtype == torch.float16  # the conditional half only
            assert latent.shape[-1] == layers[name].latent_norm.normalized_shape[0]
        assert t.tokens.shape == (3, pipe.anystory.config.routing_dim)
        assert torch.allclose(t.target.sum(0), torch.ones(()))
        assert t.target[0, :, 0].all() and t.target[1, :, -1].all()
    assert all(not m._forward_hooks for m in layers.values())  # the recording hooks are gone


def test_recorded_inputs_are_what_the_routers_saw(pipe, world, recorded):
    """Replay sample 5 with a hook of the test's own: the conditional half each router got at every step."""
    from anystory import Subject

    seen = {}
    layers = trajectory.router_layers(pipe.anystory)
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen.setdefault(n, []).append(args[0][-1].clone()))
               for n, m in layers.items()]
    sample = world.sample(5, count=2)
    try:
        pipe(sample.scene.generic_caption, subjects=[Subject(r.image) for r in sample.references],
             num_inference_steps=STEPS, guidance_scale=2.0, generator=torch.Generator().manual_seed(5), output_type="np")
    finally:
        for h in handles:
            h.remove()
    for name, inputs in seen.items():
        assert torch.allclose(recorded[0].latents[name].float(), torch.stack(inputs), atol=2e-3, rtol=1e-3)


def test_training_moves_only_the_routers_toward_the_drawn_objects(pipe, recorded):
    adapter = pipe.anystory
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    steps = torch.zeros(len(recorded), dtype=torch.long)
    with torch.no_grad():
        loss_before = float(trajectory.trajectory_loss(adapter, recorded, steps))
    agree_before = trajectory.decision_agreement(adapter, recorded, 0, 0.0)
    result = trajectory.train_routers(adapter, recorded, 60, 1e-2, 2, 0, log=None, heldout=recorded)
    with torch.no_grad():
        loss_after = float(trajectory.trajectory_loss(adapter, recorded, steps))
    after = adapter.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(".router." in k for k in changed)
    assert set(trajectory.router_parameters(adapter)) >= {f"anystory.{k}" for k in changed}
    assert loss_after < 0.8 * loss_before
    assert result["heldout_step0_agreement_after"] > agree_before
    assert not any(p.requires_grad for p in adapter.parameters())
    adapter.load_state_dict(before)


def test_retrain_routers_reads_a_cache_and_refuses_an_empty_one(pipe, world, recorded, tmp_path):
    cache = tmp_path / "trajectories.pt"
    torch.save([vars(t) for t in recorded], cache)
    before = {k: v.clone() for k, v in pipe.anystory.state_dict().items()}
    settings = {"samples": 5, "iterations": 3, "lr": 1e-2, "batch_size": 2}
    try:
        out = trajectory.retrain_routers(pipe, None, world, settings, log=lambda *_: None, cache=str(cache))
        assert out["trajectories"] == 2 and out["iterations"] == 3
        changed = [k for k, v in pipe.anystory.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(".router." in k for k in changed)
        torch.save([], cache)
        with pytest.raises(RuntimeError, match="no trajectory kept"):
            trajectory.retrain_routers(pipe, None, world, settings, log=lambda *_: None, cache=str(cache))
    finally:
        pipe.anystory.load_state_dict(before)


def test_combine_trains_a_copy_as_trajectory_routers_and_keeps_stage_2s(pipe, world, recorded, tmp_path):
    cache = tmp_path / "trajectories.pt"
    torch.save([vars(t) for t in recorded], cache)
    adapter = pipe.anystory
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    settings = {"samples": 5, "iterations": 3, "lr": 1e-2, "batch_size": 2, "combine_weight": 0.5,
                "trajectory_background_bias": 1.25}
    try:
        trajectory.retrain_routers(pipe, None, world, settings, log=lambda *_: None, cache=str(cache))
        after = adapter.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), "stage 2's routers and all else are kept"
        added = {k for k in after if k not in before}
        assert added == {k.replace(".router.", ".trajectory_router.") for k in before if ".router." in k}
        assert any(not torch.equal(after[k], before[k.replace(".trajectory_router.", ".router.")]) for k in added)
        assert adapter.config.routing_trajectory_weight == 0.5
        assert adapter.config.routing_trajectory_background_bias == 1.25
    finally:
        for cond in adapter.layer_conditioning.values():
            del cond.trajectory_router
        adapter.register_to_config(routing_trajectory_weight=0.0, routing_trajectory_background_bias=0.0)


def test_stage2_refuses_combine_without_the_trajectory_routers_adjustment(pipe):
    from anystory.training.stage2 import train_stage2

    cfg = {"stage2": {"steps": 1, "trajectory": {"samples": 1, "iterations": 1, "combine_weight": 0.5}}}
    with pytest.raises(ValueError, match="combine_weight needs logit_adjustment_tau"):
        train_stage2(cfg, pipe, log=lambda *_: None)


def test_routing_dilation_grows_the_drawn_objects_the_routers_learn(pipe, world, recorded, tmp_path, monkeypatch):
    assert trajectory.grown(recorded, 0) is recorded
    bigger = trajectory.grown(recorded, 3)
    for old, new in zip(recorded, bigger):
        assert new.latents is old.latents and torch.equal(new.tokens, old.tokens)
        assert (new.target[:-1] >= old.target[:-1]).all() and new.target[:-1].sum() > old.target[:-1].sum()
        assert (new.target[-1] <= old.target[-1]).all()
    cache = tmp_path / "trajectories.pt"
    torch.save([vars(t) for t in recorded], cache)
    seen = []
    monkeypatch.setattr(trajectory, "train_routers", lambda adapter, data, *a, **k: (seen.append(data), {"seconds": 0,
                        "heldout_step0_agreement_before": 0.0, "heldout_step0_agreement_after": 0.0})[1])
    settings = {"samples": 5, "iterations": 1, "lr": 1e-2, "batch_size": 2, "routing_dilation": 3}
    trajectory.retrain_routers(pipe, None, world, settings, log=lambda *_: None, cache=str(cache))
    held = max(1, len(recorded) // 8)
    assert all(torch.equal(a.target, b.target) for a, b in zip(seen[0], bigger[held:]))
