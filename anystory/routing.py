"""Routing decisions both backbones share: which class wins a position, and when routed attention runs sparsely.

Inference makes the map hard: :func:`route_decision`, in float32, on logits floored to a grid of
``DECISION_GRID``, the first (lowest-index) class winning a tie. Two classes whose logits differ only by float
noise (identical subjects, or a batch computed with other kernels) then fall in one cell and the tie rule, not
the noise, decides, where an argmax on the raw logits flips between them from one batch size to another (only a
cell boundary falling between the two values still splits them: for noise of 1e-7, about 1 tie in 2,000).
"""
from __future__ import annotations

from typing import Optional

import torch


#: Width of the cells the inference decision floors logits to (2**-12: far above float32 noise on logits of
#: order 1-100, far below the margins the router learns).
DECISION_GRID = 2.0**-12


def route_decision(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Index of the winning class along ``dim``: the highest logit after flooring to ``DECISION_GRID``, in float32,
    the lowest index among equal cells (``torch.argmax`` returns the first maximum). A strict total order, so
    removing a class that does not win never changes the winner."""
    return torch.floor(logits.float() / DECISION_GRID).argmax(dim=dim)


def sparse_pays(query: torch.Tensor) -> bool:
    """The sparse path sizes its tensors by how many positions each subject got, which the host must read once
    per layer. On a CPU that read costs nothing and the saved attention FLOPs are what a step costs (measured:
    docs/benchmarks.md). On an accelerator the read would drain the launch queue in every layer, so there the
    dense form keeps one fused SDPA call and no host sync (not yet measured on a GPU); ``torch.compile`` needs
    the dense form's static shapes."""
    return query.device.type == "cpu" and not torch.compiler.is_compiling()


def exclusive_labels(gate: torch.Tensor) -> Optional[torch.Tensor]:
    """``[R, L]`` class per position (N = no subject) when every position gates at most one subject fully,
    as hard routing does; ``None`` for any other map (e.g. the all-ones "routing off" maps)."""
    total = gate.sum(dim=1)
    if not bool(((gate == 0) | (gate == 1)).all()) or bool((total > 1).any()):
        return None
    return torch.where(total > 0, gate.argmax(dim=1), gate.shape[1])
