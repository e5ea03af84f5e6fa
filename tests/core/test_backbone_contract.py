"""The backbone contract (``anystory/pipeline_mixin.py``), held by SDXL and FLUX alike: one test per guarantee,
parametrised over both tiny pipelines (random weights: every code path, no trained model).

- no subject: the pipeline is its diffusers parent, bit for bit;
- a subject routed nowhere changes nothing (FLUX: under ``confine_subjects``; the release's default attention
  lets the shared text tokens carry it, which is asserted too);
- a batch gives, image by image, what single calls with the same latents give (a tie included);
- ``unload_anystory`` gives back the diffusers pipeline, bit for bit, and loading works again after it;
- IP-Adapter and AnyStory refuse each other;
- ``Subject(region=...)`` confines a subject's routing to its region (the learned router still decides inside);
- bad input is an ``InvalidInputError`` naming the problem, and leaves the pipeline usable;
- the per-call conditioning is immutable, the call state is exposed under the same names, and a call starts and
  ends through the mixin's ``start_anystory_call`` on both backbones.

Backbone-specific details stay with their backbone (``tests/sdxl``, ``tests/flux``): equality with diffusers
under guidance and negative prompts, the release formulation, FLUX's one-subject router and release inputs.
"""
import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusionXLPipeline

from anystory import Subject
from anystory.errors import AnyStoryConflictError, InvalidInputError
from anystory.flux.tiny_flux import random_released_state_dict, tiny_flux_components, tiny_redux_base
from anystory.regions import region_pixels
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components
from helpers.flux_pipe import CALL as FLUX_CALL
from helpers.flux_pipe import make_pipe, subject_image
from helpers.routing import noise_image, routed_outside, tiny_pipe

PROMPTS = ["a red striped star and a blue dotted moon on sand", "two toys on a wooden table"]
LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)  # aligned with every layer's grid


@dataclass
class Backbone:
    name: str
    make: Callable  # () -> the AnyStory pipeline, weights attached
    bare: Callable  # () -> diffusers' own pipeline on the same components
    attach: Callable  # (pipe) -> attach AnyStory weights again
    subject: Callable  # (seed, **kw) -> Subject
    call: dict  # settings of every call
    subject_call: dict  # settings of the calls with subjects
    nowhere: dict  # settings under which a subject routed nowhere changes nothing
    unconfined_leaks: bool  # without ``nowhere``, a subject routed nowhere still reaches the image
    leftovers: Callable  # (pipe) -> AnyStory modules still there after unloading

    def run(self, pipe, prompt=PROMPTS[0], subjects=(), **kw):
        settings = {**self.call, **(self.subject_call if subjects else {}), **kw}
        return pipe(prompt, subjects=list(subjects), generator=torch.Generator().manual_seed(0), **settings)

    def latents(self, pipe, batch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(3)
        if self.name == "sdxl":
            side = pipe.default_sample_size
            return torch.randn(batch, pipe.unet.config.in_channels, side, side, generator=gen)
        cell = 2 * pipe.vae_scale_factor
        tokens = (self.call["height"] // cell) * (self.call["width"] // cell)
        return torch.randn(batch, tokens, pipe.transformer.config.in_channels, generator=gen)


def _sdxl_bare():
    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed=0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sdxl_attach(pipe):
    torch.manual_seed(0)
    pipe.init_anystory(**TINY_ANYSTORY_CONFIG)


def _flux_bare():
    pipe = FluxPipeline(**tiny_flux_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_attach(pipe):
    pipe.load_anystory_weights(random_released_state_dict(pipe.transformer, seed=0), redux_base=tiny_redux_base())


def _flux_leftovers(pipe):
    adapters = [a for a in ("anystory_ref", "anystory_router") if a in getattr(pipe.transformer, "peft_config", {})]
    return adapters + [m for m in ("redux_embedder", "router_embedder") if getattr(pipe, m) is not None]


BACKBONES = {
    "sdxl": Backbone("sdxl", tiny_pipe, _sdxl_bare, _sdxl_attach, lambda seed, **kw: Subject(noise_image(seed), **kw),
                     call=dict(num_inference_steps=2, output_type="np"),
                     subject_call=dict(routing_background_bias=1.0), nowhere={}, unconfined_leaks=False,
                     leftovers=lambda pipe: ["anystory"] if pipe.anystory is not None else []),
    "flux": Backbone("flux", make_pipe, _flux_bare, _flux_attach,
                     lambda seed, **kw: Subject(*subject_image(seed), **kw), call=dict(FLUX_CALL),
                     subject_call=dict(ref_start_at=0.0), nowhere=dict(confine_subjects=True), unconfined_leaks=True,
                     leftovers=_flux_leftovers),
}


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request):
    return BACKBONES[request.param]


@pytest.fixture(scope="module")
def pipe(backbone):
    return backbone.make()


@pytest.fixture(scope="module")
def bare(backbone):
    return backbone.bare()


def test_no_subject_is_the_diffusers_pipeline_bit_for_bit(backbone, pipe, bare):
    for subjects in (None, []):
        got = pipe(PROMPTS[0], subjects=subjects, generator=torch.Generator().manual_seed(0), **backbone.call).images
        expected = bare(PROMPTS[0], generator=torch.Generator().manual_seed(0), **backbone.call).images
        assert np.array_equal(got, expected)


def test_a_subject_routed_nowhere_changes_nothing(backbone, pipe):
    """Override: subject 0 everywhere routed, subject 1 nowhere. Any reference of subject 1 gives the same image;
    swapping subject 0 changes it."""
    maps = torch.zeros(3, 8, 8)
    maps[0] = 1
    a, b = backbone.subject(1), backbone.subject(2)
    pipe.set_routing_override(maps)
    try:
        confined = backbone.run(pipe, subjects=[a, b], **backbone.nowhere).images
        swapped = backbone.run(pipe, subjects=[a, backbone.subject(3, scale=2.0)], **backbone.nowhere).images
        assert np.array_equal(confined, swapped), "subject 1, routed nowhere, changed the image"
        moved = backbone.run(pipe, subjects=[backbone.subject(7), b], **backbone.nowhere).images
        assert np.abs(confined - moved).max() > 1e-3, "subject 0 (routed) must change the image"
        if backbone.unconfined_leaks:  # FLUX's release attention: the shared text tokens carry subject 1
            assert np.abs(backbone.run(pipe, subjects=[a, b]).images
                          - backbone.run(pipe, subjects=[a, backbone.subject(3, scale=2.0)]).images).max() > 1e-6
    finally:
        pipe.set_routing_override(None)


@pytest.mark.parametrize("seeds", [(1, 2), (1, 1)], ids=["two-subjects", "identical-subjects-tie"])
def test_a_batch_equals_single_calls(backbone, pipe, seeds):
    """Routing does not depend on the batch (a deterministic float32 decision with a tie rule): image by image,
    a batch gives what single calls with the same latents give."""
    subjects = [backbone.subject(s) for s in seeds]
    latents = backbone.latents(pipe, 2)

    def run(prompt, lat, **kw):
        return backbone.run(pipe, prompt, subjects, latents=lat, **kw).images

    singles = [run(PROMPTS[i], latents[i:i + 1])[0] for i in range(2)]
    same = run(PROMPTS[0], latents, num_images_per_prompt=2)
    assert np.abs(same[0] - singles[0]).max() <= 1e-4
    assert np.abs(same[1] - run(PROMPTS[0], latents[1:])[0]).max() <= 1e-4
    batch = run(PROMPTS, latents)
    for i in range(2):
        assert np.abs(batch[i] - singles[i]).max() <= 1e-4


def test_regions_confine_each_subject(backbone, pipe):
    """Unconstrained, subject 0 goes right too; with regions, every recorded map of every step keeps each subject
    inside its box, the learned router still sending it somewhere inside, and the image differs from the
    unconstrained call's."""
    free = backbone.run(pipe, subjects=[backbone.subject(1), backbone.subject(2)], return_routing_maps=True)
    assert routed_outside(free.routing_maps, 0, LEFT) > 0.1, "unconstrained, subject 0 goes right too"
    boxed = [backbone.subject(1, region=LEFT), backbone.subject(2, region=RIGHT)]
    out = backbone.run(pipe, subjects=boxed, return_routing_maps=True)
    assert routed_outside(out.routing_maps, 0, LEFT) == 0 and routed_outside(out.routing_maps, 1, RIGHT) == 0
    assert float(out.routing_maps[-1][:, 0].max()) > 0 and float(out.routing_maps[-1][:, 1].max()) > 0
    assert np.abs(out.images - free.images).max() > 1e-6


def test_bad_input_is_an_invalid_input_error_and_changes_nothing(backbone, pipe):
    side = backbone.call.get("height") or pipe.default_sample_size * pipe.vae_scale_factor
    mask = region_pixels(LEFT, side, side, "s").astype(np.uint8) * 255
    cases = [
        (lambda: backbone.run(pipe, subjects=[backbone.subject(1, region=mask[:, :-8])]), "does not match the output"),
        (lambda: backbone.run(pipe, subjects=[backbone.subject(1, scale=11)]), "scale"),
        (lambda: backbone.run(pipe, subjects=[backbone.subject(1)] * (pipe.max_subjects + 1)), "Too many subjects"),
    ]
    for call, words in cases:
        with pytest.raises(InvalidInputError, match=words):
            call()
    for maps, words in ((torch.ones(3, 4, 4), r"must be \[N\+1=2, H, W\]"),
                        (torch.full((2, 4, 4), float("nan")), "NaN or infinite")):
        pipe.set_routing_override(maps)
        try:
            with pytest.raises(InvalidInputError, match=words):
                backbone.run(pipe, subjects=[backbone.subject(1)])
        finally:
            pipe.set_routing_override(None)
    assert not pipe.anystory_state.active  # nothing of a refused call stays conditioned
    first = backbone.run(pipe, subjects=[backbone.subject(1)]).images
    assert np.array_equal(first, backbone.run(pipe, subjects=[backbone.subject(1)]).images)


def test_the_call_state_and_its_immutable_conditioning(backbone, pipe):
    """Both pipelines build the call's conditioning with ``conditioning_inputs`` (a frozen dataclass) and expose
    the running call's state as ``anystory_state``, whose ``conditioning`` is that object."""
    seen = []

    def spy(p, i, t, tensors):
        seen.append(p.anystory_state.conditioning)
        return {}

    backbone.run(pipe, subjects=[backbone.subject(1)], callback_on_step_end=spy)
    conditioning = seen[0]
    assert dataclasses.is_dataclass(conditioning) and all(c is conditioning for c in seen)
    assert conditioning.num_subjects == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        conditioning.num_subjects = 2
    assert not pipe.anystory_state.active  # the call ended: nothing conditioned


def test_a_call_starts_and_ends_through_the_mixins_start(backbone, pipe, monkeypatch):
    """Both pipelines start and end a call with the mixin's ``start_anystory_call`` (declared abstract there): the
    pipeline's own call brackets the denoiser with it, and a caller running the denoiser itself (a trainer, a
    benchmark) gets the started state back, exposed as ``anystory_state``, and ends it with no argument."""
    from anystory.pipeline_mixin import AnyStoryPipelineMixin

    assert "start_anystory_call" in AnyStoryPipelineMixin.__abstractmethods__
    started, start = [], pipe.start_anystory_call
    monkeypatch.setattr(pipe, "start_anystory_call", lambda c=None: started.append(c) or start(c))
    backbone.run(pipe, subjects=[backbone.subject(1)])
    conditioning = started[0]
    assert dataclasses.is_dataclass(conditioning) and started[1:] == [None]  # started once, ended once
    state = pipe.start_anystory_call(conditioning)
    assert state is pipe.anystory_state and state.conditioning is conditioning and state.active
    assert state.num_subjects == conditioning.num_subjects == 1
    pipe.start_anystory_call()
    assert not pipe.anystory_state.active


def test_unload_gives_back_the_diffusers_pipeline(backbone, bare):
    pipe = backbone.make()
    denoiser = bare.unet if backbone.name == "sdxl" else bare.transformer
    processors = {k: type(v) for k, v in denoiser.attn_processors.items()}
    backbone.run(pipe, subjects=[backbone.subject(1)])  # a call with a subject leaves nothing behind
    pipe.unload_anystory()
    assert not pipe.anystory_loaded and backbone.leftovers(pipe) == []
    assert {k: type(v) for k, v in pipe._anystory_denoiser.attn_processors.items()} == processors
    expected = bare(PROMPTS[0], generator=torch.Generator().manual_seed(3), **backbone.call).images
    assert np.array_equal(pipe(PROMPTS[0], generator=torch.Generator().manual_seed(3), **backbone.call).images,
                          expected)
    with pytest.raises(ValueError, match="no AnyStory weights are loaded"):
        backbone.run(pipe, subjects=[backbone.subject(1)])
    backbone.attach(pipe)  # attaches again after an unload
    assert np.abs(backbone.run(pipe, subjects=[backbone.subject(1)]).images - backbone.run(pipe).images).max() > 1e-4


def test_ip_adapter_and_anystory_refuse_each_other(backbone, tmp_path):
    pipe = backbone.make()
    for call in (lambda: pipe.load_ip_adapter("h94/IP-Adapter", subfolder="sdxl_models", weight_name="x.bin"),
                 pipe.unload_ip_adapter, lambda: pipe.set_ip_adapter_scale(0.5)):
        with pytest.raises(AnyStoryConflictError, match="IP-Adapter and AnyStory.*unload_anystory"):
            call()
    assert pipe.image_encoder is not None  # diffusers' unload_ip_adapter would have dropped it
    if backbone.name == "sdxl":
        pipe.save_anystory_weights(str(tmp_path / "w"))
    pipe.unload_anystory()
    denoiser = pipe._anystory_denoiser
    denoiser.encoder_hid_proj = torch.nn.Identity()  # what load_ip_adapter leaves on the denoiser
    denoiser.config.encoder_hid_dim_type = "ip_image_proj"  # as diffusers' load_ip_adapter sets it
    with pytest.raises(AnyStoryConflictError, match="an IP-Adapter is loaded.*unload_ip_adapter"):
        backbone.attach(pipe)
    if backbone.name == "sdxl":  # its saved weights too, not only fresh modules
        with pytest.raises(AnyStoryConflictError, match="an IP-Adapter is loaded"):
            pipe.load_anystory_weights(str(tmp_path / "w"))
    assert not pipe.anystory_loaded and backbone.leftovers(pipe) == []
