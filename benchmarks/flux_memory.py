"""FLUX AnyStory: peak GPU memory per low-VRAM mode, *estimated on a CPU* from the real widths.

``python -m benchmarks.flux_memory [--subjects 2] [--size 512]``. No GPU and no download: every model is built
on the ``meta`` device from FLUX.1-dev's / FLUX.1-Redux-dev's configs, so parameter counts (and the part of them
in ``nn.Linear`` weights, which quantization shrinks) are exact. Activation peaks are *measured on a CPU*, each
in a fresh process (RSS high-water mark of a second run above the resident weights and the kernels' caches
of the first), for one double block, one single block
(denoising step and reference pass, bf16, real widths and sequence lengths) and the VAE (encode, decode), and
scaled to the model: blocks run one after the other, so the step's transient peak is one block's, while the
cached reference keys/values (``2 x N x 1024 x 3072`` per block, 57 blocks) persist. CPU kernels differ from
CUDA's, so the result is an estimate; ``benchmarks/gpu_check.sh`` measures the real thing on a GPU.

Bytes per parameter: bf16 2; bitsandbytes 8-bit 1 (+ one fp32 scale per output row); NF4 0.5 + one fp32
absmax per 64 weights. Non-linear parameters, LoRAs and every other model stay in bf16.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch

GB = 1024 ** 3
DOUBLE, SINGLE = 19, 38
HIDDEN, TEXT_LEN, IMAGE_TOKENS_512 = 3072, 512, 1024
REDUX_TOKENS, ROUTER_TOKENS, REFERENCE_TOKENS = 81, 9, 1024  # per subject, as the release


# ---- parameters (exact, meta device) -----------------------------------------------------------------------------
def _models():
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config, \
        T5EncoderModel

    from anystory.flux.redux import AnyStoryReduxEncoder

    from .flux import FLUX_TRANSFORMER, FLUX_VAE, RELEASE_RANK, SIGLIP_SO400M

    with torch.device("meta"):
        return {
            "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER),
            # google/t5-v1_1-xxl encoder (FLUX.1-dev's text_encoder_2) and openai/clip-vit-large-patch14's text model
            "text_encoder_2": T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240,
                                                      num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                         num_hidden_layers=12, num_attention_heads=12)),
            "vae": AutoencoderKL(**FLUX_VAE),
            "image_encoder": SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M)),
            "redux_embedder": AnyStoryReduxEncoder(1152, 4096, RELEASE_RANK, True, 9),
            "router_embedder": AnyStoryReduxEncoder(1152, 4096, RELEASE_RANK, True, 3),
        }


def _split(model) -> tuple:
    """(parameters in nn.Linear weights, all other parameters)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return linear, sum(p.numel() for p in model.parameters()) - linear


def _anystory_lora_params(transformer) -> int:
    from anystory.flux.weights_flux import (PROCESSOR_PARAMS, REF_DOUBLE, REF_SINGLE, REF_TOP, ROUTER_DOUBLE,
                                            ROUTER_SINGLE, ROUTER_TOP, lora_targets)

    from .flux import RELEASE_RANK

    r = RELEASE_RANK
    n = sum(r * (i + o) for top, d, s in ((REF_TOP, REF_DOUBLE, REF_SINGLE), (ROUTER_TOP, ROUTER_DOUBLE, ROUTER_SINGLE))
            for i, o in lora_targets(transformer, top, d, s).values())
    per_block = 2 * (r * HIDDEN + r * HIDDEN + HIDDEN)  # to_{q,k}_routing_map_lora_{A,B} + bias
    assert len(PROCESSOR_PARAMS) == 6
    return n + per_block * (DOUBLE + SINGLE)


def parameter_table() -> dict:
    models = _models()
    out = {name: dict(zip(("linear", "other"), _split(m))) for name, m in models.items()}
    out["anystory_loras"] = {"linear": 0, "other": _anystory_lora_params(models["transformer"])}
    t = models["transformer"]
    block = lambda b: sum(p.numel() for p in b.parameters())  # noqa: E731
    out["transformer"]["double_block"] = block(t.transformer_blocks[0])
    out["transformer"]["single_block"] = block(t.single_transformer_blocks[0])
    t5 = models["text_encoder_2"]
    out["text_encoder_2"]["block"] = block(t5.encoder.block[1])
    out["text_encoder_2"]["embedding"] = t5.shared.weight.numel()
    return out


# ---- activations (measured on a CPU, one process each) -------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _measure(unit: str, subjects: int, size: int) -> int:
    """Peak bytes above the resident weights and inputs while ``unit`` runs once (bf16, no grad)."""
    from diffusers import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    from .flux import FLUX_VAE

    torch.manual_seed(0)
    dt = torch.bfloat16
    image = (size // 16) ** 2
    text = TEXT_LEN + subjects * REDUX_TOKENS
    with torch.no_grad():
        if unit in ("double", "single", "double_ref", "single_ref"):
            block = (FluxTransformerBlock if unit.startswith("double") else FluxSingleTransformerBlock)(
                HIDDEN, 24, 128).to(dt).eval()
            batch, img, txt = (subjects, REFERENCE_TOKENS, 0) if unit.endswith("ref") else (1, image, text)
            rope = (torch.randn(txt + img, 128), torch.randn(txt + img, 128))
            temb = torch.randn(batch, HIDDEN, dtype=dt)
            x, e = torch.randn(batch, img, HIDDEN, dtype=dt), torch.randn(batch, txt, HIDDEN, dtype=dt)
            run = lambda: block(x, e, temb, image_rotary_emb=rope)  # noqa: E731
        else:
            vae = AutoencoderKL(**FLUX_VAE).to(dt).eval()
            if unit == "vae_decode":
                z = torch.randn(1, 16, size // 8, size // 8, dtype=dt)
                run = lambda: vae.decode(z)  # noqa: E731
            else:
                px = torch.randn(1, 3, 512, 512, dtype=dt)
                run = lambda: vae.encode(px)  # noqa: E731
        run()  # warm-up: CPU kernels cache packed copies of the weights, which a GPU does not make
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the RSS high-water mark
        before = _rss()
        run()
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
    return max(peak - before, 0)


def activations(subjects: int, size: int) -> dict:
    out = {}
    for unit in ("double", "single", "double_ref", "single_ref", "vae_decode", "vae_encode"):
        result = subprocess.run([sys.executable, "-m", "benchmarks.flux_memory", "--measure", unit,
                                 "--subjects", str(subjects), "--size", str(size)],
                                capture_output=True, text=True, check=True)
        out[unit] = int(result.stdout.strip().splitlines()[-1])
    return out


# ---- modes ---------------------------------------------------------------------------------------------------------
def _bytes(entry: dict, quant: str) -> float:
    lin, other = entry["linear"], entry["other"]
    per_linear = {"bf16": 2.0, "8bit": 1.0 + 4 / 3072, "4bit": 0.5 + 4 / 64}[quant]
    return lin * per_linear + other * 2.0


def estimate(params: dict, act: dict, subjects: int) -> list:
    """Peak GB per mode (rows), with the largest contributor named."""
    kv_cache = 2 * subjects * REFERENCE_TOKENS * HIDDEN * 2 * (DOUBLE + SINGLE)
    step_act = max(act["double"], act["single"]) + kv_cache
    ref_act = max(act["double_ref"], act["single_ref"])
    transformer_act = max(step_act, ref_act + kv_cache)
    small = ("text_encoder", "vae", "image_encoder", "redux_embedder", "router_embedder")

    def weights(name, quant="bf16"):
        q = quant if name in ("transformer", "text_encoder_2") else "bf16"
        return _bytes(params[name], q) + (_bytes(params["anystory_loras"], "bf16") if name == "transformer" else 0)

    t5_act = 0.25 * GB  # T5-XXL encoder over 512 tokens: a few [512, 10240] bf16 tensors at a time
    vae_act = max(act["vae_decode"], act["vae_encode"])
    rows = []

    def resident(quant):
        total = sum(weights(n, quant) for n in ("transformer", "text_encoder_2") + small)
        return total + max(transformer_act, vae_act, t5_act)

    def model_offload(quant):
        return max(weights("transformer", quant) + transformer_act, weights("text_encoder_2", quant) + t5_act,
                   weights("vae") + vae_act, weights("image_encoder") + weights("redux_embedder")
                   + weights("router_embedder"))

    def group_offload():
        t, t5 = params["transformer"], params["text_encoder_2"]
        t_rest = (t["linear"] + t["other"] - DOUBLE * t["double_block"] - SINGLE * t["single_block"]) * 2
        t_groups = 2 * max(t["double_block"], t["single_block"]) * 2  # the running block + the one prefetched
        t5_groups = (2 * t5["block"] + t5["embedding"]) * 2
        return max(t_rest + t_groups + _bytes(params["anystory_loras"], "bf16") + transformer_act,
                   t5_groups + t5_act, weights("vae") + vae_act)

    rows.append(("full: bf16, all on the GPU", resident("bf16"), "--vram 40"))
    rows.append(("model CPU offload, bf16", model_offload("bf16"), ""))
    rows.append(("group offload (block level, CUDA streams), bf16", group_offload(), "--offload group"))
    rows.append(("8-bit transformer + T5, all on the GPU", resident("8bit"), ""))
    rows.append(("8-bit transformer + T5, model CPU offload", model_offload("8bit"), "--vram 24"))
    rows.append(("4-bit NF4 transformer + T5, all on the GPU", resident("4bit"), ""))
    rows.append(("4-bit NF4 transformer + T5, model CPU offload", model_offload("4bit"), "--vram 16"))
    return [(name, gb / GB, preset) for name, gb, preset in rows]


def main(argv=None) -> int:
    from anystory.cli_options import add_subject_count  # here: the measured subprocess imports only what it builds

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_subject_count(p)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        torch.set_num_threads(2)
        print(_measure(args.measure, args.subjects, args.size))
        return 0
    params = parameter_table()
    act = activations(args.subjects, args.size)
    print(json.dumps({"parameters": params, "activation_bytes": act}, indent=1))
    total = {k: (v["linear"] + v["other"]) / 1e9 for k, v in params.items()}
    print("parameters (billions): " + ", ".join(f"{k} {v:.3f}" for k, v in total.items()))
    print(f"\nESTIMATED peak GPU memory, FLUX AnyStory, {args.subjects} subjects, {args.size}x{args.size}, one image:")
    print("| mode | peak (GiB, estimate) | preset |\n|---|---|---|")
    for name, gb, preset in estimate(params, act, args.subjects):
        print(f"| {name} | {gb:.1f} | {preset} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
