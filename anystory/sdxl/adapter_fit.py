"""Whether AnyStory weights fit a pipeline's UNet, decided at load time rather than inside a later matmul.

A weights folder carries its own config, so it loads cleanly into an adapter of its own widths even when the
pipeline's UNet has others (same layer names, other channels). :func:`check_adapter_fits_unet` builds the adapter
this UNet needs on the meta device (shapes only, no memory) and compares every tensor, naming the first that differs.
"""
from __future__ import annotations

import torch

from .adapter_sdxl import cross_attention_layers

_OWN_KEYS = ("unet_config", "cross_attention_layers")


def check_adapter_fits_unet(adapter, unet) -> None:
    """Raise ``ValueError`` naming the first tensor of ``adapter`` whose shape this ``unet`` cannot use."""
    config = {k: v for k, v in adapter.config.items() if not k.startswith("_") and k not in _OWN_KEYS}
    with torch.device("meta"):
        needed = type(adapter)(dict(unet.config), cross_attention_layers(unet), **config).state_dict()
    given = adapter.state_dict()
    for name, tensor in given.items():
        if name not in needed:
            raise ValueError(f"AnyStory weights do not fit this pipeline's UNet: tensor {name} "
                             f"{tuple(tensor.shape)} has no counterpart in it (weights made for another UNet?)")
        if tuple(tensor.shape) != tuple(needed[name].shape):
            raise ValueError(f"AnyStory weights do not fit this pipeline's UNet: tensor {name} has shape "
                             f"{tuple(tensor.shape)} in the weights, this UNet needs {tuple(needed[name].shape)} "
                             "(weights made for a UNet of other widths?)")
    missing = [name for name in needed if name not in given]
    if missing:
        raise ValueError(f"AnyStory weights do not fit this pipeline's UNet: it needs tensor {missing[0]} "
                         f"{tuple(needed[missing[0]].shape)}, which the weights lack ({len(missing)} in all)")
