"""Low-VRAM modes: the quantized FLUX pipeline (torchao int8, which runs on a CPU) keeps the AnyStory LoRAs on
its quantized layers and stays within a documented tolerance of the unquantized one; the bitsandbytes and
offload modes are wired through diffusers' own configs and hooks (CUDA runs: ``benchmarks/gpu_check.sh``)."""
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from anystory.flux import AnyStoryFluxPipeline
from anystory.flux.low_vram import PRESETS, apply_offload, plan_for_vram, quantization_config
from anystory.flux.tiny_flux import TINY_REFERENCE_SIZE, random_released_state_dict, tiny_flux_components, \
    tiny_redux_base
from helpers.flux_pipe import CALL, PROMPT, gen, subjects

#: documented in docs/flux.md (low-VRAM modes): max abs pixel difference, int8 against float32, tiny model
INT8_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    components = tiny_flux_components(0)
    FluxPipeline(**{k: v for k, v in components.items() if k not in ("image_encoder", "feature_extractor")}
                 ).save_pretrained(root / "flux")
    components["image_encoder"].save_pretrained(root / "redux" / "image_encoder")
    tiny_redux_base().save_pretrained(root / "redux" / "image_embedder")
    state = random_released_state_dict(components["transformer"], std=0.3)
    torch.save(state, root / "anystory_flux.bin")
    state["ref"] = {k: v * 0 if ".lora_B." in k else v for k, v in state["ref"].items()}
    torch.save(state, root / "no_ref_lora.bin")
    return root


def load(folders, quantization="none", weights="anystory_flux.bin"):
    pipe = AnyStoryFluxPipeline.from_released(str(folders / "flux"), str(folders / "redux"), str(folders / weights),
                                              torch_dtype=torch.float32, quantization=quantization,
                                              reference_size=TINY_REFERENCE_SIZE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    return pipe(PROMPT, subjects=subjects(2), generator=gen(), **CALL).images


def test_int8_pipeline_keeps_its_loras_and_stays_close(folders):
    pipe = load(folders, "int8")
    t = pipe.transformer
    q = t.transformer_blocks[0].attn.to_q
    assert type(q.base_layer.weight).__name__ == "Int8Tensor"  # the base weight is quantized ...
    assert "anystory_ref" in q.lora_A and type(q).__name__ == "TorchaoLoraLinear"  # ... and carries our LoRA
    assert "anystory_router" in t.context_embedder.lora_A
    t5_q = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight
    assert type(t5_q).__name__ == "Int8Tensor"
    quantized, full = run(pipe), run(load(folders))
    diff = np.abs(quantized - full).max()
    assert 0 < diff <= INT8_TOLERANCE
    # the reference LoRA acts on the quantized layers: without it the image moves by far more than int8 does
    assert np.abs(run(load(folders, "int8", "no_ref_lora.bin")) - quantized).max() > 3 * diff


def test_group_offload_gives_the_same_image(folders):
    pipe = load(folders)
    expected = run(pipe)
    apply_offload(pipe, "group", "cpu")  # onload device = CPU here: the hooks run, the arithmetic must not change
    np.testing.assert_array_equal(run(pipe), expected)


def test_vram_presets_and_bitsandbytes_configs():
    assert plan_for_vram("auto", "cpu").quantization == "none" and plan_for_vram("16", "cpu").offload == "none"
    for vram, (quantization, offload) in PRESETS.items():
        plan = plan_for_vram(vram, "cuda")
        assert (plan.quantization, plan.offload) == (quantization, offload) and vram in plan.describe()
    assert PRESETS["16"] == ("bnb-4bit", "model") and PRESETS["40"] == ("none", "none")
    config = quantization_config("bnb-4bit").quant_mapping
    assert set(config) == {"transformer", "text_encoder_2"}
    assert all(c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" for c in config.values())
    assert all(c.load_in_8bit for c in quantization_config("bnb-8bit").quant_mapping.values())
    assert quantization_config("none") is None
    for bad in (lambda: plan_for_vram("12"), lambda: quantization_config("fp4"), lambda: apply_offload(None, "disk")):
        with pytest.raises(ValueError, match="must be one of"):
            bad()


def test_cli_flux_options_follow_the_vram_preset(monkeypatch, capsys):
    """``python -m anystory.generate --flux --vram 16``: 4-bit and model offload unless overridden."""
    from anystory import generate

    seen = {}
    monkeypatch.setattr(AnyStoryFluxPipeline, "from_released",
                        classmethod(lambda cls, **kw: seen.update(kw) or "pipe"))
    monkeypatch.setattr("anystory.flux.low_vram.apply_offload", lambda pipe, offload, device: seen.update(
        offload=offload, device=device))
    base = ["--prompt", "p", "--flux", "--flux-weights", "w.bin", "--device", "cuda"]
    assert generate.load_flux(generate.parse_args(base + ["--vram", "16"])) == "pipe"
    assert (seen["quantization"], seen["offload"], seen["anystory"]) == ("bnb-4bit", "model", "w.bin")
    assert "4-bit NF4" in capsys.readouterr().out
    generate.load_flux(generate.parse_args(base + ["--vram", "24", "--quantization", "int8", "--offload", "group"]))
    assert (seen["quantization"], seen["offload"]) == ("int8", "group")
