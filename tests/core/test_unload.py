"""unload_anystory() gives back diffusers' pipeline bit for bit; IP-Adapter and AnyStory refuse each other."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from anystory import AnyStorySDXLPipeline, Subject
from anystory.pipeline_mixin import AnyStoryConflictError
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components

PROMPT = "a red striped star on sand"


def _call(pipe, **kw):
    return pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


@pytest.fixture
def pipes():
    bare = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=0))
    ours = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0))
    for p in (bare, ours):
        p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    ours.init_anystory(**TINY_ANYSTORY_CONFIG)
    return bare, ours


def test_unload_restores_diffusers_processors_and_output_bit_for_bit(pipes):
    bare, ours = pipes
    diffusers_procs = {k: type(v) for k, v in bare.unet.attn_processors.items()}
    subject = Subject(np.random.RandomState(1).randint(0, 255, (40, 48, 3)).astype(np.uint8))
    _call(ours, subjects=[subject])  # a call with a subject leaves nothing behind after unloading
    ours.unload_anystory()
    assert not ours.anystory_loaded and ours.anystory is None
    assert {k: type(v) for k, v in ours.unet.attn_processors.items()} == diffusers_procs
    assert np.array_equal(_call(ours), _call(bare))
    with pytest.raises(ValueError, match="no AnyStory weights are loaded"):
        _call(ours, subjects=[subject])
    torch.manual_seed(0)
    ours.init_anystory(**TINY_ANYSTORY_CONFIG)  # attaches again after an unload
    assert np.abs(_call(ours, subjects=[subject]) - _call(ours)).max() > 1e-4


def test_ip_adapter_methods_refuse_while_anystory_is_attached(pipes):
    _, ours = pipes
    for call in (lambda: ours.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="x.bin"),
                 ours.unload_ip_adapter, lambda: ours.set_ip_adapter_scale(0.5)):
        with pytest.raises(AnyStoryConflictError, match="IP-Adapter and AnyStory.*unload_anystory"):
            call()
    assert ours.image_encoder is not None  # diffusers' unload_ip_adapter would have dropped it


def test_anystory_refuses_a_pipeline_with_an_ip_adapter(pipes, tmp_path):
    _, ours = pipes
    weights = str(tmp_path / "w")
    ours.save_anystory_weights(weights)
    ours.unload_anystory()
    ours.unet.encoder_hid_proj = torch.nn.Identity()  # what load_ip_adapter leaves on the UNet
    ours.unet.config.encoder_hid_dim_type = "ip_image_proj"
    with pytest.raises(AnyStoryConflictError, match="an IP-Adapter is loaded.*unload_ip_adapter"):
        ours.init_anystory(**TINY_ANYSTORY_CONFIG)
    with pytest.raises(AnyStoryConflictError, match="an IP-Adapter is loaded"):
        ours.load_anystory_weights(weights)
    assert not ours.anystory_loaded


def test_flux_unload_restores_diffusers_output_bit_for_bit():
    from diffusers import FluxPipeline

    from anystory.flux.tiny_flux import tiny_anystory_flux_pipeline, tiny_flux_components

    call = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")
    bare = FluxPipeline(**tiny_flux_components(0))
    ours = tiny_anystory_flux_pipeline(0)
    for p in (bare, ours):
        p.set_progress_bar_config(disable=True)
    diffusers_procs = {k: type(v) for k, v in bare.transformer.attn_processors.items()}
    mask = np.zeros((40, 48), np.uint8)
    mask[8:32, 8:40] = 255
    subject = Subject(np.random.RandomState(1).randint(0, 255, (40, 48, 3)).astype(np.uint8), mask=mask)
    ours(PROMPT, subjects=[subject], generator=torch.Generator().manual_seed(0), **call)
    with pytest.raises(AnyStoryConflictError, match="IP-Adapter and AnyStory"):
        ours.unload_ip_adapter()
    ours.unload_anystory()
    assert not ours.anystory_loaded and ours.redux_embedder is None
    assert {k: type(v) for k, v in ours.transformer.attn_processors.items()} == diffusers_procs
    assert not any(a in getattr(ours.transformer, "peft_config", {}) for a in ("anystory_ref", "anystory_router"))
    expected = bare(PROMPT, generator=torch.Generator().manual_seed(3), **call).images
    assert np.array_equal(ours(PROMPT, generator=torch.Generator().manual_seed(3), **call).images, expected)
