"""Weight files in and out, one rule for all of them.

What we write is safetensors (no code runs when it is read); what others wrote in pickle form (the authors'
``anystory_flux.bin``) is read with ``torch.load(..., weights_only=True)``, which refuses anything but tensors
and plain containers. A file that cannot be read, and a state dict whose keys or shapes do not match the model,
are ``ValueError`` s that name the file or the tensors. Which keys mean what (the release's layout, our adapter's
config) stays with the model code; this module only moves tensors between files and memory.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

#: Our SDXL AnyStory weights and the config they are built from, side by side in one folder.
ANYSTORY_WEIGHTS = "anystory.safetensors"
ANYSTORY_CONFIG = "anystory_config.json"


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``tensors`` (contiguous CPU copies) as safetensors. Written beside ``path`` and then renamed, so an
    interrupted write leaves the previous file, never a truncated one."""
    tmp = path + ".partial"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tensors(path: str, what: str = "weights") -> Dict[str, torch.Tensor]:
    """A safetensors file's tensors on the CPU; a truncated or foreign file is a ``ValueError`` naming it."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error type for truncated or foreign files
        raise ValueError(f"{what}: cannot read {path} (truncated or not a safetensors file: "
                         f"{type(e).__name__}: {e})") from None


def read_metadata(path: str) -> Dict[str, str]:
    """The string metadata stored in a safetensors file's header (empty when none)."""
    with safe_open(path, "pt") as f:
        return f.metadata() or {}


def load_pickled_tensors(path: str) -> dict:
    """A file someone else wrote with ``torch.save``, read without running its code (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def cast_floats(directory: str, dtype: torch.dtype) -> None:
    """Rewrite every ``*.safetensors`` under ``directory`` with its float tensors in ``dtype`` (metadata kept)."""
    for root, _, files in os.walk(directory):
        for name in files:
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(root, name)
            tensors = load_tensors(path)
            save_tensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, path,
                         read_metadata(path) or None)


def anystory_files(path: str) -> Tuple[str, str]:
    """(weights file, config file) of our SDXL weights at ``path``: a folder holding both, or the weights file
    beside its config. ``FileNotFoundError`` names what is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"AnyStory weights: {path} not found (a folder with {ANYSTORY_WEIGHTS} and "
                                f"{ANYSTORY_CONFIG}, or the weights file beside its config)")
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    weights = path if os.path.isfile(path) else os.path.join(directory, ANYSTORY_WEIGHTS)
    config = os.path.join(directory, ANYSTORY_CONFIG)
    for f in (weights, config):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"AnyStory weights: {f} not found")
    return weights, config


def _show(keys: Iterable[str]) -> str:
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse ``given`` unless it has exactly ``expected``'s keys and shapes; the message lists every kind of
    mismatch (missing, unexpected, wrong shape)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k].shape) != tuple(given[k].shape))
    if missing or unexpected or wrong:
        shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]
        raise ValueError(f"{what} do not match this model: missing keys: {_show(missing)}; unexpected keys: "
                         f"{_show(unexpected)}; shape mismatches: {_show(shapes)}")
