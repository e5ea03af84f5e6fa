"""The node pack on ComfyUI's own FLUX equals our diffusers FLUX transformer with AnyStory (one model evaluation,
float32, relative error <= 1e-4) for 0, 1 and 2 subjects with the router on and off; with no subject the patched
ComfyUI model is ComfyUI's unpatched one to the bit. Tiny random weights, converted between the two layouts."""
import os
import sys

import pytest
import torch

if __name__ == "__main__":  # run as a script: the repository and tests/ on the path, as tests/conftest.py does
    _TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

from helpers.comfy import TINY_UNET, comfy_flux, import_comfy

comfy = import_comfy()

from anystory.flux.tiny_flux import (TINY_REFERENCE_SIZE, random_released_state_dict,  # noqa: E402
                                     tiny_flux_components, tiny_redux_base)
from comfyui_anystory.conditioning import EncodedSubject, Settings, SubjectSet, run_conditioning  # noqa: E402
from comfyui_anystory.flux_keys import comfy_to_diffusers, diffusers_to_comfy  # noqa: E402
from comfyui_anystory.patch import AnyStoryFluxPatch  # noqa: E402
from comfyui_anystory.weights import resolve_for_model  # noqa: E402

GRID = (8, 8)  # image tokens: a 16x16 latent of 4 channels
STEPS, TEXT = 10, 7
SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)


def build_models():
    """Our diffusers pipeline with random released weights, and ComfyUI's FLUX holding the same base weights."""
    from anystory.flux.pipeline_flux import AnyStoryFluxPipeline

    components = tiny_flux_components(seed=3, single_blocks=2)
    base = {k: v.clone() for k, v in components["transformer"].state_dict().items()}
    pipe = AnyStoryFluxPipeline(**components, reference_size=TINY_REFERENCE_SIZE)
    released = random_released_state_dict(pipe.transformer, seed=3, lora_bias=True)
    pipe.load_anystory_weights(released, redux_base=tiny_redux_base())
    return pipe, comfy_flux(diffusers_to_comfy(base, TINY_UNET)), released, base


@pytest.fixture(scope="module")
def models():
    return build_models()


def subjects(n, boxes=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref_ids = torch.zeros(8, 8, 3)
    ref_ids[..., 1] = torch.arange(8)[:, None]
    ref_ids[..., 2] = torch.arange(8)[None] - 8
    out = SubjectSet()
    for i in range(n):
        out = out.plus(EncodedSubject(
            redux=torch.randn(1, 81, 32, generator=g), router=torch.randn(1, 9, 32, generator=g),
            ref_latents=torch.randn(1, 64, 16, generator=g), ref_ids=ref_ids.flatten(0, 1),
            ref_mask=torch.rand(64, generator=g) > 0.3, strength=1.0 + 0.5 * i, reference_strength=1.0 - 0.3 * i,
            region=((0.0, 0.0, 0.6, 1.0) if i == 0 else (0.4, 0.0, 1.0, 1.0)) if boxes else None))
    return out


def inputs(batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    return x, torch.randn(batch, TEXT, 32, generator=g), torch.randn(batch, 32, generator=g)


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def comfy_eval(patcher, x, context, y, step, **kwargs):
    options = dict(patcher.model_options["transformer_options"])
    options.update(wrappers=patcher.wrappers, sample_sigmas=SIGMAS, sigmas=SIGMAS[step:step + 1])
    sigma = SIGMAS[step].expand(x.shape[0])
    with torch.no_grad():
        return patcher.model.diffusion_model(x, sigma, context, y=y, guidance=torch.full_like(sigma, 3.5),
                                             transformer_options=options, **kwargs)


def diffusers_eval(pipe, subject_set, settings, x, context, y, step):
    state = pipe.anystory_state
    if subject_set.subjects:
        state.start(run_conditioning(subject_set, settings, STEPS, GRID))
        state.step = step
    ids = torch.zeros(GRID[0], GRID[1], 3)
    ids[..., 1] = torch.arange(GRID[0])[:, None]
    ids[..., 2] = torch.arange(GRID[1])[None]
    sigma = SIGMAS[step].expand(x.shape[0])
    try:
        with torch.no_grad():
            return pipe.transformer(hidden_states=pack(x), encoder_hidden_states=context, pooled_projections=y,
                                    timestep=sigma, img_ids=ids.flatten(0, 1), txt_ids=torch.zeros(TEXT, 3),
                                    guidance=torch.full_like(sigma, 3.5), return_dict=False)[0]
    finally:
        state.clear()


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_conversion_both_ways(models):
    """diffusers -> ComfyUI -> diffusers and ComfyUI -> diffusers -> ComfyUI give the tensors back exactly, and
    the fused ComfyUI tensors hold the diffusers ones in ComfyUI's row order."""
    _, patcher, _, base = models
    comfy_sd = diffusers_to_comfy(base, TINY_UNET)
    back = comfy_to_diffusers(comfy_sd, TINY_UNET)
    assert back.keys() == base.keys() and all(torch.equal(back[k], base[k]) for k in base)
    live = patcher.model.diffusion_model.state_dict()
    again = diffusers_to_comfy(comfy_to_diffusers(live, TINY_UNET), TINY_UNET)
    assert again.keys() == live.keys() and all(torch.equal(again[k], live[k]) for k in live)
    qkv = comfy_sd["double_blocks.0.img_attn.qkv.weight"]
    assert torch.equal(qkv[32:64], base["transformer_blocks.0.attn.to_k.weight"])
    shift, scale = comfy_sd["final_layer.adaLN_modulation.1.weight"].chunk(2)
    assert torch.equal(scale, base["norm_out.linear.weight"][:32])  # diffusers keeps (scale, shift)
    with pytest.raises(KeyError, match="no ComfyUI counterpart"):
        diffusers_to_comfy({**base, "transformer_blocks.0.attn.extra.weight": qkv}, TINY_UNET)


CASES = [(0, None, False, 1), (1, False, False, 1), (1, True, False, 1), (1, None, True, 1),
         (2, False, False, 1), (2, True, False, 1), (2, True, True, 1), (2, True, False, 5)]


def evaluate_both(models, n, router, boxes, step):
    """(ComfyUI patched, diffusers) outputs of one model evaluation, packed alike, and the patch."""
    pipe, patcher, released, _ = models
    settings = Settings(use_router=router, ref_start=0.0)
    subject_set = subjects(n, boxes)
    patch = AnyStoryFluxPatch(resolve_for_model(released, TINY_UNET, 16), subject_set, settings)
    x, context, y = inputs(batch=2)
    got = pack(comfy_eval(patch.apply_to(patcher), x, context, y, step))
    return got, diffusers_eval(pipe, subject_set, settings, x, context, y, step), patch


@pytest.mark.parametrize("n,router,boxes,step", CASES)
def test_patched_comfy_equals_diffusers(models, n, router, boxes, step):
    """Step 1 of 10: redux tokens, reference and (router on) routing all act; step 5: reference and routing. A box
    turns the router on for one subject too (router None: the default)."""
    got, want, patch = evaluate_both(models, n, router, boxes, step)
    assert relative(got, want) <= 1e-4
    if n:
        assert patch.state.ref_passes == 1
        x, context, y = inputs(batch=2)
        plain = diffusers_eval(models[0], SubjectSet(), Settings(), x, context, y, step)
        assert relative(got, plain) > 1e-3  # the subjects act
        if router:
            assert len(patch.maps) == 1 and patch.maps[0].shape == (2, n + 1, *GRID)
        patch.new_run()  # ComfyUI's pre-run callback: a new run computes its own reference and maps
        assert torch.equal(pack(comfy_eval(patch.apply_to(models[1]), x, context, y, step)), got)
        assert patch.state.ref_passes == 2 and len(patch.maps) == 1


def test_no_subject_is_comfyui_to_the_bit(models):
    _, patcher, released, _ = models
    patch = AnyStoryFluxPatch(resolve_for_model(released, TINY_UNET, 16), SubjectSet(), Settings())
    x, context, y = inputs(batch=2, seed=4)
    for step in (0, 1, 5):
        assert torch.equal(comfy_eval(patch.apply_to(patcher), x, context, y, step),
                           comfy_eval(patcher, x, context, y, step))


def test_inputs_it_cannot_honour_are_refused(models):
    """Kontext-style reference latents and a conditioning attention mask would be silently dropped: refused."""
    _, patcher, released, _ = models
    patched = AnyStoryFluxPatch(resolve_for_model(released, TINY_UNET, 16), subjects(1), Settings()).apply_to(patcher)
    x, context, y = inputs()
    with pytest.raises(ValueError, match="reference latents"):
        comfy_eval(patched, x, context, y, 1, ref_latents=[x])
    with pytest.raises(ValueError, match="attention mask"):
        comfy_eval(patched, x, context, y, 1, attention_mask=torch.ones(1, TEXT + 64))


def test_bfloat16_model_runs_close_to_float32(models):
    """A bf16 ComfyUI model (its compute dtype then bf16 throughout: LoRA terms, reference cache, bias) gives
    finite output within bf16's rounding of the float32 one, two subjects routed in a box layout."""
    _, patcher, released, base = models
    half = comfy_flux(diffusers_to_comfy(base, TINY_UNET), dtype=torch.bfloat16)
    x, context, y = inputs(batch=2)
    outs = []
    for model, dtype in ((patcher, torch.float32), (half, torch.bfloat16)):
        patch = AnyStoryFluxPatch(resolve_for_model(released, TINY_UNET, 16), subjects(2, True), Settings())
        out = comfy_eval(patch.apply_to(model), x.to(dtype), context.to(dtype), y.to(dtype), 1)
        assert out.dtype == dtype and torch.isfinite(out).all()
        outs.append(out.float())
    assert relative(outs[1], outs[0]) < 0.05


if __name__ == "__main__":  # the table of docs/comfyui.md: python tests/comfyui/test_comfy_flux_equality.py
    torch.set_num_threads(2)
    built = build_models()
    print("| subjects | router | boxes | step | max relative error |\n| --- | --- | --- | --- | --- |")
    for case in CASES:
        got, want, _ = evaluate_both(built, *case)
        print("| {} | {} | {} | {} | {:.1e} |".format(*case, relative(got, want)))
