"""The decoupled, instance-aware subject router: where in the image may each subject act?

In every cross-attention layer a tiny mask decoder turns the routing tokens (one per subject, plus one for the
background, from the routing QFormer) into a map over N+1 classes for each latent position:

1. coarse map: projected inner product of routing tokens and the layer's latent;
2. the routing tokens cross-attend to the latent, masked by their coarse map (log-sigmoid of each class's own
   coarse logit, so it stays differentiable), which refines each token with what its region looks like;
3. refined logits: inner product of the refined tokens and the latent.

Each class's logit depends on its own token and the latent only (the coarse mask is per class, not a softmax
over the classes). With the decision rule below that makes routing *removal-invariant*: a subject that wins no
position leaves every other class's decision exactly as in the call without it, which is what lets
``attention_processors.py`` guarantee that a subject routed nowhere changes nothing.

Inference makes the map hard with :func:`anystory.routing.route_decision` (the rule both backbones share).
Training uses straight-through Gumbel-softmax, so the forward pass is one-hot like inference while gradients
reach the router; the soft probabilities feed the routing loss.

Background logit adjustment (inference only; 0 = the paper's plain argmax). The router learns the posterior
p(class | noisy latent). Early in sampling the latent says little, so the posterior is the class prior, and where
subjects cover a small part of the training images the background wins *every* position: no subject condition
acts until the image has already formed without it. Subtracting ``background_bias`` = log(p_background /
p_subject) from the background logit before the argmax (post-hoc logit adjustment, Menon et al., ICLR 2021)
turns the decision into a likelihood ratio; late in sampling, where the router is confident, it changes little.
Stage 2 measures the two priors on its training data and stores the value with the weights.
The gating that uses these maps lives in ``attention_processors.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..routing import route_decision


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
        log_mask = F.logsigmoid(coarse).unsqueeze(1)  # per class: no class's mask depends on another's token
        attended = F.scaled_dot_product_attention(self.attn_q(t).unsqueeze(1), self.attn_k(x).unsqueeze(1),
                                                  self.attn_v(x).unsqueeze(1), attn_mask=log_mask).squeeze(1)
        t = t + self.attn_out(attended)
        t = t + self.ff(t)
        return torch.einsum("bkd,bld->bkl", t, x) * self.scale


def routing_maps(logits: torch.Tensor, training: bool, tau: float = 1.0, background_bias: float = 0.0):
    """(gating map, soft map) from router logits ``[B, K, L]`` (class ``K-1`` the background); the gating map is
    one-hot over ``K`` in the forward pass. ``background_bias`` applies to the inference decision only."""
    soft = logits.float().softmax(dim=1)
    if training:
        hard = F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=1)
    else:
        adjusted = logits.float()
        if background_bias:
            adjusted = torch.cat([adjusted[:, :-1], adjusted[:, -1:] - background_bias], dim=1)
        hard = F.one_hot(route_decision(adjusted), logits.shape[1]).movedim(-1, 1).float()
    return hard.to(logits.dtype), soft
