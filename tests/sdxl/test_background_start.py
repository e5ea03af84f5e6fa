"""``background_start``: the background reference's mean latent in the sampler's starting latent. At 0 (the default
of weights that do not set it) nothing changes; otherwise the first latent is diffusers' own plus exactly
``strength`` x the reference's per-channel mean latent as the first timestep's noising scales a clean signal;
the weights' stored value is the default; bad values are refused by name."""
import numpy as np
import pytest
import torch

from anystory import Subject
from anystory.errors import InvalidInputError
from anystory.sdxl.background import background_tensors, read_background
from helpers.routing import noise_image, tiny_pipe


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipe()
    torch.manual_seed(2)
    p.anystory.add_background(2)
    with torch.no_grad():
        for param in p.anystory.background.parameters():
            param.normal_(0, 0.05)
    return p


def _first_unet_input(pipe, **kw):
    """(the UNet's first input sample, the images) of a 2-step call with one subject and a background reference."""
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    try:
        images = pipe("a star", subjects=[Subject(noise_image(1))], background=noise_image(7), num_inference_steps=2,
                      output_type="np", generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        hook.remove()
    return seen[0], images


def test_zero_start_changes_nothing(pipe):
    assert pipe.anystory.config.background_start == 0
    default, images = _first_unet_input(pipe)
    zero, zero_images = _first_unet_input(pipe, background_start=0)
    assert torch.equal(default, zero) and np.array_equal(images, zero_images)


def test_start_adds_the_reference_mean_latent(pipe):
    plain, images = _first_unet_input(pipe, guidance_scale=1.0)
    size = pipe.anystory.config.reference_size
    pixels = background_tensors(pipe, read_background(noise_image(7), size), "cpu", torch.float32)["pixels"]
    mean = pipe.encode_vae(pixels).mean(dim=(2, 3), keepdim=True)
    assert mean.abs().max() > 1e-3
    pipe.scheduler.set_timesteps(2)
    first = pipe.scheduler.timesteps[:1]
    # the UNet's input is the scheduler's scaling of the latent; the scaling is linear, so the difference scales too
    expected_latent = pipe.scheduler.add_noise(mean.expand_as(plain), torch.zeros_like(plain), first)
    for strength in (0.5, 1.5):
        started, started_images = _first_unet_input(pipe, guidance_scale=1.0, background_start=strength)
        pipe.scheduler.set_timesteps(2)
        expected = pipe.scheduler.scale_model_input(strength * expected_latent, pipe.scheduler.timesteps[0])
        assert torch.allclose(started - plain, expected, atol=1e-5), (started - plain - expected).abs().max()
        assert np.abs(started_images - images).max() > 1e-3


def test_stored_start_is_the_default(pipe):
    explicit, images = _first_unet_input(pipe, background_start=0.7)
    pipe.anystory.register_to_config(background_start=0.7)
    try:
        stored, stored_images = _first_unet_input(pipe)
    finally:
        pipe.anystory.register_to_config(background_start=0.0)
    assert torch.equal(explicit, stored) and np.array_equal(images, stored_images)
    # without a background reference the stored value does nothing
    out = pipe("a star", subjects=[Subject(noise_image(1))], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0), background_start=0.7).images
    assert np.array_equal(out, pipe("a star", subjects=[Subject(noise_image(1))], num_inference_steps=2,
                                    output_type="np", generator=torch.Generator().manual_seed(0)).images)


@pytest.mark.parametrize("value", [-0.5, float("nan"), "much"])
def test_bad_start_is_refused(pipe, value):
    with pytest.raises(InvalidInputError, match="background_start"):
        _first_unet_input(pipe, background_start=value)
