"""What the machine offers the demo: a GPU and its memory, and which model weights can be had (probed, not loaded).

Probing is kept apart from choosing (:mod:`anystory.app.models`) so the choice can be tested on any machine with an
:class:`Environment` built by hand, and so probing never loads a model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..hub import (FLUX_ANYSTORY_FILE, FLUX_ANYSTORY_REPO, FLUX_BASE, FLUX_REDUX, hub_endpoint, hub_offline,
                   hub_reachable)

#: FLUX with 4-bit NF4 transformer and T5 and model offload (``--vram 16``, ``anystory/flux/low_vram.py``) fits a
#: 16 GB GPU (which reports about 15-16 GiB); below that it is not tried.
FLUX_MIN_GIB = 15.0
#: One file per repository that must be reachable for FLUX to be worth trying.
FLUX_REQUIRED = ((FLUX_ANYSTORY_REPO, FLUX_ANYSTORY_FILE), (FLUX_BASE, "model_index.json"),
                 (FLUX_REDUX, "image_encoder/config.json"))


@dataclass
class WeightsStatus:
    available: bool
    detail: str


def hub_file_status(repo_id: str, filename: str) -> WeightsStatus:
    """Whether ``repo_id/filename`` can be had: in the local cache, or (online) on the hub."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, filename)
    except Exception:
        cached = None
    if isinstance(cached, str):
        return WeightsStatus(True, f"{repo_id}/{filename} is cached")
    if hub_offline():
        return WeightsStatus(False, f"{repo_id}/{filename} is not cached and the hub is off (HF_HUB_OFFLINE=1)")

    if not hub_reachable():  # probed once, bounded: no network means no minute of hub retries at start-up
        return WeightsStatus(False, f"{repo_id}/{filename} is not cached and the hub ({hub_endpoint()}) is unreachable")
    from huggingface_hub import file_exists
    from huggingface_hub.errors import GatedRepoError

    try:
        if file_exists(repo_id, filename):
            return WeightsStatus(True, f"{repo_id}/{filename} is on the hub")
        return WeightsStatus(False, f"{repo_id}/{filename} was not found on the hub")
    except GatedRepoError:
        return WeightsStatus(False, f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN")
    except Exception as e:
        return WeightsStatus(False, f"the hub is unreachable for {repo_id} ({type(e).__name__})")


def flux_weights_status(local_weights: Optional[str] = None) -> WeightsStatus:
    """All FLUX files reachable? ``local_weights``: a local ``anystory_flux.bin`` instead of the hub's."""
    details = []
    for repo, name in FLUX_REQUIRED:
        if repo == FLUX_ANYSTORY_REPO and local_weights:
            if not os.path.isfile(local_weights):
                return WeightsStatus(False, f"ANYSTORY_FLUX_WEIGHTS={local_weights} does not exist")
            details.append(f"AnyStory FLUX weights at {local_weights}")
            continue
        status = hub_file_status(repo, name)
        if not status.available:
            return status
        details.append(status.detail)
    return WeightsStatus(True, "; ".join(details))


def flux_pipeline_importable() -> WeightsStatus:
    try:
        from ..flux import AnyStoryFluxPipeline  # noqa: F401
    except ImportError as e:
        return WeightsStatus(False, f"the FLUX pipeline is not installed ({e})")
    return WeightsStatus(True, "anystory.flux is installed")


def miniature_status() -> WeightsStatus:
    try:
        from ..sdxl import miniature
    except ImportError as e:
        return WeightsStatus(False, f"the miniature is not installed ({e})")
    check = getattr(miniature, "miniature_available", None)
    if callable(check):
        ok = check()
        return WeightsStatus(bool(ok), "the miniature's weights are present" if ok else "the miniature's weights are missing")
    return WeightsStatus(True, "anystory.sdxl.miniature is installed")


@dataclass
class Environment:
    """What model choice depends on. ``probe_environment`` fills it; tests build it directly."""

    cuda: bool = False
    gpu_name: str = ""
    gpu_memory_gib: float = 0.0
    flux_code: Optional[WeightsStatus] = None
    flux_weights: Optional[WeightsStatus] = None  # probed only when the GPU qualifies (it may touch the network)
    sdxl_weights: Optional[str] = None
    sdxl_base: Optional[str] = None
    flux_local_weights: Optional[str] = None  # --flux-weights / ANYSTORY_FLUX_WEIGHTS: a local anystory_flux.bin
    miniature: WeightsStatus = field(default_factory=lambda: WeightsStatus(False, "not checked"))
    flux_vram: str = "auto"  # the app's --vram: FLUX quantization and offload preset (anystory.flux.low_vram)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"


def probe_environment(sdxl_weights: Optional[str] = None, sdxl_base: Optional[str] = None,
                      flux_local_weights: Optional[str] = None, check_flux: bool = True) -> Environment:
    env = Environment(sdxl_weights=sdxl_weights or os.environ.get("ANYSTORY_SDXL_WEIGHTS") or None,
                      sdxl_base=sdxl_base or os.environ.get("ANYSTORY_SDXL_BASE") or None,
                      flux_local_weights=flux_local_weights or os.environ.get("ANYSTORY_FLUX_WEIGHTS") or None,
                      miniature=miniature_status())
    env.cuda = torch.cuda.is_available()
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        env.gpu_name, env.gpu_memory_gib = props.name, props.total_memory / 2**30
    if check_flux and env.cuda and env.gpu_memory_gib >= FLUX_MIN_GIB:
        env.flux_code = flux_pipeline_importable()
        if env.flux_code.available:
            env.flux_weights = flux_weights_status(env.flux_local_weights)
    return env
