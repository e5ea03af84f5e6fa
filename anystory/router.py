"""The decoupled, instance-aware subject router: where in the image may each subject act?

In every cross-attention layer a tiny mask decoder turns the routing tokens (one per subject, plus one for the
background, from the routing QFormer) into a map over N+1 classes for each latent position:

1. coarse map: projected inner product of routing tokens and the layer's latent;
2. the routing tokens cross-attend to the latent, masked by their coarse map (log-mask, so it stays
   differentiable), which refines each token with what its region looks like;
3. refined logits: inner product of the refined tokens and the latent.

Inference makes the map hard (argmax one-hot). Training uses straight-through Gumbel-softmax, so the forward
pass is one-hot like inference while gradients reach the router; the soft probabilities feed the routing loss.
The gating that uses these maps lives in ``attention_processors.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RouterLayer(nn.Module):
    """One cross-attention layer's mask decoder: latent ``[B, L, C]`` + tokens ``[B, K, D]`` -> logits ``[B, K, L]``."""

    def __init__(self, latent_dim: int, token_dim: int, dim: int = 64):
        super().__init__()
        self.scale = dim**-0.5
        self.latent_norm = nn.LayerNorm(latent_dim)
        self.latent_proj = nn.Linear(latent_dim, dim)
        self.token_proj = nn.Linear(token_dim, dim)
        self.attn_q = nn.Linear(dim, dim, bias=False)
        self.attn_k = nn.Linear(dim, dim, bias=False)
        self.attn_v = nn.Linear(dim, dim, bias=False)
        self.attn_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, latent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = self.latent_proj(self.latent_norm(latent))
        t = self.token_proj(tokens.to(x.dtype))
        coarse = torch.einsum("bkd,bld->bkl", t, x) * self.scale
        log_mask = torch.log_softmax(coarse, dim=1).unsqueeze(1)
        attended = F.scaled_dot_product_attention(self.attn_q(t).unsqueeze(1), self.attn_k(x).unsqueeze(1),
                                                  self.attn_v(x).unsqueeze(1), attn_mask=log_mask).squeeze(1)
        t = t + self.attn_out(attended)
        t = t + self.ff(t)
        return torch.einsum("bkd,bld->bkl", t, x) * self.scale


def routing_maps(logits: torch.Tensor, training: bool, tau: float = 1.0):
    """(gating map, soft map) from router logits ``[B, K, L]``; the gating map is one-hot over ``K`` in the forward pass."""
    soft = logits.float().softmax(dim=1)
    if training:
        hard = F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=1)
    else:
        hard = F.one_hot(logits.argmax(dim=1), logits.shape[1]).movedim(-1, 1).float()
    return hard.to(logits.dtype), soft
