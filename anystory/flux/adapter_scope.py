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


def _trainable(layer: BaseTunerLayer) -> list:
    """The adapter weights of ``layer`` that require a gradient: PEFT's ``set_adapter`` freezes them, and a
    training run (``anystory.training.flux_stages``) decides itself what it trains (none at inference)."""
    out = []
    for name in layer.adapter_layer_names:  # ModuleDicts of Linear layers, or ParameterDicts (embeddings)
        for entry in getattr(layer, name).values():
            params = entry._parameters.values() if isinstance(entry, nn.Module) else (entry,)
            out += [p for p in params if p is not None and p.requires_grad]
    return out


def _set_keeping_grads(layer: BaseTunerLayer, adapters: list, trainable: list) -> None:
    layer.set_adapter(adapters, inference_mode=True)
    for p in trainable:
        p.requires_grad_(True)


@contextmanager
def adapter_scope(layers: Iterable[BaseTunerLayer], adapter: str):
    """Within the block, ``layers`` apply ``adapter`` on top of the user's active adapters (which adapter
    weights are trained is left as the caller set it)."""
    saved = []
    for layer in layers:
        disabled = layer.disable_adapters
        trainable = _trainable(layer)
        saved.append((layer, list(layer.active_adapters), disabled, trainable))
        # a user's globally disabled LoRA stays off; ours is switched on regardless
        _set_keeping_grads(layer, ([] if disabled else _others(layer)) + [adapter], trainable)
        layer._disable_adapters = False
    try:
        yield
    finally:
        for layer, active, disabled, trainable in saved:
            _set_keeping_grads(layer, active, trainable)
            layer._disable_adapters = disabled
