"""The node pack's input checks, schedule and subject encoding, without a model evaluation."""
import os
import sys

import pytest
import torch

from helpers.comfy import TINY_UNET, import_comfy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tiny_models

import_comfy()

from anystory.errors import InvalidInputError  # noqa: E402
from anystory.flux.tiny_flux import random_released_state_dict  # noqa: E402
from anystory.flux.weights_flux import AnyStoryWeightsError  # noqa: E402
from comfyui_anystory.conditioning import MAX_SUBJECTS, EncodedSubject, Settings, SubjectSet, run_conditioning  # noqa: E402
from comfyui_anystory.patch import step_index  # noqa: E402
from comfyui_anystory.weights import diffusers_skeleton, resolve_for_model  # noqa: E402


def subject(region=None, ref_tokens=4):
    return EncodedSubject(redux=torch.ones(1, 81, 32), router=torch.ones(1, 9, 32),
                          ref_latents=torch.zeros(1, ref_tokens, 16), ref_ids=torch.zeros(ref_tokens, 3),
                          ref_mask=torch.ones(ref_tokens, dtype=torch.bool), region=region)


def test_a_file_for_another_width_is_refused_naming_keys():
    released = random_released_state_dict(diffusers_skeleton(TINY_UNET), redux_dim=16)
    wider = dict(TINY_UNET, hidden_size=64, num_heads=4)
    with pytest.raises(AnyStoryWeightsError, match=r"wrong shape for \d+ key\(s\): transformer\."):
        resolve_for_model(released, wider)


def test_subject_chain_limits_and_sizes():
    chain = SubjectSet()
    for _ in range(MAX_SUBJECTS):
        chain = chain.plus(subject())
    with pytest.raises(InvalidInputError, match="at most 4 subjects"):
        chain.plus(subject())
    with pytest.raises(InvalidInputError, match="same reference size"):
        SubjectSet().plus(subject()).plus(subject(ref_tokens=16))


def test_schedule_and_regions():
    """The authors' windows at the run's step count; ref_start 0.09 with several subjects; a box needs the router."""
    two = SubjectSet().plus(subject((0.0, 0.0, 0.5, 1.0))).plus(subject())
    cond = run_conditioning(two, Settings(), steps=25, grid=(4, 4))
    assert cond.redux_window == (3, 8) and cond.ref_window == (2, 25) and cond.use_router
    assert cond.closed_regions.shape == (1, 2, 16) and cond.closed_regions[0, 0].sum() == 8
    assert not cond.closed_regions[0, 1].any()
    with pytest.raises(InvalidInputError, match="need the router"):
        run_conditioning(two, Settings(use_router=False), steps=25, grid=(4, 4))
    with pytest.raises(InvalidInputError, match="must not exceed"):
        Settings(redux_start=0.5, redux_end=0.2).check()


def test_step_index_takes_the_interval_holding_sigma():
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    assert [step_index(sigmas, torch.tensor([s])) for s in (1.0, 0.9, 0.8, 0.5, 0.3, 0.2)] == [0, 0, 1, 2, 2, 3]


def test_encode_subject_masks_packs_and_shifts(tmp_path):
    """The subject node's encoding with ComfyUI's SigLIP: grey outside the subject for SigLIP and the VAE, redux
    tokens only for windows that hold subject patches, reference tokens flagged by the mask, packed 2x2 and placed
    left of the image in RoPE."""
    import json

    import comfy.clip_vision

    from anystory.flux.redux import AnyStoryReduxEncoder
    from comfyui_anystory.encode import encode_subject
    from comfyui_anystory.nodes import AnyStoryModel
    from tiny_models import SIGLIP

    config = tmp_path / "siglip.json"
    config.write_text(json.dumps(SIGLIP))
    clip = comfy.clip_vision.ClipVisionModel(str(config))
    g = torch.Generator().manual_seed(0)
    clip.load_sd({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in clip.get_sd().items()})

    class RecordingVAE:
        def encode(self, pixels):
            self.pixels = pixels
            return pixels.mean(-1)[:, None, ::8, ::8].repeat(1, 16, 1, 1)

    torch.manual_seed(0)
    anystory = AnyStoryModel(None, AnyStoryReduxEncoder(16, 32, 4, output_size=9).eval(),
                             AnyStoryReduxEncoder(16, 32, 4, output_size=3).eval(), clip)
    image, mask = torch.rand(1, 48, 40, 3), torch.zeros(1, 48, 40)
    mask[..., :20] = 1  # the subject: the left half
    vae = RecordingVAE()
    s = encode_subject(anystory, vae, image, mask, reference_size=64, strength=0.5)
    assert torch.equal(vae.pixels[0, :, 32:], torch.full((64, 32, 3), 0.5))
    assert s.redux.shape == (1, 81, 32) and s.router.shape == (1, 9, 32) and s.strength == 0.5
    windows = s.redux.view(9, 9, 32).abs().sum(-1)
    assert (windows[:, :4] > 0).all() and (windows[:, 5:] == 0).all()
    assert s.ref_latents.shape == (1, 16, 64)
    assert torch.equal(s.ref_mask.view(4, 4), torch.tensor([[True, True, False, False]] * 4))
    assert s.ref_ids[:, 2].min() == -4 and s.ref_ids[:, 2].max() == -1
    with pytest.raises(InvalidInputError, match="mask is empty"):
        encode_subject(anystory, vae, image, torch.zeros(1, 48, 40), reference_size=64)
