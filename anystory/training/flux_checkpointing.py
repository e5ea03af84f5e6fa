"""Gradient checkpointing of the FLUX transformer while AnyStory's hooks and processors keep per-call state.

Checkpointing re-runs each transformer block in the backward pass. AnyStory's FLUX state changes from block to
block (the router tokens' hidden state, the modulation each block records, the reference keys/values the
reference pass stores, the routing logits) and the reference pass runs with the ``anystory_ref`` adapter on.
So every checkpointed block remembers the state it entered with, and its re-run starts from that state, with
the reference adapter on again when the block ran in the reference pass; afterwards the state is put back.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable

from torch.utils.checkpoint import checkpoint

from ..flux.adapter_scope import REF_ADAPTER, adapter_scope


def _copied(values: dict) -> dict:
    """Lists and dicts copied (the forward appends to them), tensors and the rest shared."""
    return {k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in values.items()}


def flux_checkpointing(current_state: Callable[[], object]):
    """A ``gradient_checkpointing_func`` for ``FluxTransformer2DModel.enable_gradient_checkpointing``;
    ``current_state()``: the pipeline's ``AnyStoryFluxState``."""

    def run(module, *args):
        state = current_state()
        entered = _copied(vars(state))

        @contextmanager
        def recompute():
            after = _copied(vars(state))
            vars(state).update(_copied(entered))
            scope = adapter_scope(state.ref_layers, REF_ADAPTER) if entered["in_ref_pass"] else nullcontext()
            try:
                with scope:
                    yield
            finally:
                vars(state).update(after)

        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), recompute()))

    return run


def enable(pipe) -> None:
    pipe.transformer.enable_gradient_checkpointing(flux_checkpointing(lambda: pipe.anystory_state))
