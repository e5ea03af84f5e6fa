"""ReferenceNet: the fine-detail subject encoder.

A copy of the denoising UNet (same config, optionally its weights) with cross-attention switched off, run once
at t=0 on the VAE latent of the segmented reference plus a subject-mask channel. It yields, for every
self-attention layer, the hidden states entering that layer; the denoising UNet's self-attention then appends
them as extra keys/values (see ``AnyStorySelfAttnProcessor``). Cross-attention is "removed" by a processor that
returns zeros, so the block's residual add leaves the hidden states untouched - no forked UNet class.
"""
from __future__ import annotations

from typing import Dict

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn


class _CaptureSelfAttention:
    """Records the hidden states entering a self-attention layer, then attends as usual."""

    def __init__(self, name: str, store: Dict[str, torch.Tensor]):
        self.name, self.store, self.inner = name, store, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        self.store[self.name] = hidden_states
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class _NoCrossAttention:
    """Zero output: the transformer block's residual then skips cross-attention entirely."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return torch.zeros_like(hidden_states)


def self_attention_layer_names(unet: UNet2DConditionModel) -> list:
    """Module names of the UNet's self-attention layers (``...attn1``), in forward order."""
    return [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn1.processor")]


class ReferenceNet(nn.Module):
    """Wraps a ``UNet2DConditionModel`` built from the base UNet's config with one extra (mask) input channel."""

    def __init__(self, unet_config: dict):
        super().__init__()
        config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        self.latent_channels = config["in_channels"]
        config["in_channels"] = self.latent_channels + 1
        self.unet = UNet2DConditionModel.from_config(config)
        self.layer_names = self_attention_layer_names(self.unet)
        self._captured: Dict[str, torch.Tensor] = {}
        processors = {}
        for name in self.unet.attn_processors:
            layer = name[: -len(".processor")]
            processors[name] = _CaptureSelfAttention(layer, self._captured) if layer.endswith("attn1") else _NoCrossAttention()
        self.unet.set_attn_processor(processors)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel) -> "ReferenceNet":
        """Initialise from a real UNet's weights; the new mask channel of ``conv_in`` starts at zero."""
        net = cls(unet.config)
        state = dict(unet.state_dict())
        w = state["conv_in.weight"]
        state["conv_in.weight"] = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1)
        net.unet.load_state_dict(state)
        return net.to(device=unet.device, dtype=unet.dtype)

    def forward(self, latents: torch.Tensor, masks: torch.Tensor, image_size: int) -> Dict[str, torch.Tensor]:
        """``latents [n, C, h, w]``, ``masks [n, 1, h, w]`` -> {self-attention layer name: ``[n, tokens, width]``}."""
        n = latents.shape[0]
        cfg = self.unet.config
        device, dtype = latents.device, latents.dtype
        cross = torch.zeros(n, 1, cfg.cross_attention_dim, device=device, dtype=dtype)
        added = None
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            time_ids = torch.tensor([image_size, image_size, 0, 0, image_size, image_size], device=device, dtype=dtype)
            added = {"text_embeds": torch.zeros(n, text_dim, device=device, dtype=dtype),
                     "time_ids": time_ids.expand(n, -1)}
        self._captured.clear()
        try:
            self.unet(torch.cat([latents, masks.to(dtype)], dim=1), torch.zeros(n, device=device), cross,
                      added_cond_kwargs=added, return_dict=False)
            return dict(self._captured)
        finally:
            self._captured.clear()
