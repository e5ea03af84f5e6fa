"""Stage ``flux_base``: the tiny FLUX base learns the synthetic world before the subject stages, which then start
from it; it is off by default and refuses a FLUX that comes trained."""
import pytest
import torch
from safetensors.torch import load_file

from anystory.flux.tiny_flux import tiny_flux_components
from anystory.training.config import load_config
from anystory.training.data import world_for
from anystory.training.flux_base import flux_base_step, train_flux_base, trained_base_path
from anystory.training.flux_stages import load_stage_input
from anystory.training.runner import run_stages

TINY = "configs/flux_tiny.yaml"


def _args(work, base_steps):
    return ["--config", TINY, "--set", f"work_dir={work}", "--set", "trackers=[]", "--set", "log_every=1000",
            "--set", f"flux_base.steps={base_steps}", "--set", "flux_subject.steps=2", "--set", "flux_router.steps=2",
            "--set", "flux_subject.heldout_batches=0", "--set", "flux_router.heldout_batches=0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("flux_base")
    assert run_stages(_args(work, 40), log=lambda *_: None) == 0
    return work


def test_the_base_learns_the_world(trained):
    import json

    summary = json.loads((trained / "summary.json").read_text())["flux_base"]
    assert summary["heldout_after"] < 0.75 * summary["heldout_before"]


def test_the_subject_stages_start_from_the_trained_base(trained):
    cfg = load_config(TINY, {"work_dir": str(trained)})
    saved = load_file(trained_base_path(cfg))
    random = tiny_flux_components(0, 2)["transformer"].state_dict()
    assert set(saved) == set(random)
    assert any(not torch.equal(saved[k], random[k]) for k in saved)
    loaded = load_stage_input(cfg, "flux_subject").transformer.state_dict()
    for key, value in saved.items():
        wrapped = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")  # LoRA-wrapped
        assert torch.equal(loaded[key if key in loaded else wrapped], value), key


def test_off_by_default_and_the_subject_stages_use_the_random_base(tmp_path):
    assert load_config(TINY)["flux_base"]["steps"] == 0
    assert run_stages(_args(tmp_path, 0), log=lambda *_: None) == 0
    assert not (tmp_path / "flux_base").exists()
    cfg = load_config(TINY, {"work_dir": str(tmp_path)})
    random = tiny_flux_components(0, 2)["transformer"].state_dict()
    loaded = load_stage_input(cfg, "flux_subject").transformer.state_dict()
    key = "time_text_embed.timestep_embedder.linear_1.weight"
    assert torch.equal(loaded[key], random[key])


def test_a_trained_flux_is_refused_by_name():
    cfg = load_config(TINY, {"flux": {"base": "black-forest-labs/FLUX.1-dev"}, "flux_base": {"steps": 10}})
    with pytest.raises(ValueError, match="FLUX.1-dev' comes trained"):
        train_flux_base(cfg, pipe=None)


def test_rows_of_a_step_are_the_step_split():
    """Two processes taking rows 0-3 and 4-7 of a global batch of 8 average to what one process computes."""
    cfg = load_config(TINY, {"flux_base": {"object_weight": 6.0}})
    pipe = load_stage_input(cfg, "flux_base")
    world = world_for(cfg)
    with torch.no_grad():
        whole = flux_base_step(cfg, pipe, world, 3, 8, torch.Generator().manual_seed(0))["loss"]
        halves = [flux_base_step(cfg, pipe, world, 3, 8, torch.Generator().manual_seed(0),
                                 rows=slice(a, a + 4))["loss"] for a in (0, 4)]
    assert torch.allclose(whole, torch.stack(halves).mean(), rtol=1e-5)
