"""AnyStorySDXLPipeline on tiny SDXL-shaped components (CPU, offline)."""
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from anystory import AnyStorySDXLPipeline, Subject
from anystory.sdxl.adapter_sdxl import AnyStorySDXLAdapter
from anystory.sdxl.attention_processors import AnyStoryCrossAttnProcessor

PROMPT = "a red striped star and a blue dotted moon on sand"


def _image(seed, size=(48, 40)):
    return np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)


def _run(pipe, subjects, steps=2, **kw):
    return pipe(PROMPT, subjects=subjects, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


def test_zero_subjects_equals_stable_diffusion_xl(components, pipe):
    ref = StableDiffusionXLPipeline(**{k: v for k, v in components.items()})
    ref.set_progress_bar_config(disable=True)
    for guidance in (1.0, 5.0):
        expected = ref(PROMPT, num_inference_steps=3, guidance_scale=guidance, negative_prompt="blurry",
                       generator=torch.Generator().manual_seed(0), output_type="np").images
        got = pipe(PROMPT, subjects=[], num_inference_steps=3, guidance_scale=guidance, negative_prompt="blurry",
                   generator=torch.Generator().manual_seed(0), output_type="np").images
        assert np.abs(expected - got).max() <= 1e-6


def test_subjects_change_the_output(pipe):
    plain = _run(pipe, []).images
    with_subject = _run(pipe, [Subject(_image(1))]).images
    assert np.abs(plain - with_subject).max() > 1e-4


def _forced(h, w, b_region):
    """[3, h, w]: subject A left half, subject B ``b_region`` (a bool [h, w] array), background elsewhere."""
    a = np.zeros((h, w), bool)
    a[:, : w // 2] = True
    b = b_region & ~a
    bg = ~(a | b)
    return torch.from_numpy(np.stack([a, b, bg]).astype(np.float32))


def test_routing_confines_first_step_attention_to_the_region(pipe):
    region = np.zeros((32, 32), bool)
    region[4:12, 20:28] = True
    maps = _forced(32, 32, region)
    layer = "down_blocks.1.attentions.0.transformer_blocks.0"
    modules = dict(pipe.unet.named_modules())
    outputs = {}

    def capture(name):
        def hook(module, args, output):
            outputs.setdefault(name, output.detach().clone())
        return hook

    handles = [modules[f"{layer}.{n}"].register_forward_hook(capture(n)) for n in ("attn1", "attn2")]
    pipe.set_routing_override(maps)
    try:
        runs = []
        for b_image in (_image(2), _image(3)):
            outputs.clear()
            _run(pipe, [Subject(_image(1)), Subject(b_image)], steps=1)
            runs.append(dict(outputs))
    finally:
        pipe.set_routing_override(None)
        for h in handles:
            h.remove()
    for name in ("attn1", "attn2"):
        diff = (runs[0][name] - runs[1][name]).abs().amax(dim=-1)  # [batch, tokens]
        hw = int(diff.shape[-1] ** 0.5)
        inside = torch.from_numpy(maps[1].numpy()).view(1, 1, 32, 32)
        inside = torch.nn.functional.interpolate(inside, size=(hw, hw), mode="nearest").flatten().bool()
        assert diff[:, ~inside].max().item() == 0.0, f"{name}: B changed positions outside its region"
        assert diff[:, inside].max().item() > 1e-6, f"{name}: B's reference had no effect inside its region"


def _capture_gates(monkeypatch):
    gates = []
    original = AnyStoryCrossAttnProcessor._route

    def route(self, hidden, hw):
        gate = original(self, hidden, hw)
        gates.append(gate.detach().clone())
        return gate

    monkeypatch.setattr(AnyStoryCrossAttnProcessor, "_route", route)
    return gates


def test_routing_maps_shape_sum_and_one_hot(pipe, monkeypatch):
    gates = _capture_gates(monkeypatch)
    out = _run(pipe, [Subject(_image(1)), Subject(_image(2))], return_routing_maps=True)
    assert len(out.routing_maps) == 2
    for step in out.routing_maps:
        assert step.shape == (1, 3, 32, 32)
        assert torch.allclose(step.sum(dim=1), torch.ones(1, 32, 32))
    assert gates, "no cross-attention layer routed"
    for g in gates:
        assert g.shape[:2] == (1, 3)
        assert torch.equal(g.sum(dim=1), torch.ones_like(g[:, 0]))
        assert set(g.unique().tolist()) <= {0.0, 1.0}


def test_gumbel_routing_trains_the_router(pipe):
    adapter = pipe.anystory
    tensors = pipe.subject_tensors(pipe.check_subjects([Subject(_image(1)), Subject(_image(2))]), "cpu", torch.float32)
    adapter.train()
    try:
        encoded = pipe.encode_subjects(**tensors)
        state = pipe.start_anystory_call(adapter.conditioning(
            **encoded, scales=torch.ones(2), reference_scales=torch.ones(2), latent_hw=(32, 32),
            collect_soft_maps=True))
        assert state.training
        latents = torch.randn(1, 4, 32, 32)
        text = torch.randn(1, 7, pipe.unet.config.cross_attention_dim)
        added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        pred = pipe.unet(latents, torch.tensor([500]), text, added_cond_kwargs=added).sample
        gt = torch.zeros(1, 3, 32 * 32)
        gt[:, 0, :300] = 1
        gt[:, 1, 300:600] = 1
        gt[:, 2, 600:] = 1
        routing = []
        for name, soft in state.soft_maps.items():
            h = int(soft.shape[-1] ** 0.5)
            target = torch.nn.functional.interpolate(gt.view(1, 3, 32, 32), size=(h, h), mode="nearest").flatten(2)
            routing.append(((soft - target) ** 2).mean())
        loss = pred.pow(2).mean() + 0.1 * torch.stack(routing).mean()
        loss.backward()
        router = adapter.layer_conditioning[next(iter(adapter.layer_conditioning))].router
        grads = [p.grad for p in router.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0
        assert adapter.routing_qformer.queries.grad is not None
    finally:
        adapter.zero_grad(set_to_none=True)
        adapter.eval()
        pipe.start_anystory_call()


def test_gumbel_gates_are_one_hot_in_training():
    from anystory.sdxl.router import routing_maps

    logits = torch.randn(2, 3, 10, requires_grad=True)
    hard, soft = routing_maps(logits, training=True)
    assert torch.equal(hard.sum(1), torch.ones(2, 10)) and set(hard.unique().tolist()) <= {0.0, 1.0}
    (hard * torch.randn_like(hard)).sum().backward()
    assert logits.grad.abs().sum() > 0
    assert torch.allclose(soft.sum(1), torch.ones(2, 10))


def test_background_logit_adjustment_is_inference_only():
    """The bias moves the inference argmax off the background where the router is unsure, keeps confident
    positions, and leaves the soft maps and the training path untouched."""
    from anystory.sdxl.router import routing_maps

    logits = torch.tensor([[[0.5, 4.0, 0.0], [0.0, 0.0, 0.2], [1.5, 1.0, 9.0]]])  # [1, K=3 (2 subjects + bg), L=3]
    plain, soft = routing_maps(logits, training=False)
    adjusted, soft_adjusted = routing_maps(logits, training=False, background_bias=2.0)
    assert plain.argmax(1).tolist() == [[2, 0, 2]]
    assert adjusted.argmax(1).tolist() == [[0, 0, 2]]  # unsure -> subject 0; the confident background stays
    assert torch.equal(soft, soft_adjusted)
    torch.manual_seed(0)
    a, _ = routing_maps(logits, training=True, background_bias=50.0)
    torch.manual_seed(0)
    b, _ = routing_maps(logits, training=True)
    assert torch.equal(a, b)


def _background_biases(monkeypatch) -> list:
    """Every background adjustment the routers are given from now on (in the order they get it)."""
    seen = []
    import anystory.sdxl.attention_processors as processors

    original = processors.routing_maps

    def spy(logits, training, tau=1.0, background_bias=0.0, *rest, **options):
        seen.append(background_bias)
        return original(logits, training, tau, background_bias, *rest, **options)

    monkeypatch.setattr(processors, "routing_maps", spy)
    return seen


def test_background_bias_reaches_the_router_and_is_validated(pipe, monkeypatch):
    seen = _background_biases(monkeypatch)
    subjects = [Subject(_image(1)), Subject(_image(2))]
    _run(pipe, subjects, steps=1)
    assert set(seen) == {pipe.anystory.config.routing_background_bias}
    seen.clear()
    many = _run(pipe, subjects, steps=1, routing_background_bias=1e4, return_routing_maps=True)
    assert set(seen) == {1e4}
    assert many.routing_maps[-1][0, 2].sum() == 0, "a huge bias leaves the background no position"
    with pytest.raises(ValueError, match="routing_background_bias"):
        _run(pipe, subjects, steps=1, routing_background_bias=float("nan"))


def test_reference_net_runs_once_per_subject_per_call(pipe):
    calls = []
    handle = pipe.anystory.reference_net.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        out = pipe(PROMPT, subjects=[Subject(_image(1)), Subject(_image(2))], num_inference_steps=20,
                   guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")
    finally:
        handle.remove()
    assert out.images.shape == (1, 64, 64, 3)
    assert sum(calls) == 2  # each subject encoded once, never per step or per CFG half


def test_save_load_round_trip_bit_exact(pipe, components, tmp_path):
    pipe.save_anystory_weights(str(tmp_path))
    other = AnyStorySDXLPipeline(**components)
    other.load_anystory_weights(str(tmp_path))
    a, b = pipe.anystory.state_dict(), other.anystory.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the reloaded adapter drives the shared UNet now; the original's must be re-attached afterwards
    subjects = [Subject(_image(1))]
    first = _run(other, subjects).images
    pipe.anystory.attach(pipe.unet)
    assert np.array_equal(first, _run(pipe, subjects).images)


def test_mismatching_weights_name_the_keys(pipe, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe.save_anystory_weights(str(tmp_path))
    state = load_file(str(tmp_path / "anystory.safetensors"))
    dropped = sorted(state)[0]
    del state[dropped]
    state["not_a_layer.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "anystory.safetensors"))
    with pytest.raises(ValueError) as err:
        AnyStorySDXLAdapter.load_anystory(str(tmp_path))
    assert dropped in str(err.value) and "not_a_layer.weight" in str(err.value)
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)


def test_bad_input_errors(pipe):
    good = _image(1)
    cases = [
        ([Subject(np.zeros((0, 5, 3), np.uint8))], "non-empty"),
        ([Subject(Image.new("RGB", (0, 0)))], "zero size"),
        ([Subject(good, mask=np.ones((10, 10), bool))], "does not match image size"),
        ([Subject(good, mask=np.zeros(good.shape[:2], bool))], "empty"),
        ([Subject(good)] * 5, "Too many subjects"),
        ([Subject(good, scale=float("nan"))], "finite"),
        ([Subject(good, reference_scale=-1)], "reference_scale must be a number between 0 and 10"),
        ([Subject("/nonexistent/file.png")], "not found"),
    ]
    for subjects, message in cases:
        with pytest.raises(ValueError, match=message):
            _run(pipe, subjects, steps=1)


@pytest.mark.parametrize("mode", ["RGBA", "L", "CMYK", "I;16", "P", "1"])
def test_image_modes_are_converted(pipe, mode):
    img = Image.fromarray(_image(5))
    if mode == "I;16":
        img = Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)
        assert img.mode == "I;16"
    else:
        img = img.convert(mode)
    out = _run(pipe, [Subject(img)], steps=1)
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def test_subjects_without_weights_are_refused(components):
    bare = AnyStorySDXLPipeline(**components)
    with pytest.raises(ValueError, match="no AnyStory weights"):
        bare(PROMPT, subjects=[Subject(_image(1))], num_inference_steps=1)


def test_tiny_components_mirror_sdxl(components):
    unet = components["unet"]
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.use_linear_projection
    assert max(unet.config.transformer_layers_per_block) >= 2
    assert type(components["text_encoder"]).__name__ == "CLIPTextModel"
    assert type(components["text_encoder_2"]).__name__ == "CLIPTextModelWithProjection"
    assert unet.config.cross_attention_dim == (components["text_encoder"].config.hidden_size
                                               + components["text_encoder_2"].config.hidden_size)
    ids = components["tokenizer"]("a photo of a dog").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # CLIP's real BPE ids


def test_processors_compile_without_graph_breaks(pipe):
    """torch.compile(fullgraph=True) raises on any graph break inside the UNet, our processors included."""
    enc = pipe.encode_subjects(**pipe.subject_tensors(pipe.check_subjects([Subject(_image(1)), Subject(_image(2))]),
                                                      "cpu", torch.float32))
    pipe.start_anystory_call(pipe.anystory.conditioning(**enc, scales=torch.ones(2), reference_scales=torch.ones(2),
                                                        cfg=True, latent_hw=(32, 32)))
    try:
        args = (torch.randn(2, 4, 32, 32), torch.tensor([500]), torch.randn(2, 7, 64))
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        with torch.no_grad():
            eager = pipe.unet(*args, added_cond_kwargs=added).sample
            pipe.anystory.state.prev_map, pipe.anystory.state.kv_cache = None, {}
            torch._dynamo.reset()
            compiled = torch.compile(pipe.unet, backend="eager", fullgraph=True)(*args, added_cond_kwargs=added).sample
        assert torch.allclose(eager, compiled, atol=1e-5)
    finally:
        pipe.start_anystory_call()
        torch._dynamo.reset()


def test_user_callback_runs_beside_routing_maps(pipe):
    seen = []

    def callback(p, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {}

    out = _run(pipe, [Subject(_image(1))], steps=3, callback_on_step_end=callback, return_routing_maps=True)
    assert [i for i, _ in seen] == [0, 1, 2] and seen[0][1] == (1, 4, 32, 32)
    assert len(out.routing_maps) == 3 and out.routing_maps[0].shape == (1, 2, 32, 32)


def test_each_call_hands_the_processors_a_fresh_typed_state(pipe):
    """``start`` builds a new AnyStoryState around an immutable SDXLConditioning (a misspelt name is refused, not
    silently set; so is setting a field afterwards) and every processor reads that object; the previous call's
    state is left as it was."""
    import dataclasses

    from anystory.sdxl.attention_processors import AnyStoryState

    adapter = pipe.anystory
    before = adapter.state
    before.kv_cache["marker"] = (torch.zeros(1), torch.zeros(1))
    try:
        state = adapter.start(adapter.conditioning(num_subjects=1, latent_hw=(4, 4), forced_maps=torch.ones(2, 4, 4)))
        assert isinstance(state, AnyStoryState) and state is not before and state.kv_cache == {}
        assert "marker" in before.kv_cache
        assert state.prev_map.shape == (1, 2, 4, 4), "forced routing must hold from the first layer"
        assert state.background_bias == adapter.config.routing_background_bias
        with pytest.raises(dataclasses.FrozenInstanceError):
            state.conditioning.num_subjects = 2
        processors = list(pipe.unet.attn_processors.values())
        assert processors and all(p.state is state for p in processors)
        with pytest.raises(TypeError, match="latent_size"):
            adapter.start(adapter.conditioning(latent_size=(4, 4)))
        with pytest.raises(TypeError, match="prev_map"):
            adapter.start(adapter.conditioning(prev_map=torch.ones(1, 2, 4, 4)))  # written while running, not an input
    finally:
        adapter.start()


def test_a_lone_subject_gets_its_own_stored_background_adjustment(pipe, monkeypatch):
    """``routing_background_bias_single``: calls with one subject use it, calls with more the stored adjustment, a
    caller's value wins over both, and weights without it behave as before."""
    seen = _background_biases(monkeypatch)
    one, two = [Subject(_image(1))], [Subject(_image(1)), Subject(_image(2))]
    stored = pipe.anystory.config.routing_background_bias
    assert pipe.anystory.config.routing_background_bias_single is None
    _run(pipe, one, steps=1)
    assert set(seen) == {stored}
    pipe.anystory.register_to_config(routing_background_bias_single=stored - 0.75)
    try:
        for subjects, expected in ((one, stored - 0.75), (two, stored)):
            seen.clear()
            _run(pipe, subjects, steps=1)
            assert set(seen) == {expected}
        seen.clear()
        _run(pipe, one, steps=1, routing_background_bias=2.5)
        assert set(seen) == {2.5}
    finally:
        pipe.anystory.register_to_config(routing_background_bias_single=None)
