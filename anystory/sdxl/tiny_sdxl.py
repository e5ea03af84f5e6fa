"""SDXL-shaped components small enough for CPU, built in code (the way diffusers' own tests do).

They keep SDXL's structure - two CLIP text encoders (the second with projection, pooled), ``text_time`` added
conditioning, linear projections in the transformers, several transformer layers per block, a CLIP vision
encoder - so the tests and the miniature run exactly the code path of the real checkpoint. The tokenizers are
CLIP's real BPE vocabulary, built offline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection,
                          CLIPVisionConfig, CLIPVisionModelWithProjection)

from ..tokenizer import clip_vocab_and_merges, offline_clip_tokenizer


@dataclass
class TinySpec:
    """Sizes of the tiny model; the defaults are the test configuration."""

    image_size: int = 64  # pixels; the UNet's sample size is image_size // vae factor
    block_out_channels: Sequence[int] = (32, 64)
    layers_per_block: int = 1
    transformer_layers_per_block: Sequence[int] = (1, 2)
    attention_head_dim: Sequence[int] = (2, 4)
    text_hidden: int = 32
    text_layers: int = 2
    vae_channels: Sequence[int] = (16, 32)
    vae_latent_channels: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_image_size: int = 32
    vision_patch: int = 8
    addition_time_embed_dim: int = 8
    first_block_cross_attention: bool = False  # SDXL has none at its highest resolution; the miniature's 16x16 needs it


def tiny_sdxl_components(seed: int = 0, spec: TinySpec = TinySpec()) -> dict:
    """Keyword arguments for ``StableDiffusionXLPipeline`` / ``AnyStorySDXLPipeline``."""
    vocab_size = len(clip_vocab_and_merges()[0])
    torch.manual_seed(seed)
    cross_dim = 2 * spec.text_hidden
    unet = UNet2DConditionModel(
        sample_size=spec.image_size // 2 ** (len(spec.vae_channels) - 1),
        in_channels=spec.vae_latent_channels,
        out_channels=spec.vae_latent_channels,
        block_out_channels=tuple(spec.block_out_channels),
        layers_per_block=spec.layers_per_block,
        down_block_types=(("CrossAttnDownBlock2D",) if spec.first_block_cross_attention else ("DownBlock2D",))
        + ("CrossAttnDownBlock2D",) * (len(spec.block_out_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(spec.block_out_channels) - 1)
        + (("CrossAttnUpBlock2D",) if spec.first_block_cross_attention else ("UpBlock2D",)),
        attention_head_dim=tuple(spec.attention_head_dim),
        transformer_layers_per_block=tuple(spec.transformer_layers_per_block),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=spec.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * spec.addition_time_embed_dim + spec.text_hidden,
        cross_attention_dim=cross_dim,
        norm_num_groups=8,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=spec.vae_latent_channels,
        block_out_channels=tuple(spec.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        norm_num_groups=8, sample_size=spec.image_size,
    )
    text_config = dict(hidden_size=spec.text_hidden, intermediate_size=2 * spec.text_hidden,
                       num_attention_heads=4, num_hidden_layers=spec.text_layers, vocab_size=vocab_size,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
                       projection_dim=spec.text_hidden, max_position_embeddings=77)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    torch.manual_seed(seed + 4)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=2 * spec.vision_hidden, num_attention_heads=4,
        num_hidden_layers=spec.vision_layers, image_size=spec.vision_image_size, patch_size=spec.vision_patch,
        projection_dim=spec.vision_hidden, num_channels=3))
    feature_extractor = CLIPImageProcessor(size={"shortest_edge": spec.vision_image_size},
                                           crop_size={"height": spec.vision_image_size, "width": spec.vision_image_size})
    return {
        "unet": unet, "scheduler": scheduler, "vae": vae,
        "text_encoder": text_encoder, "tokenizer": offline_clip_tokenizer(),
        "text_encoder_2": text_encoder_2, "tokenizer_2": offline_clip_tokenizer(pad_token="!"),
        "image_encoder": image_encoder, "feature_extractor": feature_extractor,
    }


#: AnyStory sizes matching :func:`tiny_sdxl_components` (the real defaults are the paper's).
TINY_ANYSTORY_CONFIG = dict(num_semantic_tokens=4, qformer_dim=32, qformer_depth=2, qformer_heads=2,
                            routing_dim=16, router_dim=16, reference_size=32)
