"""The background stage's loss on the backdrop colour of the predicted clean image (``x0_colour_loss``,
``background.x0_colour_weight``): zero when the prediction recovers the target's backdrop, blind to the objects'
pixels, nonzero with gradient into the background parameters otherwise, and the option at 0 changes nothing."""
import os

import pytest
import torch

from anystory import AnyStorySDXLPipeline
from anystory.training.background import background_parameters, background_step, backdrop_colour, x0_colour_loss
from anystory.training.components import anystory_config, build_components
from anystory.training.config import load_config
from anystory.training.data import source_for
from anystory.training.diffusion import predicted_clean
from anystory.training.diffusion import training_scheduler
from anystory.training.stage1 import freeze_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _cfg(tmp_path, **background):
    return load_config(SMOKE, {"work_dir": str(tmp_path / "run"),
                               "background": {"batch_size": 2, "rank": 2, "subjects": [0.0, 1.0], **background}})


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path_factory.mktemp("bg"))
    p = AnyStorySDXLPipeline(**build_components(cfg))
    torch.manual_seed(0)
    p.init_anystory(**anystory_config(cfg))
    p.anystory.add_background(2)
    p.anystory.eval()
    freeze_all(p)
    return p


def _clean_case(pipe, t_value: int = 300):
    """Latents, their decoded image as the target, noised at ``t_value`` with the exact noise as prediction."""
    scheduler = training_scheduler(pipe)
    latents = torch.randn(2, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(2))
    t = torch.full((2,), t_value)
    backdrop = torch.zeros(2, 1, *pixels.shape[-2:])
    backdrop[:, :, :, : pixels.shape[-1] // 2] = 1  # the left half is backdrop
    return scheduler, scheduler.add_noise(latents, noise, t), noise, t, pixels, backdrop


def test_predicted_clean_inverts_the_noising(pipe):
    scheduler, noisy, noise, t, _, _ = _clean_case(pipe, 900)
    latents = torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(predicted_clean(scheduler, noisy, noise, t), latents, atol=1e-4)


def test_zero_when_the_prediction_recovers_the_backdrop_whatever_the_objects(pipe):
    scheduler, noisy, noise, t, pixels, backdrop = _clean_case(pipe)
    assert float(x0_colour_loss(pipe, scheduler, noisy, noise, t, pixels, backdrop, 1000)) < 1e-5
    objects_changed = torch.where(backdrop.bool(), pixels, torch.ones_like(pixels))  # the objects' pixels: white
    assert not torch.allclose(objects_changed, pixels)
    assert float(x0_colour_loss(pipe, scheduler, noisy, noise, t, objects_changed, backdrop, 1000)) < 1e-5
    backdrop_changed = pixels + 0.2 * backdrop  # the backdrop 0.2 brighter in every channel
    assert abs(float(x0_colour_loss(pipe, scheduler, noisy, noise, t, backdrop_changed, backdrop, 1000)) - 0.2) < 1e-4


def test_backdrop_colour_is_the_mean_over_the_mask():
    pixels = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).expand(2, 1, 2, 2)
    assert torch.equal(backdrop_colour(pixels, mask), (pixels[..., 0, 0] + pixels[..., 1, 1]) / 2)


def test_timesteps_at_or_above_the_bound_count_zero(pipe):
    scheduler, noisy, noise, t, pixels, backdrop = _clean_case(pipe, 600)
    shifted = pixels + 0.2 * backdrop
    assert float(x0_colour_loss(pipe, scheduler, noisy, noise, t, shifted, backdrop, 600)) == 0
    assert float(x0_colour_loss(pipe, scheduler, noisy, noise, t, shifted, backdrop, 601)) > 0.1
    mixed = torch.tensor([300, 700])  # one sample below 500, one above: half the batch counts
    noisy = scheduler.add_noise(predicted_clean(scheduler, noisy, noise, t), noise, mixed)
    assert abs(float(x0_colour_loss(pipe, scheduler, noisy, noise, mixed, shifted, backdrop, 500)) - 0.1) < 1e-4


def _step(pipe, cfg, seed: int = 0):
    return background_step(cfg, pipe, source_for(cfg, "background"), training_scheduler(pipe), 0, 2,
                           torch.Generator().manual_seed(seed))


def test_the_loss_trains_the_background_and_the_option_at_zero_changes_nothing(pipe, tmp_path):
    params = background_parameters(pipe.anystory)
    for p in params.values():
        p.requires_grad_(True)
    try:
        off = _step(pipe, _cfg(tmp_path, x0_colour_weight=0.0))
        default = _step(pipe, _cfg(tmp_path))
        on = _step(pipe, _cfg(tmp_path, x0_colour_weight=2.0))
        assert "x0_colour" not in off and torch.equal(off["loss"], off["diffusion"])
        assert torch.equal(default["loss"], off["loss"])  # off is the default
        assert torch.equal(on["diffusion"], off["diffusion"])  # same batch, noise and timesteps
        assert float(on["x0_colour"].detach()) > 0
        assert torch.allclose(on["loss"], on["diffusion"] + 2.0 * on["x0_colour"])
        grads = torch.autograd.grad(on["x0_colour"], list(params.values()), allow_unused=True)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
        assert grads[list(params).index("anystory.background.token_embedding")].abs().sum() > 0
    finally:
        for p in params.values():
            p.requires_grad_(False)


def test_held_out_evaluation_reports_the_colour_error_with_and_without_the_reference(pipe, tmp_path):
    from anystory.training.background import evaluate_background

    held = evaluate_background(_cfg(tmp_path), pipe, batches=1)
    assert held["colour_with_background"] > 0 and held["colour_without_background"] > 0
    assert held["colour_with_background"] != held["colour_without_background"]  # the reference enters it


def test_colour_by_timestep_evaluates_at_each_given_timestep(pipe):
    from benchmarks.background_study import colour_by_timestep, colour_table

    by_t = colour_by_timestep(pipe, [0, 999], SMOKE)
    assert list(by_t) == [0, 999]
    # at t=0 the noisy input is the scene itself; at t=999 the prediction must invent the backdrop
    assert by_t[0]["colour_without_background"] < by_t[999]["colour_without_background"]
    assert by_t[0] != by_t[999]
    assert "| 999 |" in colour_table(by_t)


def test_offset_noise_adds_a_per_channel_constant_to_the_noise_and_the_noisy_input(pipe, tmp_path, monkeypatch):
    """``offset_noise``: the step's noise (the loss's target) gains a constant per sample and channel, and the
    UNet's noisy input is the same noising of that noise; at 0 the step is the default's."""
    import anystory.training.background as stage

    seen = {}
    real_loss = stage.diffusion_loss

    def keep_noise(scheduler, pred, noise, t, *args):
        seen["noise"], seen["t"] = noise, t
        return real_loss(scheduler, pred, noise, t, *args)

    monkeypatch.setattr(stage, "diffusion_loss", keep_noise)
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.__setitem__("noisy", args[0]))
    try:
        runs = {}
        for name, offset in (("default", None), ("off", 0.0), ("on", 0.5)):
            out = _step(pipe, _cfg(tmp_path) if offset is None else _cfg(tmp_path, offset_noise=offset))
            runs[name] = (out["loss"].detach(), seen["noise"], seen["noisy"], seen["t"])
    finally:
        hook.remove()
    assert torch.equal(runs["off"][0], runs["default"][0]) and torch.equal(runs["off"][1], runs["default"][1])
    (_, noise_off, noisy_off, t), (_, noise_on, noisy_on, t_on) = runs["off"], runs["on"]
    assert torch.equal(t, t_on)
    offset = noise_on - noise_off
    assert offset.abs().mean() > 0.05
    assert torch.allclose(offset, offset.mean(dim=(2, 3), keepdim=True), atol=1e-6)  # constant over positions
    sigma = (1 - training_scheduler(pipe).alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(noisy_on - noisy_off, sigma * offset, atol=1e-5)
