"""Sizes: every height and width ``StableDiffusionXLPipeline`` accepts (multiples of 8) also runs with subjects.

AnyStory's processors see a layer's positions as a flat sequence and recover its 2-D shape from the latent size
(``AnyStoryState.layer_hw``). The real SDXL UNet's layer layout is built from its config on the meta device (no
weights); its down-sampling convolutions give each attention level's shape, checked once against a meta forward.
"""
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from PIL import Image

from anystory import Subject
from anystory.sdxl.attention_processors import AnyStoryState, SDXLConditioning
from anystory.sdxl.pipeline_sdxl import AnyStorySDXLPipeline
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, TinySpec, tiny_sdxl_components

SIZES = range(8, 257, 8)
#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the entries that decide shapes).
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=[1, 2, 10],
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)


def _conv_out(n: int, conv) -> int:
    return (n + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1


def attention_shapes(unet, h: int, w: int) -> list:
    """Spatial shape of each attention level of ``unet`` for an ``h`` x ``w`` latent, from its own modules."""
    shapes = []
    for block in unet.down_blocks:
        if getattr(block, "attentions", None):
            shapes.append((h, w))
        for down in block.downsamplers or []:
            h, w = _conv_out(h, down.conv), _conv_out(w, down.conv)
    if getattr(unet.mid_block, "attentions", None) and (h, w) not in shapes:
        shapes.append((h, w))
    return shapes


def forward_shapes(unet, h: int, w: int, device) -> set:
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(tuple(args[0].shape[-2:])))
             for m in unet.modules() if isinstance(m, Transformer2DModel)]
    cross = unet.config.cross_attention_dim
    extra = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    try:
        with torch.no_grad():
            out = unet(torch.zeros(1, 4, h, w, device=device), torch.tensor(1.0, device=device),
                       torch.zeros(1, 7, cross, device=device),
                       added_cond_kwargs={"text_embeds": torch.zeros(1, extra, device=device),
                                          "time_ids": torch.zeros(1, 6, device=device)}).sample
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape[-2:] == (h, w)
    return seen


def _check_all_sizes(unet, vae_factor: int) -> int:
    checked = 0
    for height in SIZES:
        for width in SIZES:
            state = AnyStoryState(SDXLConditioning(latent_hw=(height // vae_factor, width // vae_factor)))
            for hw in attention_shapes(unet, *state.latent_hw):
                assert state.layer_hw(hw[0] * hw[1]) == hw, (height, width, hw)
                checked += 1
    return checked


def test_every_sdxl_size_against_the_real_unet_layout():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    # the layout read from the modules is what a forward really produces (latent 3x5: 24x40 pixels)
    assert forward_shapes(unet, 3, 5, "meta") == set(attention_shapes(unet, 3, 5)) == {(2, 3), (1, 2)}
    assert _check_all_sizes(unet, 8) == 2 * len(SIZES) ** 2
    state = AnyStoryState(SDXLConditioning(latent_hw=(3, 8)))  # 24x64 pixels: the size of the report
    assert state.layer_hw(2) == (1, 2) and state.layer_hw(8) == (2, 4)


TALL_SPEC = TinySpec(block_out_channels=(16, 32, 32), transformer_layers_per_block=(1, 1, 1),
                     attention_head_dim=(2, 2, 2), first_block_cross_attention=True)


def test_every_size_against_the_tiny_unets():
    for spec in (TinySpec(), TALL_SPEC):
        unet = tiny_sdxl_components(spec=spec)["unet"]
        for h, w in ((4, 4), (3, 5), (1, 7), (5, 32)):  # the module-read layout is the forward's
            assert forward_shapes(unet, h, w, "cpu") == set(attention_shapes(unet, h, w))
        assert _check_all_sizes(unet, 2) >= len(SIZES) ** 2


@pytest.fixture(scope="module")
def tall_pipe():
    pipe = AnyStorySDXLPipeline(**tiny_sdxl_components(spec=TALL_SPEC))
    pipe.vae_scale_factor = 8  # SDXL's own latent size for these pixel sizes (the tiny VAE's factor is 2)
    torch.manual_seed(0)
    pipe.init_anystory(**TINY_ANYSTORY_CONFIG)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("height, width", [(24, 64), (8, 8), (56, 8)])
def test_subjects_run_at_sizes_sdxl_accepts(tall_pipe, height, width):
    """A UNet with attention at three levels and odd latent sizes, through the whole pipeline with two subjects."""
    pipe = tall_pipe
    ref = np.full((20, 20, 3), 200, np.uint8)
    ref[5:15, 5:15] = (200, 20, 20)
    out = pipe("a star and a moon", subjects=[Subject(ref), Subject(Image.new("RGB", (16, 16), "blue"))],
               height=height, width=width, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
               generator=torch.Generator().manual_seed(0), return_routing_maps=True)
    assert out.images.shape[-2:] == (height // 8, width // 8)
    assert torch.isfinite(out.images).all() and len(out.routing_maps) == 2
