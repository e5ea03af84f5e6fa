"""FLUX AnyStory on a GPU, per low-VRAM mode: peak memory and per-step time, real shapes, random weights.

Run by ``benchmarks/gpu_check.sh`` (a CUDA machine, no hub access, under 10 minutes). It writes FLUX.1-dev-,
FLUX.1-Redux-dev- and ``anystory_flux.bin``-shaped folders with random weights once (the full T5-XXL and CLIP-L
text encoders included; the tokenizers are CLIP's offline BPE, so T5's vocabulary is CLIP's 49,408 instead of
32,128), then for each mode loads them as a user does (``AnyStoryFluxPipeline.from_released(quantization=...)`` +
``low_vram.apply_offload``) and generates one image with two subjects. Reported per mode: peak allocated memory
while loading and placing, peak while generating (``torch.cuda.max_memory_allocated``), the median time of the
steps after the first (the first also runs the reference pass) and the load time. A mode that fails is reported
with its error and the next one runs. ``--device cpu --shape tiny`` runs the same code on the tiny components
(the modes a CPU can run), as a smoke test.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from anystory.cli_options import add_device, add_shape, add_subject_count

#: mode -> (quantization, offload)
MODES = {"full": ("none", "none"), "model": ("none", "model"), "group": ("none", "group"),
         "8bit": ("bnb-8bit", "none"), "8bit-model": ("bnb-8bit", "model"), "4bit": ("bnb-4bit", "none"),
         "4bit-model": ("bnb-4bit", "model"), "int8": ("int8", "none"), "sequential": ("none", "sequential")}
DEFAULT_MODES = "full,model,group,8bit-model,4bit-model"
CPU_MODES = ("full", "group", "int8")


def write_folders(root: str, shape: str, device: str) -> dict:
    """FLUX / Redux folders and ``anystory_flux.bin`` with random weights, in the layouts ``from_released`` reads."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import CLIPTextConfig, CLIPTextModel, SiglipVisionConfig, SiglipVisionModel, T5Config, \
        T5EncoderModel

    from anystory.flux.tiny_flux import random_released_state_dict, tiny_flux_components, tiny_redux_base
    from anystory.tokenizer import clip_vocab_and_merges, offline_clip_tokenizer

    from .flux import FLUX_TRANSFORMER, FLUX_VAE, RELEASE_RANK, SIGLIP_SO400M

    paths = {"flux": os.path.join(root, "flux"), "redux": os.path.join(root, "redux"),
             "anystory": os.path.join(root, "anystory_flux.bin")}
    if shape == "tiny":
        c = tiny_flux_components(0)
        siglip, redux_base, rank, siglip_dim = c.pop("image_encoder"), tiny_redux_base(), 4, 16
        c.pop("feature_extractor")
        FluxPipeline(**c).save_pretrained(paths["flux"])
        transformer = c["transformer"]
    else:
        vocab = len(clip_vocab_and_merges()[0])
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER)
                components = dict(
                    transformer=transformer, vae=AutoencoderKL(**FLUX_VAE),
                    text_encoder=CLIPTextModel(CLIPTextConfig(
                        vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, projection_dim=768, bos_token_id=49406, eos_token_id=49407,
                        pad_token_id=49407)),
                    text_encoder_2=T5EncoderModel(T5Config(
                        vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu", pad_token_id=49407, eos_token_id=49407)))
                siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M))
                redux_base = ReduxImageEncoder(redux_dim=SIGLIP_SO400M["hidden_size"], txt_in_features=4096)
        finally:
            torch.set_default_dtype(default)
        FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096), tokenizer=offline_clip_tokenizer(), tokenizer_2=offline_clip_tokenizer(),
            **components).save_pretrained(paths["flux"])
        rank, siglip_dim = RELEASE_RANK, SIGLIP_SO400M["hidden_size"]
        del components
    siglip.save_pretrained(os.path.join(paths["redux"], "image_encoder"))
    redux_base.save_pretrained(os.path.join(paths["redux"], "image_embedder"))
    torch.save(random_released_state_dict(transformer, redux_dim=siglip_dim, rank=rank, std=0.01),
               paths["anystory"])
    del transformer, siglip, redux_base
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths


def _peak(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1024 ** 3
    with open("/proc/self/status") as f:  # CPU smoke test: the process's RSS high-water mark
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024 ** 2


def run_mode(mode: str, paths: dict, shape: str, device: str, steps: int, subjects: int) -> dict:
    from anystory import Subject
    from anystory.flux import AnyStoryFluxPipeline
    from anystory.flux.low_vram import apply_offload
    from anystory.flux.tiny_flux import TINY_REFERENCE_SIZE

    quantization, offload = MODES[mode]
    extra = {"reference_size": TINY_REFERENCE_SIZE} if shape == "tiny" else {}
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe = AnyStoryFluxPipeline.from_released(paths["flux"], paths["redux"], paths["anystory"], torch_dtype=dtype,
                                              quantization=quantization, **extra)
    apply_offload(pipe, offload, device)
    load_s, load_peak = time.perf_counter() - start, _peak(device)
    pipe.set_progress_bar_config(disable=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    rng = np.random.RandomState(0)
    subject_list = [Subject(rng.randint(0, 255, (256, 256, 3)).astype(np.uint8)) for _ in range(subjects)]
    ends = []

    def on_step_end(p, i, t, tensors):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        return {}

    size = 64 if shape == "tiny" else 512
    pipe("a photo of two friends", subjects=subject_list, height=size, width=size, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step_end, output_type="pil")
    step_s = statistics.median(np.diff(ends)) if len(ends) > 2 else float("nan")
    row = {"mode": mode, "quantization": quantization, "offload": offload, "peak_load_gib": load_peak,
           "peak_generate_gib": _peak(device), "step_s": step_s, "load_s": load_s}
    del pipe
    gc.collect()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device(p, "cuda")
    add_shape(p, "real")
    p.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, of {sorted(MODES)}")
    p.add_argument("--steps", type=int, default=4)
    add_subject_count(p)
    p.add_argument("--root", default=None, help="where the random-weight folders go (default: a temporary folder)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown modes {unknown}; choose from {sorted(MODES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu --shape tiny for a smoke test)", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, {props.total_memory / 1024 ** 3:.1f} GiB")
    with tempfile.TemporaryDirectory(dir=args.root) as root:
        start = time.perf_counter()
        paths = write_folders(root, args.shape, args.device)
        print(f"random-weight folders written in {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for mode in modes:
            if not args.device.startswith("cuda") and mode not in CPU_MODES:
                print(f"{mode}: skipped (needs CUDA)", flush=True)
                continue
            try:
                rows.append(run_mode(mode, paths, args.shape, args.device, args.steps, args.subjects))
            except Exception as e:  # report and go on: one mode's failure is itself a result
                rows.append({"mode": mode, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(rows[-1], flush=True)
    unit = "GiB" if args.device.startswith("cuda") else "GiB RSS"
    print(f"\n| mode | quantization | offload | peak loading ({unit}) | peak generating ({unit}) | s / step | load s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | {r['error']} | | | | | |")
        else:
            print(f"| {r['mode']} | {r['quantization']} | {r['offload']} | {r['peak_load_gib']:.1f} | "
                  f"{r['peak_generate_gib']:.1f} | {r['step_s']:.3f} | {r['load_s']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
