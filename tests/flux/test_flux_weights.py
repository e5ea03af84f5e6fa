"""The released anystory_flux.bin layout: a file built here from the documented layout loads exactly; others fail
with the keys named. The layout is spelled out below independently of the loader (tiny shapes: width 32,
2 heads, T5 width 32, SigLIP width 16, one double and one single block)."""
import os

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft.tuners.lora import LoraLayer

from anystory.flux import AnyStoryFluxPipeline, AnyStoryWeightsError
from anystory.flux.tiny_flux import TINY_REFERENCE_SIZE, random_released_state_dict, tiny_flux_components, \
    tiny_redux_base
from helpers.flux_pipe import CALL, PROMPT, gen, make_pipe, subjects

D, T5, SIGLIP, R = 32, 32, 16, 4  # transformer width, text width, SigLIP width, rank used in the file

REF_MODULES = {  # module -> (in, out)
    "x_embedder": (16, D),
    **{f"transformer_blocks.0.{m}": s for m, s in {
        "norm1.linear": (D, 6 * D), "attn.to_q": (D, D), "attn.to_k": (D, D), "attn.to_v": (D, D),
        "attn.to_out.0": (D, D), "ff.net.2": (4 * D, D)}.items()},
    **{f"single_transformer_blocks.0.{m}": s for m, s in {
        "norm.linear": (D, 3 * D), "proj_mlp": (D, 4 * D), "proj_out": (5 * D, D), "attn.to_q": (D, D),
        "attn.to_k": (D, D), "attn.to_v": (D, D)}.items()},
}
ROUTER_MODULES = {
    "context_embedder": (T5, D),
    **{f"transformer_blocks.0.{m}": s for m, s in {
        "norm1_context.linear": (D, 6 * D), "attn.add_q_proj": (D, D), "attn.add_k_proj": (D, D),
        "attn.add_v_proj": (D, D), "attn.to_add_out": (D, D), "ff_context.net.2": (4 * D, D)}.items()},
    **{f"single_transformer_blocks.0.{m}": s for m, s in {
        "norm.linear": (D, 3 * D), "proj_mlp": (D, 4 * D), "proj_out": (5 * D, D), "attn.to_q": (D, D),
        "attn.to_k": (D, D), "attn.to_v": (D, D)}.items()},
}
EMBEDDER = {"redux_up_lora_A.weight": (R, SIGLIP), "redux_up_lora_B.weight": (3 * T5, R),
            "redux_up_lora_B.bias": (3 * T5,), "redux_down_lora_A.weight": (R, 3 * T5),
            "redux_down_lora_B.weight": (T5, R), "redux_down_lora_B.bias": (T5,),
            "gate_proj.weight": (1, T5), "gate_proj.bias": (1,)}
PROCESSOR = {f"to_{w}_routing_map_lora_{p}": s for w in "qk" for p, s in
             {"A.weight": (R, D), "B.weight": (D, R), "B.bias": (D,)}.items()}


def documented_file(seed=0, lora_bias=False) -> dict:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda shape: torch.randn(*shape, generator=g) * 0.1

    def lora(modules):
        out = {}
        for m, (fan_in, fan_out) in modules.items():
            out[f"transformer.{m}.lora_A.weight"] = rnd((R, fan_in))
            out[f"transformer.{m}.lora_B.weight"] = rnd((fan_out, R))
            if lora_bias:
                out[f"transformer.{m}.lora_B.bias"] = rnd((fan_out,))
        return out

    router = {f"router_embedder.{k}": rnd(s) for k, s in EMBEDDER.items()}
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        router.update({f"transformer.{block}.attn.processor.{k}": rnd(s) for k, s in PROCESSOR.items()})
    router.update(lora(ROUTER_MODULES))
    return {"ref": lora(REF_MODULES), "redux": {k: rnd(s) for k, s in EMBEDDER.items()}, "router": router}


def fresh_pipe():
    pipe = AnyStoryFluxPipeline(**tiny_flux_components(0), reference_size=TINY_REFERENCE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def modules_with(transformer, adapter):
    return {name for name, m in transformer.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}


def test_documented_layout_loads_exactly_through_peft_adapters(tmp_path):
    state = documented_file()
    path = tmp_path / "anystory_flux.bin"
    torch.save(state, path)
    pipe = fresh_pipe()
    pipe.load_anystory_weights(str(path), redux_base=tiny_redux_base())  # torch.load(weights_only=True) inside
    t = pipe.transformer
    # the two LoRAs are diffusers/PEFT adapters on exactly the documented modules
    assert {"anystory_ref", "anystory_router"} <= set(t.peft_config)
    assert modules_with(t, "anystory_ref") == set(REF_MODULES)
    assert modules_with(t, "anystory_router") == set(ROUTER_MODULES)
    modules = dict(t.named_modules())
    for group, adapter in (("ref", "anystory_ref"), ("router", "anystory_router")):
        for key, value in state[group].items():
            if ".lora_" not in key or "processor" in key:
                continue
            name, param = key[len("transformer."):].split(".lora_")
            layer = getattr(modules[name], "lora_" + param.split(".")[0])[adapter]
            assert torch.equal(layer.weight, value), key
            assert modules[name].scaling[adapter] == 1.0  # no alpha in the file: scale 1, as diffusers loads it
    # the router processors and both embedders hold the file's values, nothing left at its initial value
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        proc = modules[f"{block}.attn"].processor
        for k in PROCESSOR:
            assert torch.equal(proc.state_dict()[k], state["router"][f"transformer.{block}.attn.processor.{k}"])
    redux, router = pipe.redux_embedder.state_dict(), pipe.router_embedder.state_dict()
    for k in EMBEDDER:
        assert torch.equal(redux[k], state["redux"][k]) and torch.equal(router[k], state["router"]["router_embedder." + k])
    base = tiny_redux_base().state_dict()
    assert all(torch.equal(redux[k], v) and torch.equal(router[k], v) for k, v in base.items())
    assert pipe.redux_embedder.output_size == 9 and pipe.router_embedder.output_size == 3
    # the loaded ref adapter acts only in the reference pass: the image stream still sees the base weights
    out = pipe(PROMPT, subjects=subjects(2), generator=gen(), **CALL).images
    assert np.isfinite(out).all()


def test_ref_adapter_shapes_the_reference_features():
    """Zeroing the ref LoRA changes the cached reference keys: the adapter is applied in the reference pass."""
    kv = {}
    for scale in (1.0, 0.0):
        pipe = fresh_pipe()
        state = documented_file()
        state["ref"] = {k: v * scale if "lora_B" in k else v for k, v in state["ref"].items()}
        pipe.load_anystory_weights(state, redux_base=tiny_redux_base())
        store = pipe.anystory_state.store_ref_kv
        pipe.anystory_state.store_ref_kv = lambda layer, k, v, s=scale: kv.setdefault((s, layer), k.clone()) is None or store(layer, k, v)
        pipe(PROMPT, subjects=subjects(1), generator=gen(), **CALL)
    assert all(not torch.allclose(kv[(1.0, layer)], kv[(0.0, layer)]) for layer in (0, 1))


def test_lora_bias_and_redux_base_variants_load():
    pipe = fresh_pipe()
    state = documented_file(lora_bias=True)
    base = tiny_redux_base().state_dict()
    state["redux"].update(base)  # a file that carries the Redux projection itself needs no redux_base
    state["router"].update({"router_embedder." + k: v for k, v in base.items()})
    pipe.load_anystory_weights(state, redux_base=None)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert torch.equal(layer.lora_B["anystory_ref"].bias, state["ref"]["transformer.transformer_blocks.0.attn.to_q.lora_B.bias"])


def _error(state) -> str:
    pipe = fresh_pipe()
    with pytest.raises(AnyStoryWeightsError) as e:
        pipe.load_anystory_weights(state, redux_base=tiny_redux_base())
    assert not pipe.anystory_loaded and not getattr(pipe.transformer, "peft_config", None)  # nothing changed
    return str(e.value)


def test_wrong_files_fail_naming_the_keys():
    """Keys the release needs and does not find (it would keep random weights there) and wrong shapes."""
    state = documented_file()
    del state["ref"]["transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight"]
    state["router"]["router_embedder.gate_proj.weight"] = torch.zeros(1, 7)
    del state["router"]["transformer.single_transformer_blocks.0.attn.processor.to_k_routing_map_lora_B.bias"]
    del state["redux"]["gate_proj.bias"]
    msg = _error(state)
    for key in ("transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
                "router_embedder.gate_proj.weight [1, 7] (expected [1, 32])",
                "transformer.single_transformer_blocks.0.attn.processor.to_k_routing_map_lora_B.bias",
                "gate_proj.bias"):
        assert key in msg, key
    assert "group 'ref'" in msg and "group 'router'" in msg and "group 'redux'" in msg

    state = documented_file()
    state["ref"]["transformer.x_embedder.lora_A.weight"] = torch.zeros(R, 64)  # a real FLUX x_embedder, not this one
    assert "transformer.x_embedder.lora_A.weight [4, 64] (expected ['r', 16])" in _error(state)

    state = documented_file()
    del state["redux"]
    assert "missing ['redux']" in _error(state)
    assert "not a state dict" in _error({"ref": [], "redux": {}, "router": {}})
    state = documented_file()
    state["ref"]["transformer.x_embedder.alpha"] = torch.tensor(2)  # diffusers refuses an integer alpha
    assert "alpha" in _error(state)


def _run(pipe, n=2):
    return pipe(PROMPT, subjects=subjects(n), generator=gen(), **CALL).images


def _loaded(state):
    pipe = fresh_pipe()
    pipe.load_anystory_weights(state, redux_base=tiny_redux_base())
    return pipe


def test_alpha_keys_scale_the_lora_as_peft_does():
    """``<module>.alpha`` in a LoRA group: the release's loader (diffusers) gives that module PEFT's scaling
    alpha / r. The same file with lora_B pre-multiplied by alpha / r and no alpha keys gives the same image."""
    state, scaled = documented_file(), documented_file()
    alphas = {("ref", m): 2.0 for m in REF_MODULES}
    alphas.update({("router", m): 12.0 for m in ROUTER_MODULES})
    alphas[("router", "context_embedder")] = 4.0  # one module apart: diffusers' alpha_pattern
    for (group, module), alpha in alphas.items():
        state[group][f"transformer.{module}.alpha"] = torch.tensor(alpha)
        key = f"transformer.{module}.lora_B.weight"
        scaled[group][key] = scaled[group][key] * (alpha / R)
    pipe = _loaded(state)
    modules = dict(pipe.transformer.named_modules())
    for (group, module), alpha in alphas.items():
        assert float(modules[module].scaling["anystory_" + group]) == alpha / R, (group, module)
    out, expected = _run(pipe), _run(_loaded(scaled))
    np.testing.assert_allclose(out, expected, atol=2e-6)
    assert np.abs(out - _run(_loaded(documented_file()))).max() > 1e-4  # the alpha changed the image (2e-6 above)


def test_keys_the_release_ignores_are_dropped_with_a_warning():
    """An extra LoRA target (loaded by the release, never switched on), a text-encoder LoRA key, an unknown
    redux parameter, a processor key of no block, an extra group: the image is the clean file's, and the
    warning lists every one of them."""
    state = documented_file()
    extra = {
        ("ref", "transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight"): torch.randn(R, D),
        ("ref", "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight"): torch.randn(4 * D, R),
        ("ref", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"): torch.randn(R, 32),
        ("ref", "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"): torch.randn(32, R),
        ("redux", "extra.weight"): torch.zeros(1),
        ("router", "transformer.transformer_blocks.7.attn.processor.to_q_routing_map_lora_A.weight"): torch.zeros(R, D),
    }
    for (group, key), value in extra.items():
        state[group][key] = value
    state["ip_adapter"] = {}
    with pytest.warns(UserWarning, match="never uses") as record:
        pipe = _loaded(state)
    msg = " ".join(str(w.message) for w in record)
    for _, key in extra:
        assert key in msg, key
    assert "top level: ip_adapter" in msg
    ff = dict(pipe.transformer.named_modules())["transformer_blocks.0.ff.net.0.proj"]
    assert "anystory_ref" not in getattr(ff, "lora_A", {})  # never applied, in no stream
    np.testing.assert_array_equal(_run(pipe), _run(_loaded(documented_file())))


def test_partial_lora_bias_is_zero_as_peft_leaves_it():
    state, full = documented_file(lora_bias=True), documented_file(lora_bias=True)
    key = "transformer.context_embedder.lora_B.bias"
    del state["router"][key]
    full["router"][key] = torch.zeros_like(full["router"][key])
    pipe = _loaded(state)
    assert torch.equal(pipe.transformer.context_embedder.lora_B["anystory_router"].bias, torch.zeros(D))
    np.testing.assert_array_equal(_run(pipe), _run(_loaded(full)))


def test_missing_file_and_missing_components():
    pipe = fresh_pipe()
    with pytest.raises(FileNotFoundError, match="anystory_flux.bin not found"):
        pipe.load_anystory_weights(os.path.dirname(__file__))
    pipe.image_encoder = None
    with pytest.raises(ValueError, match="SigLIP image_encoder"):
        pipe.load_anystory_weights(documented_file(), redux_base=tiny_redux_base())


def test_from_released_with_local_folders(tmp_path):
    """The loader users call, with local folders in place of the three hub ids."""
    components = tiny_flux_components(0)
    FluxPipeline(**{k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
                 ).save_pretrained(tmp_path / "flux")
    components["image_encoder"].save_pretrained(tmp_path / "redux" / "image_encoder")
    tiny_redux_base().save_pretrained(tmp_path / "redux" / "image_embedder")
    torch.save(random_released_state_dict(components["transformer"]), tmp_path / "anystory_flux.bin")
    pipe = AnyStoryFluxPipeline.from_released(str(tmp_path / "flux"), str(tmp_path / "redux"),
                                              str(tmp_path / "anystory_flux.bin"), torch_dtype=torch.float32,
                                              reference_size=TINY_REFERENCE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.anystory_loaded and pipe.feature_extractor.size == {"height": 54, "width": 54}
    out = pipe(PROMPT, subjects=subjects(2), generator=gen(), return_routing_maps=True, **CALL)
    assert out.images.shape == (1, 32, 32, 3) and len(out.routing_maps) == CALL["num_inference_steps"]


def _everything(pipe) -> dict:
    """What a load changes: every transformer tensor (adapters included) and embedder tensor, which layers hold
    which AnyStory adapter, the processor objects, the state object and its hooks."""
    t = pipe.transformer
    tensors = {f"t.{k}": v.clone() for k, v in t.state_dict().items()}
    for name in ("redux_embedder", "router_embedder"):
        module = getattr(pipe, name, None)
        tensors.update({f"{name}.{k}": v.clone() for k, v in (module.state_dict() if module else {}).items()})
    return {"tensors": tensors, "adapters": {a: modules_with(t, a) for a in ("anystory_ref", "anystory_router")},
            "peft_config": sorted(getattr(t, "peft_config", {})), "processors": dict(t.attn_processors),
            "state": pipe.anystory_state, "hooks": len(pipe.anystory_state._handles),
            "embedders": (pipe.redux_embedder, pipe.router_embedder), "loaded": pipe.anystory_loaded}


def _assert_same(before: dict, after: dict) -> None:
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k
    for key in ("adapters", "peft_config", "hooks", "loaded"):
        assert after[key] == before[key], key
    assert all(after["processors"][k] is p for k, p in before["processors"].items())
    assert after["state"] is before["state"]
    assert all(a is b for a, b in zip(after["embedders"], before["embedders"]))


def _fail_on_router_adapter(transformer):
    """The router adapter fails to load: the old adapters are gone and the new ref adapter is in by then."""
    real = transformer.load_lora_adapter

    def load(sd, *args, adapter_name=None, **kwargs):
        if adapter_name == "anystory_router":
            raise RuntimeError("simulated failure while loading the router adapter")
        return real(sd, *args, adapter_name=adapter_name, **kwargs)

    transformer.load_lora_adapter = load


@pytest.mark.parametrize("loaded_before", [True, False])
def test_a_load_that_fails_half_way_leaves_the_pipeline_as_it_was(loaded_before):
    """Build first, swap after: a load failing in the swap (after the old adapters were deleted and the new ref
    adapter loaded) puts back the AnyStory the pipeline had (or none): same tensors, adapters, processors,
    hooks, embedders, and the same images; a later load still works."""
    pipe = make_pipe(seed=0) if loaded_before else fresh_pipe()
    images = _run(pipe) if loaded_before else pipe(PROMPT, generator=gen(), **CALL).images
    before = _everything(pipe)
    _fail_on_router_adapter(pipe.transformer)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pipe.load_anystory_weights(random_released_state_dict(pipe.transformer, seed=1), redux_base=tiny_redux_base())
    del pipe.transformer.load_lora_adapter
    _assert_same(before, _everything(pipe))
    again = _run(pipe) if loaded_before else pipe(PROMPT, generator=gen(), **CALL).images
    np.testing.assert_array_equal(again, images)
    if not loaded_before:
        with pytest.raises(ValueError, match="no AnyStory weights are loaded"):
            _run(pipe)
    other = random_released_state_dict(pipe.transformer, seed=1)
    pipe.load_anystory_weights(other, redux_base=tiny_redux_base())
    np.testing.assert_array_equal(_run(pipe), _run(_loaded(other)))
