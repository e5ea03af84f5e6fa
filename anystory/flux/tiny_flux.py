"""FLUX-shaped components small enough for CPU, built in code (as diffusers' own FLUX tests do), and random
AnyStory weights in the released file's layout, for tests and benchmarks. No hub access: both tokenizers are
CLIP's real BPE vocabulary rebuilt offline (the T5 side only needs token ids)."""
from __future__ import annotations

from typing import Optional

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from transformers import (CLIPTextConfig, CLIPTextModel, SiglipImageProcessor, SiglipVisionConfig,
                          SiglipVisionModel, T5Config, T5EncoderModel)

from ..tokenizer import clip_vocab_and_merges, offline_clip_tokenizer
from .release_export import released_shapes
from .weights_flux import ROUTER_EMBEDDER_PREFIX

#: reference resolution matching the tiny VAE (32 px -> 16x16 latents -> 8x8 = 64 reference tokens)
TINY_REFERENCE_SIZE = 32
TINY_IMAGE_SIZE = 32
SIGLIP_HIDDEN = 16
TEXT_DIM = 32


def tiny_flux_components(seed: int = 0, single_blocks: int = 1) -> dict:
    """Keyword arguments for ``FluxPipeline`` (and ``AnyStoryFluxPipeline``, plus SigLIP): 1 double +
    ``single_blocks`` single blocks (2 puts a single block before the last one, as in FLUX.1-dev), 2 heads of 16, T5/CLIP width 32, a 2-level VAE (factor 2), SigLIP 54 px / patch 2 (27x27 patches)."""
    vocab_size = len(clip_vocab_and_merges()[0])
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=single_blocks,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=vocab_size,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32, hidden_act="gelu",
        max_position_embeddings=77))
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=1,
                                             num_heads=4, pad_token_id=49407, eos_token_id=49407))
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(sample_size=TINY_IMAGE_SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed + 4)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=SIGLIP_HIDDEN, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2, image_size=54,
                                                         patch_size=2))
    for model in (transformer, text_encoder, text_encoder_2, vae, image_encoder):
        model.eval()  # built in code, so in training mode: T5's dropout would make runs differ
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae, "transformer": transformer,
        "text_encoder": text_encoder, "tokenizer": offline_clip_tokenizer(),
        "text_encoder_2": text_encoder_2, "tokenizer_2": offline_clip_tokenizer(),
        "image_encoder": image_encoder, "feature_extractor": SiglipImageProcessor(size={"height": 54, "width": 54}),
    }


def tiny_redux_base(seed: int = 5) -> ReduxImageEncoder:
    """Stand-in for FLUX.1-Redux-dev's ``image_embedder`` at the tiny widths."""
    torch.manual_seed(seed)
    return ReduxImageEncoder(redux_dim=SIGLIP_HIDDEN, txt_in_features=TEXT_DIM).eval()


def random_released_state_dict(transformer, redux_dim: int = SIGLIP_HIDDEN, rank: int = 4, seed: int = 0,
                               std: float = 0.1, lora_bias: bool = False,
                               generator: Optional[torch.Generator] = None) -> dict:
    """Random weights in the layout of ``anystory_flux.bin`` (see ``weights_flux``) for ``transformer``."""
    g = generator or torch.Generator().manual_seed(seed)
    shapes = released_shapes(transformer, redux_dim, rank, lora_bias)
    router = shapes["router"]
    processors = [k for k in router if ".attn.processor." in k]
    embedder = [k for k in router if k.startswith(ROUTER_EMBEDDER_PREFIX)]
    lora = [k for k in router if k not in processors and k not in embedder]
    # drawn in the order the tests' weights have always been drawn in
    order = [("router", processors + embedder + lora), ("ref", list(shapes["ref"])), ("redux", list(shapes["redux"]))]
    drawn = {(group, key): torch.randn(*shapes[group][key], generator=g) * std for group, keys in order for key in keys}
    return {group: {key: drawn[group, key] for key in keys} for group, keys in shapes.items()}


def tiny_anystory_flux_pipeline(seed: int = 0, load: bool = True, single_blocks: int = 1):
    """An ``AnyStoryFluxPipeline`` on :func:`tiny_flux_components`, with random weights in the released layout
    (untrained: its images mean nothing; it runs every code path of the real checkpoint in seconds on CPU)."""
    from .pipeline_flux import AnyStoryFluxPipeline

    pipe = AnyStoryFluxPipeline(**tiny_flux_components(seed, single_blocks), reference_size=TINY_REFERENCE_SIZE)
    if load:
        pipe.load_anystory_weights(random_released_state_dict(pipe.transformer, seed=seed),
                                   redux_base=tiny_redux_base())
    return pipe
