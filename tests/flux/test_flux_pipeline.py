"""AnyStoryFluxPipeline on tiny FLUX components: diffusers equality, reference caching, routing, bad input."""
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from anystory import MAX_SUBJECTS, Subject, prepare_subjects
from anystory.flux import AnyStoryFluxPipeline
from anystory.flux.attention_processor_flux import attention_bias
from anystory.flux.conditioning_flux import StepPlan
from anystory.flux.tiny_flux import random_released_state_dict, tiny_flux_components, tiny_redux_base
from helpers.flux_pipe import CALL, PROMPT, gen, make_pipe, subject_image, subjects

N_LAYERS = 2  # tiny transformer: one double + one single block


@pytest.fixture(scope="module")
def pipe():
    """One loaded tiny pipeline for the tests that only call it (a call leaves no state behind)."""
    return make_pipe()


def test_zero_subjects_equals_diffusers_flux_pipeline():
    components = tiny_flux_components(0)
    flux = FluxPipeline(**{k: v for k, v in components.items()})
    flux.set_progress_bar_config(disable=True)
    expected = flux(PROMPT, generator=gen(3), **CALL).images

    pipe = AnyStoryFluxPipeline(**components, reference_size=32)  # same modules
    pipe.set_progress_bar_config(disable=True)
    pipe.load_anystory_weights(random_released_state_dict(pipe.transformer), redux_base=tiny_redux_base())
    out = pipe(PROMPT, subjects=[], generator=gen(3), return_routing_maps=True, **CALL)
    assert np.abs(out.images - expected).max() <= 1e-6
    assert out.routing_maps == []
    with_subject = pipe(PROMPT, subjects=subjects(1), generator=gen(3), **CALL).images
    assert np.abs(with_subject - expected).max() > 1e-3  # the subject does condition the image
    again = pipe(PROMPT, generator=gen(3), **CALL).images  # nothing of the last call is left behind
    assert np.abs(again - expected).max() <= 1e-6


def test_reference_keys_values_computed_once_per_subject_per_call(pipe, monkeypatch):
    calls = []

    def count(module, args, kwargs):
        calls.append((kwargs["hidden_states"].shape[0], kwargs["encoder_hidden_states"].shape[1],
                      pipe.anystory_state.in_ref_pass))

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    try:
        reads, state = [], pipe.anystory_state
        dense, sparse = state.ref_kv_for, state.ref_columns_for  # the sparse form reads the cache laid out
        monkeypatch.setattr(state, "ref_kv_for", lambda layer, batch: reads.append(layer) or dense(layer, batch))
        monkeypatch.setattr(state, "ref_columns_for",
                            lambda layer, batch, dtype: reads.append(layer) or sparse(layer, batch, dtype))
        steps, passes = CALL["num_inference_steps"], pipe.anystory_state.ref_passes
        for n, images_per_prompt in ((2, 1), (3, 2)):
            calls.clear(), reads.clear()
            before = pipe.anystory_state.ref_kv_writes
            pipe(PROMPT, subjects=subjects(n), num_images_per_prompt=images_per_prompt, generator=gen(), **CALL)
            reference = [c for c in calls if c[2]]
            denoise = [c for c in calls if not c[2]]
            # one reference pass, one batch row per subject (not per image), no text tokens
            assert reference == [(n, 0, True)]
            assert len(denoise) == steps and all(c[0] == images_per_prompt for c in denoise)
            assert pipe.anystory_state.ref_kv_writes - before == N_LAYERS
            # every later step reads the cache: each layer, each step with the reference on
            assert sorted(reads) == sorted(list(range(N_LAYERS)) * steps)
    finally:
        handle.remove()
    assert pipe.anystory_state.ref_passes - passes == 2  # one per call
    assert pipe.anystory_state.ref_kv == {} and pipe.anystory_state.ref_columns == {}  # freed after the call


def test_routing_maps_one_hot_per_layer_and_per_step_shares(pipe, monkeypatch):
    layer_maps = []
    record = pipe.anystory_state.record
    monkeypatch.setattr(pipe.anystory_state, "record", lambda maps: layer_maps.append(maps.clone()) or record(maps))
    n = 3
    out = pipe(PROMPT, subjects=subjects(n), generator=gen(), return_routing_maps=True, **CALL)
    steps = CALL["num_inference_steps"]
    assert len(layer_maps) == steps * N_LAYERS  # the router runs in every block of every conditioned step
    for m in layer_maps:
        assert m.shape == (1, n, 64)
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(m.sum(dim=1), torch.ones(1, 64))  # exactly one subject per image token
    assert len(out.routing_maps) == steps
    for step in out.routing_maps:
        assert step.shape == (1, n + 1, 8, 8)
        assert torch.allclose(step.sum(dim=1), torch.ones(1, 8, 8))
        assert torch.all(step[:, n] == 0)  # the learned router never sends a token to no subject
        assert set((step[:, :n] * N_LAYERS).round().unique().tolist()) <= set(range(N_LAYERS + 1))


def test_single_subject_has_no_router_and_reports_it_everywhere(pipe, monkeypatch):
    routed = []
    monkeypatch.setattr(pipe.anystory_state, "record", lambda maps: routed.append(maps))
    out = pipe(PROMPT, subjects=subjects(1), generator=gen(), return_routing_maps=True, **CALL)
    assert routed == []
    assert all(torch.equal(m, torch.cat([torch.ones(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)], 1))
               for m in out.routing_maps)


def test_router_tokens_reuse_the_blocks_work():
    """In a routed step each block's modulation linear runs once (the block's own call; the router adds its LoRA
    delta to that output instead of running the linear again), the router tokens' query/key/value rows ride the
    block's own projections (one call per step; two under ``confine_subjects``, which keeps the block's products
    apart), no processor holds its block, and the last block spends nothing on router tokens that nothing reads
    after it (its MLP runs for the block alone)."""
    pipe = make_pipe(single_blocks=2)  # a single block before the last one, as in FLUX.1-dev
    t, state = pipe.transformer, pipe.anystory_state
    blocks = list(t.transformer_blocks) + list(t.single_transformer_blocks)
    runs = {}

    def counter(name):
        def count(module, args, out):
            if not state.in_ref_pass:
                runs[name] = runs.get(name, 0) + 1
        return count

    watched = {f"modulation {i}": (b.norm1_context.linear if hasattr(b, "norm1_context") else b.norm.linear)
               for i, b in enumerate(blocks)}
    watched.update({"last mlp": blocks[-1].proj_mlp, "first mlp": blocks[0].ff_context,
                    "single mlp": blocks[-2].proj_mlp, "double query": blocks[0].attn.add_q_proj,
                    "single query": blocks[-2].attn.to_q, "last key": blocks[-1].attn.to_k})
    handles = [m.register_forward_hook(counter(name)) for name, m in watched.items()]
    steps = CALL["num_inference_steps"]
    try:
        pipe(PROMPT, subjects=subjects(2), generator=gen(), ref_start_at=0.0, **CALL)
        assert {name: runs[name] for name in watched if name.startswith("modulation")} == \
            {name: steps for name in watched if name.startswith("modulation")}
        assert runs["last mlp"] == steps  # the block's tokens only
        assert runs["first mlp"] == runs["single mlp"] == 2 * steps  # the block's tokens, the router's update
        assert runs["double query"] == runs["single query"] == runs["last key"] == steps  # router rows ride
        runs.clear()
        pipe(PROMPT, subjects=subjects(2), generator=gen(), ref_start_at=0.0, confine_subjects=True, **CALL)
        assert runs["double query"] == runs["single query"] == 2 * steps
    finally:
        for h in handles:
            h.remove()
    for block in blocks:
        held = [x for v in vars(block.attn.processor).values() for x in (v if isinstance(v, tuple) else (v,))]
        assert not any(x is block for x in held)


def test_routing_masks_confine_image_tokens_to_their_subject():
    """The attention bias the processors use: image token j sees subject i's redux/reference tokens iff routed."""
    class S:
        num_subjects, txt_len, redux_len, img_len, confine = 2, 5 + 2 * 3, 2 * 3, 4, False
        ref_bias = torch.tensor([0.0, -100.0, 0.0, 0.0])  # 2 reference tokens per subject

    maps = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])  # tokens 0,1 -> s0; 2,3 -> s1
    bias = attention_bias(S, StepPlan(True, True, True), maps, 1, torch.float32, "cpu")[0, 0]
    img, redux, ref = bias[11:15], bias[11:15, 5:11], bias[11:15, 15:]
    assert bias.shape == (15, 19)
    assert torch.equal(redux[:2, 3:], torch.full((2, 3), float("-inf"))) and torch.all(redux[:2, :3] == 0)
    assert torch.equal(redux[2:, :3], torch.full((2, 3), float("-inf"))) and torch.all(redux[2:, 3:] == 0)
    assert torch.equal(ref[:2], torch.tensor([[0.0, -100.0, float("-inf"), float("-inf")]] * 2))
    assert torch.equal(ref[2:], torch.tensor([[float("-inf"), float("-inf"), 0.0, 0.0]] * 2))
    assert torch.all(img[:, :5] == 0) and torch.all(img[:, 11:15] == 0)  # text and image keys stay open
    assert torch.all(bias[:11, 15:] == torch.tensor([0.0, -100.0, 0.0, 0.0]))  # text/redux rows: mask only
    S.confine = True
    confined = attention_bias(S, StepPlan(True, True, True), maps, 1, torch.float32, "cpu")[0, 0]
    assert torch.all(confined[:5, 5:11] == float("-inf")) and torch.all(confined[:5, 15:] == float("-inf"))
    assert torch.all(confined[5:8, 8:11] == float("-inf")) and torch.all(confined[5:8, 17:] == float("-inf"))
    assert torch.all(torch.isfinite(confined[5:8, 5:8])) and torch.isfinite(confined[5:8, 15]).all()


def test_more_than_two_subjects(pipe):
    n = MAX_SUBJECTS
    four = subjects(n)
    out = pipe(PROMPT, subjects=four, generator=gen(), return_routing_maps=True, **CALL)
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    assert all(m.shape == (1, n + 1, 8, 8) and torch.allclose(m.sum(1), torch.ones(1, 8, 8)) for m in out.routing_maps)
    # the fourth subject takes part: another image in its place changes the result
    other = pipe(PROMPT, subjects=four[:3] + [Subject(*subject_image(9))], generator=gen(), **CALL).images
    assert np.abs(out.images - other).max() > 1e-6


def test_enable_model_cpu_offload():
    """On this CPU-only machine offloading targets the CPU: the accelerate hooks run, outputs are unchanged."""
    expected = make_pipe()(PROMPT, subjects=subjects(2), generator=gen(), **CALL).images
    pipe = make_pipe(load=False)
    pipe.enable_model_cpu_offload(device="cpu")  # before loading, as a user may do: loading keeps it on
    pipe.load_anystory_weights(random_released_state_dict(pipe.transformer), redux_base=tiny_redux_base())
    assert len(pipe._all_hooks) == 7  # text encoders, SigLIP, both embedders, transformer, VAE
    out = pipe(PROMPT, subjects=subjects(2), generator=gen(), **CALL).images
    assert np.abs(out - expected).max() <= 1e-6


@pytest.mark.parametrize("make_bad", [
    lambda: [Subject(*subject_image(0))] * (MAX_SUBJECTS + 1),
    lambda: [Subject(subject_image(0)[0], mask=np.zeros((40, 48), dtype=bool))],
    lambda: [Subject(subject_image(0)[0], mask=np.ones((10, 10), dtype=bool))],
    lambda: [Subject(subject_image(0)[0], scale=-1)],
    lambda: [Subject(subject_image(0)[0], reference_scale=float("nan"))],
    lambda: [Subject("/no/such/file.png")],
    lambda: ["not a subject"],
])
def test_bad_subjects_rejected_as_by_the_shared_validation(make_bad, pipe):
    with pytest.raises(ValueError) as shared:
        prepare_subjects(make_bad(), MAX_SUBJECTS)
    with pytest.raises(ValueError) as ours:
        pipe(PROMPT, subjects=make_bad(), **CALL)
    assert str(ours.value) == str(shared.value)


def test_bad_call_arguments(pipe):
    two = subjects(2)
    for kwargs, message in (
        (dict(redux_scale=-0.5), "redux_scale"),
        (dict(ref_start_at=0.8, ref_end_at=0.2), "ref_start_at"),
        (dict(redux_end_at=1.5), "redux_end_at"),
        (dict(true_cfg_scale=4.0, negative_prompt="blurry"), "true CFG"),
    ):
        with pytest.raises(ValueError, match=message):
            pipe(PROMPT, subjects=two, **kwargs, **CALL)
    pipe.set_routing_override(torch.zeros(2, 8, 8))
    try:
        with pytest.raises(ValueError, match=r"routing override must be \[N\+1=3"):
            pipe(PROMPT, subjects=two, **CALL)
    finally:
        pipe.set_routing_override(None)
    with pytest.raises(ValueError, match="no AnyStory weights are loaded"):
        make_pipe(load=False)(PROMPT, subjects=two, **CALL)


def test_subject_encoding_follows_the_release(pipe):
    two = [Subject(*subject_image(0), scale=0.5, reference_scale=0.0), Subject(*subject_image(1))]
    cond = pipe.conditioning_inputs(pipe.check_subjects(two), "cpu", gen(), steps=25, grid=(8, 8))
    assert cond.redux_tokens.shape == (1, 2 * 81, 32)  # 27x27 SigLIP patches pooled to 9x9 per subject
    assert cond.router_tokens.shape == (1, 2 * 9, 32)  # ... and to 3x3 for the router
    assert cond.ref_latents.shape == (2, 64, 16)  # 32 px reference -> 16x16 latents -> 8x8 packed tokens
    ids = cond.ref_ids
    assert torch.equal(ids[:, 1], torch.arange(8).repeat_interleave(8).float())
    assert torch.equal(ids[:, 2], (torch.arange(8) - 8).repeat(8).float())  # shifted left by the reference width
    assert cond.redux_window == (3, 8) and cond.ref_window == (0, 25)  # the release's rounding of 0.1, 0.3
    bias = cond.ref_bias.view(2, 64)
    assert torch.all(bias[0] == float("-inf"))  # reference_scale 0: subject 0's reference is off
    assert set(bias[1].unique().tolist()) == {0.0, -100.0}  # -100 on reference tokens outside the mask
    tokens = cond.redux_tokens.view(2, 81, 32)
    assert (tokens[1].abs().sum(-1) == 0).any() and (tokens[1].abs().sum(-1) > 0).any()  # masked-out windows
    full = pipe.conditioning_inputs(pipe.check_subjects([Subject(*subject_image(0))]), "cpu", gen(), steps=25,
                                    grid=(8, 8))
    torch.testing.assert_close(tokens[0], full.redux_tokens[0] * 0.5)  # Subject.scale multiplies redux x 0.6


def test_gated_redux_pooling():
    from anystory.flux.redux import AnyStoryReduxEncoder

    torch.manual_seed(0)
    enc = AnyStoryReduxEncoder(redux_dim=8, txt_in_features=4, lora_rank=2, output_size=9).eval()
    feats = torch.randn(1, 729, 8)
    mask = torch.zeros(1, 27, 27)
    mask[0, :3, :6] = 1  # the first two 3x3 windows of the top row
    out = enc(feats, mask.flatten(1)[..., None])
    assert out.shape == (1, 81, 4)
    h = torch.nn.functional.silu(enc.redux_up(feats) + enc.redux_up_lora_B(enc.redux_up_lora_A(feats)))
    x = enc.redux_down(h) + enc.redux_down_lora_B(enc.redux_down_lora_A(h))
    gate = torch.sigmoid(enc.gate_proj(x)).view(27, 27)
    x = x.view(27, 27, 4)
    for j in (0, 1):
        w, g = x[:3, 3 * j:3 * j + 3].reshape(9, 4), gate[:3, 3 * j:3 * j + 3].reshape(9, 1)
        torch.testing.assert_close(out[0, j], (w * g).sum(0) / (g.sum() + 9e-6))  # gate-weighted window mean
    assert torch.all(out[0, 2:] == 0)  # windows without subject patches give no token


def test_schedule_rounding_is_the_release():
    from anystory.flux.conditioning_flux import step_window

    assert step_window(25, 0.1, 0.3) == (3, 8) and step_window(25, 0.09, 1.0) == (2, 25)
    assert step_window(4, 0.1, 0.3) == (0, 1)


def test_bfloat16_as_on_a_gpu(pipe):
    """The dtype users run (bf16): every tensor the hooks and processors create follows the model's dtype."""
    expected = pipe(PROMPT, subjects=subjects(2), generator=gen(), **CALL).images
    half = make_pipe()
    half.to(torch.bfloat16)
    out = half(PROMPT, subjects=subjects(2), generator=gen(), return_routing_maps=True, **CALL)
    assert np.isfinite(out.images).all() and np.abs(out.images - expected).max() < 0.1
    assert all(torch.allclose(m.sum(1), torch.ones(1, 8, 8)) for m in out.routing_maps)


@pytest.mark.parametrize("kind", ["double", "single"])
def test_processors_compile_without_graph_breaks(kind):
    """torch.compile(fullgraph=True) traces a block with AnyStory's processor mid-call (cached reference keys/values,
    redux tokens, router on) without a graph break, and matches eager."""
    pipe = make_pipe()
    state = pipe.anystory_state
    block = (pipe.transformer.transformer_blocks if kind == "double" else pipe.transformer.single_transformer_blocks)[0]
    captured, checked = {}, []

    def grab(module, args, kwargs):
        if not state.in_ref_pass and state.step == 0:
            captured["args"], captured["kwargs"] = args, dict(kwargs)

    def compare(p, i, t, tensors):
        if i == 0:
            assert state.plan.ref and state.plan.redux and state.plan.route and state.ref_kv
            state.step = 0
            router = state.router_hidden  # each block advances the router tokens: start both runs alike
            eager = block(*captured["args"], **captured["kwargs"])
            state.router_hidden = router
            torch._dynamo.reset()
            compiled = torch.compile(block, backend="eager", fullgraph=True)(*captured["args"], **captured["kwargs"])
            for a, b in zip(eager if isinstance(eager, tuple) else (eager,),
                            compiled if isinstance(compiled, tuple) else (compiled,)):
                assert torch.allclose(a, b, atol=1e-5)
            checked.append(True)
            state.step = 1
        return {}

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        pipe(PROMPT, subjects=subjects(2), generator=gen(), callback_on_step_end=compare, **CALL)
    finally:
        handle.remove()
    assert checked
