"""The routing loss and the router's mIoU, from the soft maps the cross-attention layers record.

Paper: L_route = lambda * mean_i ||M_i - M_i^gt||^2 with lambda = 0.1, M_i the router's (soft) map of subject i.
We average the squared error over positions, classes (N subjects + background) and cross-attention layers; the
ground truth at a layer's resolution is the fraction of each cell every class covers.
"""
from __future__ import annotations

from typing import Dict

import torch

from .data import area_targets


def _layer_hw(state, tokens: int):
    return state.layer_hw(tokens)


def routing_loss(state, targets: torch.Tensor) -> torch.Tensor:
    """Mean over cross-attention layers of mean((M - M_gt)^2); ``targets`` ``[B, N+1, H, W]`` at any resolution."""
    if not state.soft_maps:
        raise RuntimeError("no soft routing maps were recorded: start the call with "
                           "pipe.start_anystory_call(pipe.anystory.conditioning(collect_soft_maps=True, ...)) before the UNet call")
    losses = []
    for soft in state.soft_maps.values():
        hw = _layer_hw(state, soft.shape[-1])
        gt = area_targets(targets, hw).flatten(2).to(soft.dtype)
        losses.append(((soft - gt) ** 2).mean())
    return torch.stack(losses).mean()


def miou(pred: torch.Tensor, gt: torch.Tensor, classes: int) -> torch.Tensor:
    """Per-sample mean IoU over the classes present in prediction or ground truth; ``pred``/``gt`` int ``[B, ...]``."""
    pred, gt = pred.flatten(1), gt.flatten(1)
    scores = []
    for b in range(pred.shape[0]):
        ious = []
        for c in range(classes):
            p, g = pred[b] == c, gt[b] == c
            union = (p | g).sum()
            if union > 0:
                ious.append((p & g).sum().float() / union.float())
        scores.append(torch.stack(ious).mean())
    return torch.stack(scores)


def router_miou(state, targets: torch.Tensor) -> Dict[str, float]:
    """mIoU of every layer's argmax routing against the argmax ground truth at that layer's resolution."""
    out = {}
    for name, soft in state.soft_maps.items():
        hw = _layer_hw(state, soft.shape[-1])
        gt = area_targets(targets, hw).flatten(2).argmax(1)
        out[name] = miou(soft.argmax(1), gt, soft.shape[1]).mean().item()
    return out
