"""Training: both stages lower their losses, checkpoints resume exactly, the command builds a loadable miniature."""
import json
import os

import numpy as np
import pytest
import torch

from anystory import AnyStorySDXLPipeline, Subject
from anystory.training.components import anystory_config, build_components
from anystory.training.config import load_config
from anystory.training.routing import miou, routing_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _cfg(tmp_path, **stages):
    overrides = {"work_dir": str(tmp_path / "run"), "export_dir": str(tmp_path / "export"), "log_every": 1000}
    overrides.update(stages)
    return load_config(SMOKE, overrides)


def _pipe(cfg):
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 then stage 2 on the smoke model, 25 steps each, with held-out losses before and after."""
    from anystory.training.stage1 import train_stage1
    from anystory.training.stage2 import train_stage2

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("train")
    cfg = _cfg(tmp, stage1={"steps": 25, "batch_size": 4, "lr": 2e-3},
               stage2={"steps": 25, "batch_size": 4, "lr": 3e-3})
    pipe = _pipe(cfg)
    s1 = train_stage1(cfg, pipe, log=lambda *_: None)
    s2 = train_stage2(cfg, pipe, log=lambda *_: None)
    return cfg, pipe, s1, s2


def test_stage1_lowers_the_diffusion_loss(trained):
    _, _, s1, _ = trained
    assert s1["heldout_after"]["diffusion"] < s1["heldout_before"]["diffusion"]


def test_stage2_lowers_the_routing_loss_and_raises_miou(trained):
    _, _, _, s2 = trained
    before, after = s2["heldout_before"], s2["heldout_after"]
    assert after["routing"] < 0.9 * before["routing"]
    assert after["miou"] > before["miou"]
    assert after["diffusion"] <= before["diffusion"] * 1.05


def test_logs_carry_both_losses_and_miou(trained):
    cfg, _, _, _ = trained
    with open(os.path.join(cfg["work_dir"], "stage2", "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows and {"diffusion", "routing", "miou", "loss", "lr"} <= set(rows[-1])
    assert rows[-1]["step"] == 25


def test_stage2_trains_only_the_router(tmp_path):
    from anystory.training.stage2 import stage2_parameters
    from anystory.training.stage1 import stage1_parameters

    cfg = _cfg(tmp_path)
    pipe = _pipe(cfg)
    torch.manual_seed(0)
    pipe.init_anystory(**anystory_config(cfg))
    s1, s2 = stage1_parameters(pipe.anystory), stage2_parameters(pipe.anystory)
    assert not set(s1) & set(s2)
    assert all(".router." in n or "routing_qformer" in n for n in s2)
    assert any("reference_net" in n for n in s1) and any("to_k_sem" in n for n in s1)
    assert not any(".router." in n or "routing_qformer" in n for n in s1)


def test_resume_continues_exactly(tmp_path):
    from anystory.training.loop import StageStopped
    from anystory.training.stage1 import train_stage1

    torch.set_num_threads(1)
    straight_cfg = _cfg(tmp_path / "a", stage1={"steps": 4, "batch_size": 2}, save_every=2)
    straight = _pipe(straight_cfg)
    train_stage1(straight_cfg, straight, log=lambda *_: None)

    cfg = _cfg(tmp_path / "b", stage1={"steps": 4, "batch_size": 2}, save_every=2)
    first = _pipe(cfg)
    with pytest.raises(StageStopped):  # as if killed after the step-2 checkpoint
        train_stage1(load_config(SMOKE, dict(cfg, stage1=dict(cfg["stage1"], stop_after=2))), first, log=lambda *_: None)
    with open(os.path.join(cfg["work_dir"], "stage1", "checkpoint", "state.json")) as f:
        assert json.load(f) == {"step": 2, "done": False, "seconds": pytest.approx(0, abs=1e6)}
    resumed = _pipe(cfg)
    train_stage1(cfg, resumed, log=lambda *_: None)
    a, b = straight.anystory.state_dict(), resumed.anystory.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_routing_loss_and_miou_are_right_on_known_maps():
    class State:
        soft_maps = {"layer": torch.tensor([[[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 0.5, 0.0]]])}  # [1, 2, 4]

        def layer_hw(self, tokens):
            return (2, 2)

    gt = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]]])  # class 0 left column
    # errors: position 2 off by 0.5 in both classes, position 3 off by 1 in both
    assert routing_loss(State(), gt).item() == pytest.approx((0.25 * 2 + 1 * 2) / 8)
    pred = torch.tensor([[0, 1, 0, 1]])
    assert miou(pred, torch.tensor([[0, 1, 0, 1]]), 2).item() == pytest.approx(1.0)
    assert miou(torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 1, 0, 1]]), 2).item() == pytest.approx((0.5 + 2 / 3) / 2)


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage3: {steps: 1}\n")
    with pytest.raises(ValueError, match="stage3: unknown key; known: backbone, seed"):
        load_config(str(bad))
    with pytest.raises(FileNotFoundError):
        load_config(str(tmp_path / "none.yaml"))
    with pytest.raises(ValueError, match="subjects"):
        load_config(SMOKE, {"stage2": {"subjects": [0, 0]}})


def test_command_builds_a_miniature_that_loads_and_generates(tmp_path, monkeypatch):
    import anystory.training.trajectory as trajectory
    from anystory.data.synthetic import Identity, SyntheticWorld
    from anystory.sdxl.miniature import load_miniature
    from anystory.training.runner import run_stages

    torch.set_num_threads(1)
    gaps_sampled = []  # the trajectory part (a stand-in here) samples with the stored rule but the gap
    monkeypatch.setattr(trajectory, "train_trajectory",
                        lambda cfg, pipe, log, bias: gaps_sampled.append(pipe.anystory.config.routing_subject_gap) or {})
    out = tmp_path / "export"
    code = run_stages(["--config", SMOKE, "--set", f"work_dir={tmp_path / 'run'}", "--set", f"export_dir={out}",
                       "--set", "log_every=1000", "--set", "stage2.logit_adjustment_tau=1.5",
                       "--set", "stage2.single_region=true", "--set", "stage2.logit_adjustment_tau_single=0.25",
                       "--set", "stage2.subject_gap=2", "--set", "stage2.trajectory.classifier=unused.safetensors"]
                      + [f"--set={s}.steps=1" for s in ("vae", "clip", "base", "stage1", "stage2")], log=lambda *_: None)
    assert code == 0
    for name in ("model_index.json", "anystory.safetensors", "anystory_config.json", "unet", "vae", "image_encoder"):
        assert (out / name).exists(), name
    pipe = load_miniature(path=str(out))
    pipe.set_progress_bar_config(disable=True)
    world = SyntheticWorld(0, image_size=32, reference_size=32)
    ref = world.reference(Identity.parse("red striped star"), 0).image
    result = pipe("an object on sand", subjects=[Subject(ref)], num_inference_steps=2, output_type="np",
                  return_routing_maps=True, generator=torch.Generator().manual_seed(0))
    assert result.images.shape == (1, 32, 32, 3) and np.isfinite(result.images).all()
    assert result.routing_maps[-1].shape[1] == 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"vae", "clip", "base", "stage1", "stage2", "export"} <= set(summary)
    priors = summary["stage2"]["routing_priors"]  # the inference logit adjustment is measured, and ships
    assert 0 < priors["subject"] < priors["background"] < 1
    config = json.loads((out / "anystory_config.json").read_text())
    bias = config["routing_background_bias"]
    assert bias == pytest.approx(1.5 * np.log(priors["background"] / priors["subject"]))  # tau x log prior ratio
    assert pipe.anystory.config.routing_background_bias == pytest.approx(bias)
    assert config["routing_single_region"] is True and pipe.anystory.state.single_region is True
    assert config["routing_background_bias_single"] == pytest.approx(0.25 * np.log(priors["background"] / priors["subject"]))
    assert config["routing_subject_gap"] == 2 and pipe.anystory.conditioning().subject_gap == 2
    assert gaps_sampled == [0]
    # a second run finds every stage finished and only re-exports, from the stages' folders
    assert run_stages(["--config", SMOKE, "--set", f"work_dir={tmp_path / 'run'}", "--set", f"export_dir={out}"]
                      + [f"--set={s}.steps=1" for s in ("vae", "clip", "base", "stage1", "stage2")],
                      log=lambda *_: None) == 0
    for config in out.rglob("*.json"):  # no folder of the training machine: rebuilds elsewhere write the same files
        assert str(tmp_path) not in config.read_text(), config


def test_missing_miniature_says_how_to_rebuild(tmp_path):
    from anystory.sdxl.miniature import load_miniature, miniature_available

    assert not miniature_available(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m anystory.training --config configs/miniature.yaml"):
        load_miniature(path=str(tmp_path))
