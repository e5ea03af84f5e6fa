"""Gated, pooled Redux projection: SigLIP patch features -> a few text-space tokens per subject.

FLUX.1-Redux-dev maps each of SigLIP's 27x27 patch features to one T5-space token (729 per image). AnyStory
keeps that projection, adds a low-rank residual to both of its linear layers, and pools the result with
learned per-patch gates: a gate-weighted average over k x k windows (27x27 -> 9x9 = 81 tokens for the
semantic "redux" condition, 27x27 -> 3x3 = 9 tokens for the router). Patches outside the subject's mask do
not produce a token: the pooled mask zeroes them.

Parameter names follow the authors' released file (``redux_up_lora_A``, ``gate_proj`` ...), so its ``redux``
group and the ``router_embedder.*`` part of its ``router`` group load with ``load_state_dict``. The low-rank
residuals here are plain linear layers of this module (as in the release), not PEFT adapters: they belong to
the Redux projection, not to the transformer.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from diffusers.configuration_utils import register_to_config


class AnyStoryReduxEncoder(ReduxImageEncoder):
    """``ReduxImageEncoder`` + low-rank residuals + gated average pooling to ``output_size`` x ``output_size``."""

    @register_to_config
    def __init__(self, redux_dim: int = 1152, txt_in_features: int = 4096, lora_rank: int = 128,
                 lora_bias: bool = True, output_size: int = 9) -> None:
        super().__init__(redux_dim=redux_dim, txt_in_features=txt_in_features)
        self.redux_up_lora_A = nn.Linear(redux_dim, lora_rank, bias=False)
        self.redux_up_lora_B = nn.Linear(lora_rank, txt_in_features * 3, bias=lora_bias)
        self.redux_down_lora_A = nn.Linear(txt_in_features * 3, lora_rank, bias=False)
        self.redux_down_lora_B = nn.Linear(lora_rank, txt_in_features, bias=lora_bias)
        self.gate_proj = nn.Linear(txt_in_features, 1)
        self.output_size = output_size

    @property
    def tokens_per_image(self) -> int:
        return self.output_size * self.output_size

    def forward(self, features: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
        """features: ``[b, g*g, redux_dim]`` SigLIP patches; patch_mask: ``[b, g*g, 1]`` (1 = subject patch).
        Returns ``[b, output_size**2, txt_in_features]``."""
        b, n, _ = features.shape
        g = int(round(n ** 0.5))
        if g * g != n:
            raise ValueError(f"expected a square grid of SigLIP patches, got {n} tokens")
        x = self.redux_up(features) + self.redux_up_lora_B(self.redux_up_lora_A(features))
        x = F.silu(x)
        x = self.redux_down(x) + self.redux_down_lora_B(self.redux_down_lora_A(x))
        gate = torch.sigmoid(self.gate_proj(x))  # [b, n, 1]
        size = (self.output_size, self.output_size)
        pooled = F.adaptive_avg_pool2d((x * gate).transpose(1, 2).reshape(b, -1, g, g), size)
        pooled_gate = F.adaptive_avg_pool2d(gate.transpose(1, 2).reshape(b, 1, g, g), size)
        keep = F.adaptive_avg_pool2d(patch_mask.transpose(1, 2).reshape(b, 1, g, g).to(x.dtype), size) > 0
        # avg(x * gate) / avg(gate): a gate-weighted mean of each window
        out = pooled / (pooled_gate + 1e-6) * keep.to(x.dtype)
        return out.flatten(2).transpose(1, 2)


def released_embedder(sd: dict, output_size: int, base) -> AnyStoryReduxEncoder:
    """An encoder from one released group (``redux``, or ``router_embedder.*`` without its prefix); ``base()``
    gives FLUX.1-Redux-dev's ``redux_up`` / ``redux_down`` when the group lacks them (the release builds on them)."""
    rank, redux_dim = sd["redux_up_lora_A.weight"].shape
    enc = AnyStoryReduxEncoder(redux_dim=redux_dim, txt_in_features=sd["gate_proj.weight"].shape[1],
                               lora_rank=rank, lora_bias=True, output_size=output_size)
    has_base = all(k in sd for k in ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias"))
    enc.load_state_dict(sd if has_base else {**base(), **sd}, strict=True)
    return enc.eval()
