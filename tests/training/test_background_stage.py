"""The background stage: its data (a backdrop reference of the scene's kind, captions that leave the backdrop
unnamed), that it trains only the ``background.*`` parameters, and the runner's wiring (skipped at 0 steps)."""
import os

import numpy as np
import pytest
import torch

from anystory import AnyStorySDXLPipeline
from anystory.data.synthetic import BACKGROUNDS, SyntheticWorld, caption_for, generic_caption_for
from anystory.training.components import anystory_config, build_components
from anystory.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _nearest_backdrop(image) -> str:
    mean = np.asarray(image, np.float32).reshape(-1, 3).mean(0)
    return min(BACKGROUNDS, key=lambda n: float(((np.asarray(BACKGROUNDS[n]) - mean) ** 2).sum()))


def test_background_reference_is_another_view_of_the_same_kind():
    world = SyntheticWorld(0)
    for name in BACKGROUNDS:
        a, b = world.background_reference(name, 3), world.background_reference(name, 4)
        assert a.mode == "RGB" and a.size == (64, 64)
        assert np.array_equal(np.asarray(a), np.asarray(world.background_reference(name, 3)))  # deterministic
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # another view per index
        assert _nearest_backdrop(a) == name == _nearest_backdrop(b)
    scene = world.scene(5)
    assert not np.array_equal(np.asarray(world.background_reference(scene.background, 5)), scene.image)


def test_captions_can_leave_the_backdrop_unnamed():
    scene = SyntheticWorld(0).scene(2, count=2)
    assert scene.caption == caption_for(scene.identities, scene.background)
    unnamed = caption_for(scene.identities, None)
    assert scene.caption == f"{unnamed} on {scene.background}" and scene.background not in unnamed
    assert generic_caption_for(2, None) == "two objects"


def _cfg(tmp_path, **overrides):
    base = {"work_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "export"), "log_every": 1000}
    base.update(overrides)
    return load_config(SMOKE, base)


def test_background_stage_trains_only_the_background(tmp_path):
    from anystory.training.background import background_parameters, train_background

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, background={"steps": 4, "batch_size": 2, "lr": 1e-2, "rank": 2})
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    pipe.init_anystory(**anystory_config(cfg))
    before = {k: v.clone() for k, v in pipe.anystory.state_dict().items()}
    metrics = train_background(cfg, pipe, log=lambda *_: None)
    after = pipe.anystory.state_dict()
    changed = {k for k in after if k not in before or not torch.equal(before[k], after[k])}
    assert changed == set(k[len("anystory."):] for k in background_parameters(pipe.anystory))
    assert all(k.startswith("background.") for k in changed) and "background.token_embedding" in changed
    assert pipe.anystory.config.background_rank == 2
    held = metrics["heldout_after"]
    assert held["with_background"] != held["without_background"]  # the reference enters the loss


def test_background_stage_is_the_same_run_whatever_the_global_rng(tmp_path):
    """The background stage's down projections start random: their init must come from the config's seed, or a
    rebuild from the same stage-2 weights and config trains other tensors."""
    from anystory.training.background import train_background

    torch.set_num_threads(1)
    runs = []
    for global_seed in (1, 2):  # each in its own work_dir: a shared one would resume the first run's state
        cfg = _cfg(tmp_path / str(global_seed), background={"steps": 2, "batch_size": 2, "lr": 1e-2, "rank": 2,
                                                             "token_rank": 2, "ip_rank": 2})
        pipe = AnyStorySDXLPipeline(**build_components(cfg))
        pipe.set_progress_bar_config(disable=True)
        torch.manual_seed(0)
        pipe.init_anystory(**anystory_config(cfg))
        torch.manual_seed(global_seed)
        train_background(cfg, pipe, log=lambda *_: None)
        runs.append({k: v.clone() for k, v in pipe.anystory.background.state_dict().items()})
    assert runs[0].keys() == runs[1].keys() and any(k.startswith("token_down") for k in runs[0])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_runner_skips_the_stage_at_zero_steps_and_names_it(tmp_path):
    from anystory.training.config import STAGES
    from anystory.training.runner import STAGE_FUNCTIONS, run_stages

    assert STAGES.index("stage2") < STAGES.index("background") < STAGES.index("export")
    assert STAGE_FUNCTIONS["background"] == ("background", "train_background")
    assert load_config(SMOKE)["background"]["steps"] == 0
    assert load_config(os.path.join(ROOT, "configs", "miniature.yaml"))["background"]["steps"] > 0
    lines = []
    assert run_stages(["--config", SMOKE, "--stages", "background", "--set", f"work_dir={tmp_path}"],
                      log=lines.append) == 0
    assert any("not trained" in line for line in lines)
    with pytest.raises(ValueError, match="subjects"):
        load_config(SMOKE, {"background": {"subjects": [0, 0]}})


def test_merge_adds_background_tensors_and_keeps_every_other(tmp_path):
    from safetensors.torch import load_file

    from anystory.training.merge_background import merge_background
    from helpers.routing import tiny_pipe

    trained, shipped = tiny_pipe(), tiny_pipe()
    trained.anystory.add_background(2, gate=True, token_rank=2)
    with torch.no_grad():
        trained.anystory.background.token_embedding.fill_(0.5)
        next(iter(trained.anystory.background.gate.values())).fill_(-0.25)
        next(shipped.anystory.layer_conditioning.parameters()).add_(1.0)  # e.g. a router retrained since
    trained.save_anystory_weights(str(tmp_path / "stage"))
    shipped.save_anystory_weights(str(tmp_path / "ship"))
    before = load_file(str(tmp_path / "ship" / "anystory.safetensors"))
    keys = merge_background(str(tmp_path / "stage"), str(tmp_path / "ship"), torch.float32)
    after = load_file(str(tmp_path / "ship" / "anystory.safetensors"))
    assert keys and all(k.startswith("background.") for k in keys)
    assert set(after) == set(before) | set(keys)
    assert all(torch.equal(after[k], before[k]) for k in before)
    loaded = tiny_pipe().load_anystory_weights(str(tmp_path / "ship"))
    assert loaded.background is not None and float(loaded.background.token_embedding[0, 0]) == 0.5
    assert loaded.config.background_gate and float(next(iter(loaded.background.gate.values()))) == -0.25
    assert loaded.config.background_token_rank == 2 and loaded.background.token_up is not None
    tiny_pipe().save_anystory_weights(str(tmp_path / "plain"))
    with pytest.raises(ValueError, match="no background reference weights"):
        merge_background(str(tmp_path / "plain"), str(tmp_path / "ship"))
