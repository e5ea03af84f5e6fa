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
Stage 2 measures the two priors on its training data and stores the value, times Menon et al.'s tau
(``stage2.logit_adjustment_tau``), with the weights.

One region per subject (inference only, ``single_region``; off = the paper's rule). An object forms where the
sampler puts a blob, wherever the router sends a subject; a subject whose map falls on two blobs paints its
colour into both, and the object drawn for the other subject then carries it (the miniature's attribute
leakage: docs/experiments/routing-study.md). :func:`largest_regions` keeps each subject's largest 8-connected region of
the positions it wins at a layer and gives its other positions to the background. A subject keeps at least one
position wherever it wins one, so the rule stays removal-invariant: a subject routed nowhere wins nowhere in the
argmax, and every other subject's winning set, hence its regions, is what it would be without it.
Its flood fill reads one flag back to the host per iteration: nothing on a CPU, a sync per iteration on an
accelerator (not measured there).

A gap between subjects (inference only, ``subject_gap`` latent positions; 0 = off). Two subjects whose regions
touch get objects that touch, and where the sampler joins them into one, each carries the other's colour (the
miniature's remaining leakage with one region per subject: docs/experiments/miniature-diagnosis.md, 2.16).
:func:`kept_apart` gives the background every subject position that has another subject's within the gap (on
each layer's grid: the gap scaled to it, rounded up), after the one-region rule. It stays removal-invariant: a
subject that wins nowhere removes nothing from the others, and one that wins a position keeps one.

Trajectory router (inference only, optional; ``routing_trajectory_weight`` > 0 in the config). A second set of
routers, trained on the model's own sampling trajectories toward the objects it finally drew
(``anystory/training/trajectory.py``), sees early where each blob will form, which stage 2's routers (trained on
noised training images) cannot; alone, it sends each subject to less of its own object in the first steps, where
colour is set (docs/experiments/routing-study.md). The decision combines the two as a product of experts: each class's
background-adjusted logits of both routers are added, the trajectory router's weighted by
``trajectory_weight``, and the usual rule (argmax, one region) runs on the sum. Each class's sum still depends
on its own tokens and the latent only, so the rule stays removal-invariant and batch-independent. Without the
second set the decision is the one above, bit for bit.
The gating that uses these maps lives in ``attention_processors.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


def largest_regions(labels: torch.Tensor, hw: Tuple[int, int], classes: int) -> torch.Tensor:
    """``labels`` ``[B, L]`` (class per position, ``classes - 1`` the background) with every subject cut down to its
    largest 8-connected region on the ``hw`` grid; the rest goes to the background. Of equal regions the one whose
    last position (row-major) comes first is kept. Per sample, so a batch gives what single calls give."""
    batch, n = labels.shape[0], classes - 1
    grid = labels.view(batch, 1, *hw) == torch.arange(n, device=labels.device).view(1, n, 1, 1)  # [B, N, h, w]
    ids = torch.arange(1, grid[0, 0].numel() + 1, device=labels.device, dtype=torch.float32).view(1, 1, *hw)
    region = torch.where(grid, ids, 0.0)
    while True:  # every position takes the highest id of its region: flood fill by 3x3 max-pooling
        spread = torch.where(grid, F.max_pool2d(region, 3, stride=1, padding=1), 0.0)
        if torch.equal(spread, region):
            break
        region = spread
    region = region.long().flatten(2)  # [B, N, L]: 0 where the subject does not win
    sizes = torch.zeros(batch, n, region.shape[-1] + 1, dtype=torch.long, device=labels.device)
    sizes.scatter_add_(2, region, torch.ones_like(region))
    sizes[..., 0] = 0
    keep = region == sizes.argmax(-1, keepdim=True)  # [B, N, L]; argmax: the first of equal sizes
    kept = (grid.flatten(2) & keep).any(1)
    return torch.where(kept, labels, n)


def _adjusted(logits: torch.Tensor, background_bias: float) -> torch.Tensor:
    """Float32 logits with ``background_bias`` subtracted from the background's (the last class)."""
    logits = logits.float()
    if background_bias:
        logits = torch.cat([logits[:, :-1], logits[:, -1:] - background_bias], dim=1)
    return logits


def kept_apart(labels: torch.Tensor, hw: Tuple[int, int], classes: int, gap: int) -> torch.Tensor:
    """``labels`` ``[B, L]`` with every subject position that has another subject's position within ``gap`` cells
    (Chebyshev distance, on the ``hw`` grid) given to the background, so that at least ``gap`` background cells
    part any two subjects. A subject that would lose every position keeps them (the others still give way), so a
    subject that wins a position keeps one; a subject that wins none removes nothing. Per sample."""
    batch, n = labels.shape[0], classes - 1
    grid = labels.view(batch, 1, *hw) == torch.arange(n, device=labels.device).view(1, n, 1, 1)  # [B, N, h, w]
    occupied = grid.float()
    others = occupied.sum(1, keepdim=True) - occupied
    near = F.max_pool2d(others, 2 * gap + 1, stride=1, padding=gap) > 0
    emptied = ~(grid & ~near).flatten(2).any(-1)  # [B, N]: nothing would be left
    drop = (grid & near & ~emptied[..., None, None]).any(1).flatten(1)
    return torch.where(drop, n, labels)


def routing_maps(logits: torch.Tensor, training: bool, tau: float = 1.0, background_bias: float = 0.0,
                 hw: Optional[Tuple[int, int]] = None, single_region: bool = False, subject_gap: int = 0,
                 trajectory_logits: Optional[torch.Tensor] = None, trajectory_weight: float = 0.0,
                 trajectory_background_bias: float = 0.0):
    """(gating map, soft map) from router logits ``[B, K, L]`` (class ``K-1`` the background); the gating map is
    one-hot over ``K`` in the forward pass. ``background_bias``, ``single_region`` (:func:`largest_regions`),
    ``subject_gap`` (cells, :func:`kept_apart`; both need ``hw``, the layer's grid) and the trajectory router's
    logits (added with ``trajectory_weight`` after their own ``trajectory_background_bias``) apply to the inference
    decision only."""
    soft = logits.float().softmax(dim=1)
    if training:
        hard = F.gumbel_softmax(logits.float(), tau=tau, hard=True, dim=1)
    else:
        adjusted = _adjusted(logits, background_bias)
        if trajectory_logits is not None:
            adjusted = adjusted + trajectory_weight * _adjusted(trajectory_logits, trajectory_background_bias)
        labels = route_decision(adjusted)
        if (single_region or subject_gap) and hw is None:
            raise ValueError("one region per subject and the gap between subjects need the layer's grid (hw)")
        if single_region:
            labels = largest_regions(labels, hw, logits.shape[1])
        if subject_gap:
            labels = kept_apart(labels, hw, logits.shape[1], subject_gap)
            if single_region:  # the gap may cut a region in two
                labels = largest_regions(labels, hw, logits.shape[1])
        hard = F.one_hot(labels, logits.shape[1]).movedim(-1, 1).float()
    return hard.to(logits.dtype), soft
