"""Routing does not depend on the batch: a deterministic float32 decision with a tie rule (image by image, a batch
equals single calls on both backbones: ``tests/core/test_backbone_contract.py``)."""
import torch

from anystory.routing import DECISION_GRID, route_decision
from anystory.sdxl.router import routing_maps


def test_near_tie_is_decided_by_the_index_not_the_noise():
    """Two classes 3e-8 apart (float noise between batch sizes): the lower index wins whichever is larger."""
    base = 0.3 + DECISION_GRID / 2  # mid-cell, so +-3e-8 stays in the cell
    for noise in (3e-8, -3e-8):
        logits = torch.tensor([[[base], [base + noise], [base - 1.0]]])  # [1, K=3, L=1]
        assert route_decision(logits).item() == 0
        assert routing_maps(logits, training=False)[0][0, :, 0].tolist() == [1.0, 0.0, 0.0]
    assert torch.tensor([base, base + 3e-8]).argmax().item() == 1, "the raw argmax follows the noise"
    # a real margin still decides, and float16 logits are decided in float32
    assert route_decision(torch.tensor([[0.3], [0.3 + 4 * DECISION_GRID]])[None]).item() == 1
    assert route_decision(torch.tensor([[1.0], [1.0]], dtype=torch.float16)[None]).item() == 0


def test_removing_a_class_that_does_not_win_keeps_the_winner():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 200)
    winner = route_decision(logits)
    for drop in range(5):
        keep = [k for k in range(5) if k != drop]
        sub = torch.tensor(keep)[route_decision(logits[:, keep])]
        unchanged = winner != drop
        assert torch.equal(sub[unchanged], winner[unchanged])
