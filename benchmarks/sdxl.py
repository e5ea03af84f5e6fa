"""SDXL AnyStory against the bare diffusers pipeline: per-step latency, reference passes, peak memory."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from anystory import AnyStorySDXLPipeline, Subject

from .common import SUBJECTS, CallCounter, interleaved

# stabilityai/stable-diffusion-xl-base-1.0's shapes, written out so random-weight runs need no download.
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
SDXL_VAE = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, force_upcast=True)


def real_shape_components(dtype) -> dict:
    """SDXL's real architecture with random weights; the image encoder is IP-Adapter's ViT-H/14."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                              CLIPVisionConfig, CLIPVisionModelWithProjection)

    from anystory.tokenizer import offline_clip_tokenizer

    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                       num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu",
                                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                     num_hidden_layers=32, projection_dim=1280, hidden_act="gelu",
                                                     bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_attention_heads=16, num_hidden_layers=32,
                                                            image_size=224, patch_size=14, projection_dim=1024))
    comps = dict(unet=UNet2DConditionModel(**SDXL_UNET), vae=AutoencoderKL(**SDXL_VAE), text_encoder=te1,
                 text_encoder_2=te2, tokenizer=offline_clip_tokenizer(),
                 tokenizer_2=offline_clip_tokenizer(pad_token="!"), image_encoder=vision,
                 feature_extractor=CLIPImageProcessor(),
                 scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                  steps_offset=1, timestep_spacing="leading"))
    return {k: (v.to(dtype) if isinstance(v, torch.nn.Module) else v) for k, v in comps.items()}


def build(shape: str, device: str, dtype):
    if shape == "tiny":
        from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, TinySpec, tiny_sdxl_components

        comps = tiny_sdxl_components(0, TinySpec(image_size=128))
        config, size = TINY_ANYSTORY_CONFIG, 128
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the target dtype: two fp32 SDXL UNets would not fit in 24 GiB
        try:
            comps = real_shape_components(dtype)
        finally:
            torch.set_default_dtype(default)
        config, size = {}, 1024
    pipe = AnyStorySDXLPipeline(**comps)
    default = torch.get_default_dtype()
    torch.set_default_dtype(pipe.unet.dtype)
    try:
        pipe.init_anystory(**config)
    finally:
        torch.set_default_dtype(default)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, size


def run(shape: str = "tiny", device: str = "cpu", steps: int = 4, repeats: int = 3, dtype=None,
        height: int | None = None, subjects=SUBJECTS) -> list:
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    if shape == "real" and not device.startswith("cuda"):
        # the real-shape pipeline does not fit a CPU machine's memory in float32: time the UNet step alone
        from .sdxl_unet_step import run as unet_step

        return unet_step(height or 1024, subjects=subjects, steps=steps, repeats=repeats, device=device, dtype=dtype)
    pipe, size = build(shape, device, dtype)
    size = height or size
    bare = StableDiffusionXLPipeline(**{k: v for k, v in pipe.components.items() if k != "anystory"})
    bare.set_progress_bar_config(disable=True)
    rng = np.random.RandomState(0)
    images = [rng.randint(0, 255, (256, 256, 3)).astype(np.uint8) for _ in range(4)]
    counter = CallCounter(pipe.anystory.reference_net)

    def config(n):
        target, extra = (bare, {}) if n is None else (pipe, {"subjects": [Subject(im) for im in images[:n]]})

        def call(seed):
            if n is None:  # the bare pipeline shares the UNet: give it diffusers' own processors back
                pipe.unet.set_attn_processor(AttnProcessor2_0())
            else:
                pipe.anystory.attach(pipe.unet)
            target(prompt="a photo", height=size, width=size, guidance_scale=5.0, output_type="latent",
                   num_inference_steps=1 if seed < 0 else steps, generator=torch.Generator().manual_seed(seed % 2**31),
                   **extra)
        return ("bare diffusers" if n is None else f"anystory {n} subjects", n or 0, call)

    try:
        rows = interleaved([config(n) for n in (None, *subjects)], pipe.unet, device, repeats,
                           passes=lambda: counter.items)
    finally:
        counter.remove()
        pipe.anystory.attach(pipe.unet)
    return [{"backbone": "sdxl", "shape": shape, **row} for row in rows]
