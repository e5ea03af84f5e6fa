"""Routed reference attention: the sparse eager path equals the dense masked form it replaces."""
import pytest
import torch
import torch.nn.functional as F

from anystory.routing import exclusive_labels
from anystory.sdxl.attention_processors import _dense_reference_attention, _routed_reference_attention

HEADS, LENGTH, DIM, LR = 2, 48, 8, 6


def _inputs(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, HEADS, LENGTH, DIM, generator=g) for _ in range(3))
    ref_k, ref_v = (torch.randn(batch, HEADS, n * LR, DIM, generator=g) for _ in range(2))
    return q, k, v, ref_k, ref_v


def _hard_gate(rows, n, seed, empty=None):
    """[rows, N, L] one-hot gates over N subjects + background (dropped), subject ``empty`` routed nowhere."""
    labels = torch.randint(0, n + 1, (rows, LENGTH), generator=torch.Generator().manual_seed(seed))
    if empty is not None:
        labels[labels == empty] = n
    return F.one_hot(labels, n + 1).movedim(-1, 1)[:, :n].float()


@pytest.mark.parametrize("batch,rows", [(2, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("scales", [[1.0, 1.0, 1.0], [0.5, 0.0, 2.0]])
def test_sparse_equals_dense(batch, rows, scales):
    n = len(scales)
    q, k, v, ref_k, ref_v = _inputs(batch, n)
    gate = _hard_gate(rows, n, seed=batch + rows, empty=1)
    labels = exclusive_labels(gate)
    assert labels is not None and labels.shape == (rows, LENGTH)
    dense = _dense_reference_attention(q, k, v, ref_k, ref_v, gate, torch.tensor(scales))
    sparse = _routed_reference_attention(q, k, v, ref_k, ref_v, labels, scales)
    assert (dense - sparse).abs().max() <= 1e-6


def test_sparse_gradients_equal_dense():
    n = 2
    gate = _hard_gate(1, n, seed=3)
    grads = []
    for sparse in (False, True):
        tensors = [t.requires_grad_() for t in _inputs(2, n, seed=5)]
        if sparse:
            out = _routed_reference_attention(*tensors, exclusive_labels(gate), [1.0, 1.0])
        else:
            out = _dense_reference_attention(*tensors, gate, torch.ones(n))
        out.square().sum().backward()
        grads.append([t.grad for t in tensors])
    for dense_grad, sparse_grad in zip(*grads):
        assert torch.allclose(dense_grad, sparse_grad, atol=1e-5)


def test_a_query_meets_only_its_own_subjects_reference():
    """Changing subject 1's reference keys/values changes exactly the positions routed to subject 1."""
    n = 2
    q, k, v, ref_k, ref_v = _inputs(1, n)
    gate = _hard_gate(1, n, seed=7)
    labels = exclusive_labels(gate)
    before = _routed_reference_attention(q, k, v, ref_k, ref_v, labels, [1.0, 1.0])
    ref_v2 = ref_v.clone()
    ref_v2[:, :, LR:] += 5.0
    after = _routed_reference_attention(q, k, v, ref_k, ref_v2, labels, [1.0, 1.0])
    changed = (before - after).abs().amax(dim=(0, 1, 3)) > 1e-4
    assert torch.equal(changed, labels[0] == 1)


def test_maps_that_are_not_exclusive_take_the_dense_path():
    ones = torch.ones(1, 2, LENGTH)  # "routing off": every subject everywhere
    soft = torch.full((1, 2, LENGTH), 0.5)
    assert exclusive_labels(ones) is None and exclusive_labels(soft) is None
