"""Training objectives follow the scheduler's ``prediction_type``: epsilon (SDXL's, the default) or v-prediction on a
zero-terminal-SNR schedule, chosen by ``model.scheduler`` in a training config."""
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from anystory import AnyStorySDXLPipeline
from anystory.training.components import build_components
from anystory.training.config import load_config
from anystory.training.diffusion import (min_snr_weight, predicted_clean, predicted_noise, prediction_target,
                                         training_scheduler)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
V_SCHEDULER = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def _scheduler(**entries) -> DDPMScheduler:
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **entries)


def _noised(scheduler):
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=gen), torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 250, 700, 999])
    return latents, noise, t, scheduler.add_noise(latents, noise, t)


@pytest.mark.parametrize("entries", [{}, V_SCHEDULER])
def test_the_target_implies_the_clean_latents_and_the_noise(entries):
    scheduler = _scheduler(**entries)
    latents, noise, t, noisy = _noised(scheduler)
    target = prediction_target(scheduler, latents, noise, t)
    assert torch.allclose(predicted_clean(scheduler, noisy[:3], target[:3], t[:3]), latents[:3], atol=1e-4)
    assert torch.allclose(predicted_noise(scheduler, noisy, target, t), noise, atol=1e-5)
    if entries:
        assert not torch.allclose(target, noise)
        assert torch.equal(noisy[3], noise[3])  # zero terminal SNR: x_T holds nothing of the image
        assert torch.allclose(predicted_clean(scheduler, noisy[3:], target[3:], t[3:]), latents[3:], atol=1e-5)
    else:
        assert torch.equal(target, noise)


def test_min_snr_weights():
    t = torch.arange(0, 1000, 37)
    eps = _scheduler()
    snr = eps.alphas_cumprod[t] / (1 - eps.alphas_cumprod[t])
    assert torch.equal(min_snr_weight(eps, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    v = _scheduler(**V_SCHEDULER)
    weight = min_snr_weight(v, torch.tensor([999, 990, 500, 10]), 5.0)
    assert torch.isfinite(weight).all()
    assert torch.equal(weight[:3], torch.ones(3))  # noisy steps keep full weight, the pure-noise one included
    assert 0 < weight[3] < 0.2


def test_an_unsupported_prediction_type_is_named():
    scheduler = _scheduler(prediction_type="sample")
    latents, noise, t, _ = _noised(scheduler)
    with pytest.raises(ValueError, match="'sample'"):
        prediction_target(scheduler, latents, noise, t)


@pytest.fixture(scope="module")
def v_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vpred")
    cfg = load_config(SMOKE, {"work_dir": str(tmp / "run"), "export_dir": str(tmp / "export")})
    cfg["model"]["scheduler"] = dict(V_SCHEDULER)
    return cfg


def test_the_config_sets_the_scheduler_and_the_base_learns_the_velocity(v_cfg, monkeypatch):
    import anystory.training.base as base

    pipe = AnyStorySDXLPipeline(**build_components(v_cfg))
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    scheduler = training_scheduler(pipe)
    assert scheduler.alphas_cumprod[-1] == 0
    seen = {}
    real_noisy, real_loss = base.noisy_latents, base.diffusion_loss

    def keep_inputs(scheduler, latents, generator, *args, **kw):
        noisy, noise, t = real_noisy(scheduler, latents, generator, *args, **kw)
        seen.update(latents=latents, noise=noise, t=t)
        return noisy, noise, t

    def keep_target(scheduler, pred, target, *args):
        seen["target"] = target
        return real_loss(scheduler, pred, target, *args)

    monkeypatch.setattr(base, "noisy_latents", keep_inputs)
    monkeypatch.setattr(base, "diffusion_loss", keep_target)
    world = base.world_for(v_cfg)
    loss = base.base_step(v_cfg, pipe, world, scheduler, 0, 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    velocity = scheduler.get_velocity(seen["latents"], seen["noise"], seen["t"])
    assert torch.equal(seen["target"], velocity) and not torch.allclose(velocity, seen["noise"])


def test_no_subject_equals_stable_diffusion_xl_with_the_v_scheduler(v_cfg):
    components = build_components(v_cfg)
    ref = StableDiffusionXLPipeline(**{k: v for k, v in components.items()})
    pipe = AnyStorySDXLPipeline(**components)
    for p in (ref, pipe):
        p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np", height=64, width=64)
    expected = ref("a red striped star on sand", generator=torch.Generator().manual_seed(0), **kw).images
    got = pipe("a red striped star on sand", subjects=[], generator=torch.Generator().manual_seed(0), **kw).images
    assert np.isfinite(got).all()
    assert np.abs(expected - got).max() <= 1e-6
