"""Gradient checkpointing of a UNet whose attention processors read and write AnyStory's per-call state.

Checkpointing re-runs a block in the backward pass. AnyStory's processors carry state from layer to layer (the
preceding cross-attention layer's routing map gates the next layers, reference keys/values are cached once
per call), so a plain re-run would see the state the *whole* forward left behind, not the state the block saw.
Here every checkpointed block remembers the state it entered with and the re-run starts from it; afterwards the
state is put back as it was. Random draws (Gumbel noise) repeat because torch's checkpoint restores the RNG.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from typing import Callable

from torch.utils.checkpoint import checkpoint


def _snapshot(state) -> dict:
    """A shallow copy of every attribute the state holds (its conditioning's read-only fields and what the
    processors write), so a re-run can start from it and the forward's end be put back."""
    return {name: copy.copy(value) for name, value in vars(state).items()}


def _restore(state, values: dict) -> None:
    for name, value in values.items():
        setattr(state, name, value)


def stateful_checkpointing(current_state: Callable[[], object]):
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` that re-runs each block
    from the state (an object mutated in place by the processors) it saw in the forward pass.
    ``current_state()`` gives the state of the call running now (each call has its own)."""

    def run(module, *args):
        state = current_state()
        entered = _snapshot(state)

        @contextmanager
        def recompute():
            after = _snapshot(state)
            _restore(state, entered)
            try:
                yield
            finally:
                _restore(state, after)

        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), recompute()))

    return run


def enable(pipe) -> None:
    """Checkpoint the denoising UNet (state-aware) and the ReferenceNet (its processors only record)."""
    if pipe.anystory is None:
        pipe.unet.enable_gradient_checkpointing()
        return
    adapter = pipe.anystory
    pipe.unet.enable_gradient_checkpointing(stateful_checkpointing(lambda: adapter.state))
    adapter.reference_net.unet.enable_gradient_checkpointing()

