"""FLUX AnyStory against the bare diffusers ``FluxPipeline``: per-step latency, reference passes, peak memory.

The AnyStory weights are random in the released file's layout (``anystory_flux.bin`` cannot be downloaded here):
the cost of a step depends on the shapes of the conditioning, not on its values. ``--shape real`` builds
FLUX.1-dev's transformer and VAE, FLUX.1-Redux-dev's SigLIP (so400m) and rank-128 LoRAs as the release's loader
declares them; the text encoders keep only their output widths (one layer each), since they run once per call and
never inside a step. On CUDA the transformer has all its 19 double and 38 single blocks. On a CPU (12B parameters do
not fit in 24 GiB in float32) it keeps every real width but only 1 double and 2 single blocks, the real model's
19:38 proportion, so the per-step *ratio* is the real one up to the embedders around the blocks; the absolute
step time is not the real model's. The tiny shape runs anywhere.

The subjects (``references``): ``"segmented"`` (default) are the demo's example subjects (``assets/examples``,
RGBA, the alpha channel is the mask), as a user's photo arrives after matting: 42-62% of their reference tokens
lie inside the mask (the authors' 12 example masks: 40% on average), and the routed attention leaves the others
out. ``"whole"``: random images without a mask, every reference token inside (the most reference attention a call
can carry). Each row reports the share it ran with (``reference_tokens_in_mask``).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from diffusers import FluxPipeline

from anystory import Subject

from .common import SUBJECTS, ForwardTimer, interleaved

# black-forest-labs/FLUX.1-dev's transformer and VAE, written out so random-weight runs need no download.
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                        guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False)
SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     image_size=384, patch_size=14)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "examples")
SEGMENTED_SUBJECTS = ("red_striped_star", "blue_dotted_moon", "yellow_dotted_heart", "orange_striped_triangle")
REFERENCES = ("segmented", "whole")
RELEASE_RANK = 128  # the authors' loader: router_lora_rank=128, redux lora_rank=128
CPU_DEPTH = dict(num_layers=1, num_single_layers=2)  # real widths, the real 19:38 block proportion


def real_shape_pipeline(device: str, dtype):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import (CLIPTextConfig, CLIPTextModel, SiglipImageProcessor, SiglipVisionConfig,
                              SiglipVisionModel, T5Config, T5EncoderModel)

    from anystory.flux.pipeline_flux import AnyStoryFluxPipeline
    from anystory.flux.tiny_flux import random_released_state_dict
    from anystory.tokenizer import clip_vocab_and_merges, offline_clip_tokenizer

    vocab = len(clip_vocab_and_merges()[0])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # random init straight on the device, in the target dtype
            depth = {} if device.startswith("cuda") else CPU_DEPTH
            transformer = FluxTransformer2DModel(**{**FLUX_TRANSFORMER, **depth})
            vae = AutoencoderKL(**FLUX_VAE)
            clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=1, vocab_size=vocab, projection_dim=768,
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
            t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                         num_heads=64, pad_token_id=49407, eos_token_id=49407))
            siglip = SiglipVisionModel(SiglipVisionConfig(**SIGLIP_SO400M))
            redux_base = ReduxImageEncoder(redux_dim=SIGLIP_SO400M["hidden_size"], txt_in_features=4096)
    finally:
        torch.set_default_dtype(default)
    size = SIGLIP_SO400M["image_size"]
    pipe = AnyStoryFluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=vae.eval(), text_encoder=clip.eval(), tokenizer=offline_clip_tokenizer(), text_encoder_2=t5.eval(),
        tokenizer_2=offline_clip_tokenizer(), transformer=transformer.eval(), image_encoder=siglip.eval(),
        feature_extractor=SiglipImageProcessor(size={"height": size, "width": size}))
    weights = random_released_state_dict(transformer, redux_dim=SIGLIP_SO400M["hidden_size"], rank=RELEASE_RANK,
                                          std=0.01)
    pipe.load_anystory_weights(weights, redux_base=redux_base.eval())
    return pipe, 512


def build(shape: str, device: str, dtype):
    if shape == "tiny":
        from anystory.flux.tiny_flux import TINY_IMAGE_SIZE, tiny_anystory_flux_pipeline

        pipe, size = tiny_anystory_flux_pipeline(), TINY_IMAGE_SIZE * 2
        pipe.to(device=device, dtype=dtype)
    else:
        pipe, size = real_shape_pipeline(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, size


def reference_images(references: str) -> list:
    """Four subject images: the demo's segmented examples (RGBA files) or random images without a mask."""
    if references not in REFERENCES:
        raise ValueError(f"references must be one of {REFERENCES}, got {references!r}")
    if references == "segmented":
        return [os.path.join(EXAMPLES, f"{name}.png") for name in SEGMENTED_SUBJECTS]
    rng = np.random.RandomState(0)
    return [rng.randint(0, 255, (256, 256, 3)).astype(np.uint8) for _ in range(4)]


def run(shape: str = "tiny", device: str = "cpu", steps: int = 4, repeats: int = 3, dtype=None,
        height: int | None = None, subjects=SUBJECTS, references: str = "segmented") -> list:
    images = reference_images(references)
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    pipe, size = build(shape, device, dtype)
    size = height or size
    bare = FluxPipeline(**{k: v for k, v in pipe.components.items()
                           if k not in ("redux_embedder", "router_embedder")})
    bare.set_progress_bar_config(disable=True)
    state = pipe.anystory_state
    reference_rows = [0]
    in_mask = {0: float("nan")}
    start = state.start

    def start_and_note(conditioning):
        in_mask[conditioning.num_subjects] = float(conditioning.ref_mask.float().mean())
        start(conditioning)

    def count_reference_rows(module, args, kwargs):
        if state.in_ref_pass:
            reference_rows[0] += kwargs["hidden_states"].shape[0]

    def config(n):
        target, extra = (bare, {}) if n is None else (pipe, {"subjects": [Subject(im) for im in images[:n]]})

        def call(seed):
            target(prompt="a photo", height=size, width=size, guidance_scale=3.5, output_type="latent",
                   num_inference_steps=1 if seed < 0 else steps, generator=torch.Generator().manual_seed(seed % 2**31),
                   **extra)
        return ("bare diffusers" if n is None else f"anystory {n} subjects", n or 0, call)

    state.start = start_and_note
    hook = pipe.transformer.register_forward_pre_hook(count_reference_rows, with_kwargs=True)
    # once per call, apart from the steps: the reference pass (the transformer over the references), SigLIP,
    # the redux and router-token embedders, the VAE encoding the references
    once = {"reference_pass_ms": ForwardTimer(pipe.transformer, device, skip=lambda: not state.in_ref_pass),
            "siglip_ms": ForwardTimer(pipe.image_encoder, device),
            "redux_ms": ForwardTimer(pipe.redux_embedder, device),
            "router_tokens_ms": ForwardTimer(pipe.router_embedder, device),
            "vae_encode_ms": ForwardTimer(pipe.vae.encoder, device)}
    try:
        rows = interleaved([config(n) for n in (None, *subjects)], pipe.transformer, device, repeats,
                           passes=lambda: reference_rows[0], skip=lambda: state.in_ref_pass, per_call=once)
    finally:
        del state.start
        hook.remove()
        for timer in once.values():
            timer.remove()
    depth = pipe.transformer.config
    if shape == "real" and depth.num_layers != FLUX_TRANSFORMER["num_layers"]:
        shape = f"real widths, {depth.num_layers} double + {depth.num_single_layers} single blocks"
    return [{"backbone": "flux", "shape": shape, **row, "references": references,
             "reference_tokens_in_mask": in_mask.get(row["subjects"], float("nan"))} for row in rows]
