"""Per-stream activation of the AnyStory LoRA adapters.

AnyStory-FLUX runs three token streams through the same transformer weights: the image/text stream (base
weights, plus any LoRA the user activated), the reference stream (``anystory_ref`` adapter on top) and the
router stream (``anystory_router`` adapter on top). The adapters are ordinary PEFT LoRA layers loaded by
diffusers' ``load_lora_adapter``; this module only decides, per call, which of them a layer applies. Outside an
:func:`adapter_scope` the AnyStory adapters are inactive, so the image/text stream sees the base model.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, List

import torch.nn as nn
from peft.tuners.tuners_utils import BaseTunerLayer

REF_ADAPTER = "anystory_ref"
ROUTER_ADAPTER = "anystory_router"
ANYSTORY_ADAPTERS = (REF_ADAPTER, ROUTER_ADAPTER)


def layers_with_adapter(module: nn.Module, adapter: str) -> List[BaseTunerLayer]:
    """PEFT layers under ``module`` (itself included) that hold ``adapter``."""
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})]


def _others(layer: BaseTunerLayer) -> list:
    return [a for a in layer.active_adapters if a not in ANYSTORY_ADAPTERS]


def deactivate_anystory_adapters(model: nn.Module) -> None:
    """Leave only the user's adapters active everywhere (the image/text stream never applies ours)."""
    for m in model.modules():
        if isinstance(m, BaseTunerLayer) and any(a in m.active_adapters for a in ANYSTORY_ADAPTERS):
            m.set_adapter(_others(m), inference_mode=True)


@contextmanager
def adapter_scope(layers: Iterable[BaseTunerLayer], adapter: str):
    """Within the block, ``layers`` apply ``adapter`` on top of the user's active adapters."""
    saved = []
    for layer in layers:
        disabled = layer.disable_adapters
        saved.append((layer, list(layer.active_adapters), disabled))
        # a user's globally disabled LoRA stays off; ours is switched on regardless
        layer.set_adapter(([] if disabled else _others(layer)) + [adapter], inference_mode=True)
        layer._disable_adapters = False
    try:
        yield
    finally:
        for layer, active, disabled in saved:
            layer.set_adapter(active, inference_mode=True)
            layer._disable_adapters = disabled
