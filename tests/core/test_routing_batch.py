"""Routing does not depend on the batch: a deterministic float32 decision with a tie rule, and image by image
the same output from a batch as from single calls with the same latents (SDXL and FLUX)."""
import numpy as np
import pytest
import torch

from anystory import Subject
from anystory.routing import DECISION_GRID, route_decision
from anystory.sdxl.router import routing_maps
from helpers.routing import noise_image, tiny_pipe
from helpers.flux_pipe import CALL, make_pipe, subject_image

PROMPTS = ["a red striped star and a blue dotted moon on sand", "two toys on a wooden table"]


def test_near_tie_is_decided_by_the_index_not_the_noise():
    """Two classes 3e-8 apart (float noise between batch sizes): the lower index wins whichever is larger."""
    base = 0.3 + DECISION_GRID / 2  # mid-cell, so +-3e-8 stays in the cell
    for noise in (3e-8, -3e-8):
        logits = torch.tensor([[[base], [base + noise], [base - 1.0]]])  # [1, K=3, L=1]
        assert route_decision(logits).item() == 0
        assert routing_maps(logits, training=False)[0][0, :, 0].tolist() == [1.0, 0.0, 0.0]
    assert torch.tensor([base, base + 3e-8]).argmax().item() == 1, "the raw argmax follows the noise"
    # a real margin still decides, and float16 logits are decided in float32
    assert route_decision(torch.tensor([[0.3], [0.3 + 4 * DECISION_GRID]])[None]).item() == 1
    assert route_decision(torch.tensor([[1.0], [1.0]], dtype=torch.float16)[None]).item() == 0


def test_removing_a_class_that_does_not_win_keeps_the_winner():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 200)
    winner = route_decision(logits)
    for drop in range(5):
        keep = [k for k in range(5) if k != drop]
        sub = torch.tensor(keep)[route_decision(logits[:, keep])]
        unchanged = winner != drop
        assert torch.equal(sub[unchanged], winner[unchanged])


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipe()


@pytest.mark.parametrize("subject_seeds", [(1, 2), (1, 1)], ids=["two-subjects", "identical-subjects-tie"])
def test_sdxl_batch_equals_single_calls(sdxl, subject_seeds):
    subjects = [Subject(noise_image(s)) for s in subject_seeds]
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    call = dict(subjects=subjects, num_inference_steps=2, output_type="np", routing_background_bias=1.0)
    singles = [sdxl(PROMPTS[i], latents=latents[i:i + 1], **call).images[0] for i in range(2)]
    same = sdxl(PROMPTS[0], latents=latents, num_images_per_prompt=2, **call).images
    assert np.abs(same[0] - singles[0]).max() <= 1e-4
    assert np.abs(same[1] - sdxl(PROMPTS[0], latents=latents[1:], **call).images[0]).max() <= 1e-4
    batch = sdxl(PROMPTS, latents=latents, **call).images
    for i in range(2):
        assert np.abs(batch[i] - singles[i]).max() <= 1e-4


@pytest.fixture(scope="module")
def flux():
    return make_pipe()


@pytest.mark.parametrize("offsets", [(0, 1), (0, 0)], ids=["two-subjects", "identical-subjects-tie"])
def test_flux_batch_equals_single_calls(flux, offsets):
    subjects = [Subject(*subject_image(o)) for o in offsets]
    cell = 2 * flux.vae_scale_factor
    shape = (2, (CALL["height"] // cell) * (CALL["width"] // cell), flux.transformer.config.in_channels)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    call = dict(CALL, subjects=subjects, generator=torch.Generator().manual_seed(0))

    def run(prompt, lat, **kw):
        call["generator"] = torch.Generator().manual_seed(0)  # the reference latents' posterior sample
        return flux(prompt, latents=lat, **call, **kw).images

    singles = [run(PROMPTS[i], latents[i:i + 1])[0] for i in range(2)]
    same = run(PROMPTS[0], latents, num_images_per_prompt=2)
    assert np.abs(same[0] - singles[0]).max() <= 1e-4
    assert np.abs(same[1] - run(PROMPTS[0], latents[1:])[0]).max() <= 1e-4
    batch = run(PROMPTS, latents)
    for i in range(2):
        assert np.abs(batch[i] - singles[i]).max() <= 1e-4
