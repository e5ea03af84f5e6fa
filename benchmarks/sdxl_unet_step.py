"""Per-step cost of AnyStory's processors inside the real-shape SDXL UNet, without the rest of the pipeline.

A step's cost depends on the *shapes* of the subject conditioning, not on its values, so this times UNet
forwards with random reference features and tokens of the real shapes (reference 512x512 -> 64x64 latents,
64 semantic tokens, 1 routing token per subject) against the same UNet with diffusers' own processors. The
ReferenceNet and QFormers are built on the meta device (they run once per call, not per step; the pipeline
benchmark counts their passes), so the measurement fits a CPU machine's memory: the full real-shape pipeline
(two UNet-sized networks, both text encoders, ViT-H) does not fit in 24 GiB in float32.

Each call of a config resets the conditioning (as a pipeline call does) and runs ``steps`` forwards; the first
projects the reference features to keys/values, the later ones reuse them, so the median is the steady step.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from anystory.sdxl.adapter_sdxl import AnyStorySDXLAdapter, cross_attention_layers

from .common import SUBJECTS, interleaved
from .sdxl import SDXL_UNET


def self_attention_tokens(unet, sample, t, text, added) -> dict:
    """Token count entering every self-attention layer, from one hooked forward with diffusers' processors."""
    tokens = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: tokens.__setitem__(name, args[0].shape[1]))
             for name, m in unet.named_modules() if name.endswith("attn1")]
    try:
        with torch.no_grad():
            unet(sample, t, text, added_cond_kwargs=added)
    finally:
        for h in hooks:
            h.remove()
    return tokens


def random_conditioning(adapter, unet, tokens: dict, n: int, area_ratio: float, batch: int, latent_hw, dtype, device):
    """Random state fields of the real shapes; a layer with L image tokens gets ``L * area_ratio`` per subject."""
    cfg, modules = adapter.config, dict(unet.named_modules())
    feats = {name: torch.randn(1, n, round(count * area_ratio), modules[name].to_q.in_features, dtype=dtype,
                               device=device) for name, count in tokens.items()}
    cross = unet.config.cross_attention_dim
    return dict(num_subjects=n, reference_features=feats,
                semantic_tokens=torch.randn(1, n, cfg.num_semantic_tokens, cross, dtype=dtype, device=device),
                semantic_uncond_tokens=torch.randn(1, n, cfg.num_semantic_tokens, cross, dtype=dtype, device=device),
                routing_tokens=torch.randn(1, n + 1, cfg.routing_dim, dtype=dtype, device=device),
                scales=torch.ones(n, device=device), reference_scales=torch.ones(n, device=device),
                cfg=batch == 2, latent_hw=latent_hw)


def run(height: int = 1024, reference: int = 512, subjects=SUBJECTS, batch: int = 2, steps: int = 2,
        repeats: int = 1, device: str = "cpu", dtype=torch.float32, unet_config: dict = SDXL_UNET,
        adapter_config: dict | None = None) -> list:
    """``unet_config`` / ``adapter_config`` default to SDXL's and AnyStory's real sizes (tests pass tiny ones)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        unet = UNet2DConditionModel(**unet_config).to(device).eval()
        with torch.device("meta"):
            adapter = AnyStorySDXLAdapter(dict(unet.config), cross_attention_layers(unet), image_embed_dim=1280,
                                          **(adapter_config or {}))
    finally:
        torch.set_default_dtype(default)
    adapter.layer_conditioning.to_empty(device=device)  # the only per-step parameters: real, random
    for m in adapter.layer_conditioning.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    adapter.layer_conditioning.to(dtype)

    h = height // 8
    sample = torch.randn(batch, unet.config.in_channels, h, h, dtype=dtype, device=device)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=dtype, device=device)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(batch, pooled, dtype=dtype, device=device),
             "time_ids": torch.tensor([[height, height, 0, 0, height, height]] * batch, dtype=dtype, device=device)}
    t = torch.tensor([500], device=device)
    unet.set_attn_processor(AttnProcessor2_0())
    tokens = self_attention_tokens(unet, sample, t, text, added)
    area_ratio = (reference / height) ** 2

    def config(n):
        def call(seed):
            if n is None:
                unet.set_attn_processor(AttnProcessor2_0())
            else:
                adapter.attach(unet)
                values = random_conditioning(adapter, unet, tokens, n, area_ratio, batch, (h, h), dtype,
                                             device) if n else {}
                adapter.start(adapter.conditioning(**values))
            with torch.no_grad():
                for _ in range(1 if seed < 0 else steps):
                    unet(sample, t, text, added_cond_kwargs=added)
        return ("bare diffusers" if n is None else f"anystory {n} subjects", n or 0, call)

    rows = interleaved([config(None)] + [config(n) for n in subjects], unet, device, repeats, passes=lambda: 0)
    adapter.start()
    shape = f"real UNet step {height}px, ref {reference}px, batch {batch}"
    # the ReferenceNet does not run here (see the module docstring): its passes are the pipeline benchmark's
    return [{"backbone": "sdxl", "shape": shape, **row, "reference_passes_per_call": float("nan")} for row in rows]
