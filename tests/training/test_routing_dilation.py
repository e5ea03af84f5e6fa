"""Stage 1's teacher routing to a region wider than each subject (``stage1.routing_dilation``): off by default (the
exact masks), each subject's mask grown by the radius in pixels, the background what no subject covers, and the
step's forced maps built from the grown regions, so the outline the UNet is handed is no longer the subject's own."""
import os

import numpy as np
import torch

from anystory import AnyStorySDXLPipeline
from anystory.data.synthetic import SyntheticWorld
from anystory.training.components import anystory_config, build_components
from anystory.training.config import load_config
from anystory.training.data import source_for
from anystory.training.diffusion import training_scheduler
from anystory.training.loop import step_generator
from anystory.training.stage2 import routing_priors
from anystory.training.subject_step import dilated_targets, one_hot_targets, subject_step

SMOKE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                     "smoke.yaml")


def test_radius_zero_is_the_exact_ground_truth():
    target = torch.from_numpy(SyntheticWorld(0).scene(3, count=2).routing_target())[None]
    assert dilated_targets(target, 0) is target
    assert load_config(SMOKE)["stage1"]["routing_dilation"] == 0


def test_each_subject_grows_by_the_radius_and_the_background_is_the_rest():
    target = torch.zeros(1, 3, 12, 12)
    target[0, 0, 2, 2] = 1
    target[0, 1, 10, 8] = 1
    target[0, 2] = 1 - target[0, :2].sum(0)
    grown = dilated_targets(target, 2)
    assert grown[0, 0].sum() == 25 and grown[0, 0, 0:5, 0:5].all()
    assert grown[0, 1].sum() == 5 * 4 and grown[0, 1, 8:12, 6:11].all()  # clipped at the border
    assert torch.equal(grown[0, 2], 1 - grown[0, :2].amax(0))
    assert grown.dtype == target.dtype


def test_a_grown_region_hides_the_outline_at_latent_resolution():
    scene = SyntheticWorld(0).scene(5, count=1)
    target = torch.from_numpy(scene.routing_target())[None]
    exact, grown = one_hot_targets(target, (16, 16)), one_hot_targets(dilated_targets(target, 6), (16, 16))
    assert grown[0, 0].sum() > exact[0, 0].sum() and (grown[0, 0] >= exact[0, 0]).all()


def _forced_maps(radius: int, monkeypatch) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = load_config(SMOKE, {"stage1": {"routing_dilation": radius}})
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.init_anystory(**anystory_config(cfg))
    seen = []
    start = pipe.start_anystory_call
    monkeypatch.setattr(pipe, "start_anystory_call", lambda c=None: (seen.append(c), start(c))[1])
    subject_step(cfg, "stage1", pipe, source_for(cfg, "stage1"), training_scheduler(pipe), 0, 2,
                 step_generator(cfg, "stage1", 0), teacher_routing=True)
    return seen[0].forced_maps


def test_stage_one_routes_to_the_grown_regions(monkeypatch):
    exact, grown = _forced_maps(0, monkeypatch), _forced_maps(6, monkeypatch)
    assert exact.shape == grown.shape and np.allclose(grown.sum(1).numpy(), 1.0)
    subjects_exact, subjects_grown = exact[:, :-1].sum(1), grown[:, :-1].sum(1)
    assert (subjects_grown >= subjects_exact).all() and subjects_grown.sum() > subjects_exact.sum()


def test_stage_two_learns_and_adjusts_for_the_grown_regions():
    exact = routing_priors(load_config(SMOKE), samples=16)
    grown = routing_priors(load_config(SMOKE, {"stage2": {"routing_dilation": 4}}), samples=16)
    assert grown["subject"] > exact["subject"] and grown["background"] < exact["background"]


def test_stage_two_routing_loss_reads_the_grown_regions(monkeypatch):
    import anystory.training.subject_step as step_module
    seen = {}
    real = step_module.routing_loss
    monkeypatch.setattr(step_module, "routing_loss", lambda state, targets: (seen.setdefault("t", []).append(targets),
                                                                             real(state, targets))[1])
    for radius in (0, 4):
        torch.manual_seed(0)
        cfg = load_config(SMOKE, {"stage2": {"routing_dilation": radius}})
        pipe = AnyStorySDXLPipeline(**build_components(cfg))
        pipe.init_anystory(**anystory_config(cfg))
        pipe.anystory.train()
        subject_step(cfg, "stage2", pipe, source_for(cfg, "stage2"), training_scheduler(pipe), 0, 2,
                     step_generator(cfg, "stage2", 0), teacher_routing=False, routing_weight=0.1)
    exact, grown = seen["t"]
    assert torch.equal(grown, dilated_targets(exact, 4)) and not torch.equal(grown, exact)
