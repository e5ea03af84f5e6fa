"""Which model the demo runs, and why: the candidates best first, each loaded or skipped with its reason.

Model choice, best first (``--model auto``):

1. FLUX.1-dev with the authors' AnyStory weights, when a CUDA GPU with enough memory is present and the
   weights are reachable (local cache, or the hub when online);
2. SDXL AnyStory, when its weights are configured (``--sdxl-weights`` / ``ANYSTORY_SDXL_WEIGHTS``);
3. the shipped miniature (offline, CPU).

A candidate that fails to load hands over to the next one, and every skip is recorded, so the UI can say what
is loaded *and why the better ones are not*. ``--model tiny`` is an untrained, random-weight pipeline for
testing the app's wiring only; it is never chosen automatically and the UI says its output is noise. Every
loader goes through :mod:`anystory.loading` (the one loading module of the app, the CLI, eval and training).
"""
from __future__ import annotations

import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import NoModelError
from ..presets import Preset, preset_for
from ..subjects import MAX_SUBJECTS
from .environment import FLUX_MIN_GIB, Environment

KINDS = ("flux", "sdxl", "miniature", "tiny")

TITLES = {
    "flux": "AnyStory on FLUX.1-dev (the authors' released weights)",
    "sdxl": "AnyStory on SDXL (our architecture, weights from {weights})",
    "miniature": "the AnyStory miniature (SDXL-shaped, trained by us on a synthetic world; CPU, offline)",
    "tiny": "a tiny UNTRAINED test pipeline (random weights: the output is noise; for testing the app only)",
}


# ---- choice -------------------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    kind: str
    reason: str


def _flux_verdict(env: Environment) -> Candidate | str:
    if not env.cuda:
        return "FLUX: no CUDA GPU"
    if env.gpu_memory_gib < FLUX_MIN_GIB:
        return f"FLUX: the GPU ({env.gpu_name}) has {env.gpu_memory_gib:.0f} GiB, FLUX needs at least {FLUX_MIN_GIB:.0f} GiB"
    if env.flux_code is not None and not env.flux_code.available:
        return f"FLUX: {env.flux_code.detail}"
    if env.flux_weights is None or not env.flux_weights.available:
        return "FLUX: weights not reachable" + (f" ({env.flux_weights.detail})" if env.flux_weights else "")
    from ..flux.low_vram import plan_for_vram

    plan = plan_for_vram(env.flux_vram, "cuda", env.gpu_memory_gib)
    offload = " with CPU offload" if plan.offload != "none" else ""
    return Candidate("flux", f"CUDA GPU {env.gpu_name} ({env.gpu_memory_gib:.0f} GiB){offload} and the weights are "
                             f"reachable ({env.flux_weights.detail}); {plan.describe()}")


def _sdxl_verdict(env: Environment) -> Candidate | str:
    if not env.sdxl_weights:
        return "SDXL AnyStory: no weights configured (--sdxl-weights or ANYSTORY_SDXL_WEIGHTS)"
    return Candidate("sdxl", f"SDXL AnyStory weights configured: {env.sdxl_weights}")


def _miniature_verdict(env: Environment) -> Candidate | str:
    if not env.miniature.available:
        return f"miniature: {env.miniature.detail}"
    return Candidate("miniature", "the shipped miniature runs anywhere, offline")


def plan_models(env: Environment, requested: str = "auto") -> tuple:
    """(candidates best first, reasons for each skipped model). ``requested`` forces one kind (no fallback)."""
    if requested not in ("auto",) + KINDS:
        raise ValueError(f"unknown model {requested!r}; choose auto, {', '.join(KINDS)}")
    if requested == "tiny":
        return [Candidate("tiny", "requested with --model tiny")], []
    verdicts = {"flux": _flux_verdict, "sdxl": _sdxl_verdict, "miniature": _miniature_verdict}
    order = list(verdicts) if requested == "auto" else [requested]
    candidates, skipped = [], []
    for kind in order:
        verdict = verdicts[kind](env)
        if isinstance(verdict, Candidate):
            if requested != "auto":
                verdict.reason = f"requested with --model {kind}; {verdict.reason}"
            candidates.append(verdict)
        else:
            skipped.append(verdict)
    return candidates, skipped


# ---- loaders ------------------------------------------------------------------------------------------------------
def _load_flux(env: Environment):
    from ..flux.low_vram import apply_offload, plan_for_vram
    from ..loading import load_flux_release

    plan = plan_for_vram(env.flux_vram, "cuda", env.gpu_memory_gib)
    pipe = load_flux_release(env.flux_local_weights, torch_dtype=torch.bfloat16,
                             quantization=plan.quantization)
    apply_offload(pipe, plan.offload, "cuda")
    return pipe


def _load_sdxl(env: Environment):
    from ..loading import load_sdxl_anystory

    return load_sdxl_anystory(env.sdxl_weights, env.sdxl_base, device=env.device)


def _load_miniature(env: Environment):
    from ..loading import load_miniature

    return load_miniature(device=env.device)


def build_tiny_pipeline(seed: int = 0, device: str = "cpu"):
    """Untrained SDXL-shaped AnyStory on tiny random components: exercises the whole app path in seconds."""
    from ..sdxl.pipeline_sdxl import AnyStorySDXLPipeline
    from ..sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components

    pipe = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=seed))
    torch.manual_seed(seed)
    pipe.init_anystory(**TINY_ANYSTORY_CONFIG)
    return pipe.to(device)


LOADERS: Dict[str, Callable[[Environment], Any]] = {
    "flux": _load_flux, "sdxl": _load_sdxl, "miniature": _load_miniature,
    "tiny": lambda env: build_tiny_pipeline(device=env.device),
}


@dataclass
class ModelHandle:
    """The loaded pipeline and what the UI says about it."""

    kind: str
    pipe: Any
    device: str
    reason: str
    skipped: List[str] = field(default_factory=list)
    load_seconds: float = 0.0
    weights: str = ""
    defaults: Optional[Preset] = None  # the kind's preset (anystory/presets.py), sized for this pipeline
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.defaults is None:
            self.defaults = preset_for(self.kind, self.pipe)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)

    @property
    def title(self) -> str:
        return TITLES[self.kind].format(weights=self.weights)

    @property
    def max_subjects(self) -> int:
        return int(getattr(self.pipe, "max_subjects", MAX_SUBJECTS))

    @property
    def returns_routing_maps(self) -> bool:
        return "return_routing_maps" in inspect.signature(self.pipe.__call__).parameters

    def status_markdown(self) -> str:
        lines = [f"**Model:** {self.title}, on `{self.device}` (loaded in {self.load_seconds:.1f} s).",
                 f"**Why:** {self.reason}."]
        if self.skipped:
            lines.append("**Not used:** " + "; ".join(self.skipped) + ".")
        return "  \n".join(lines)


def load_model(env: Environment, requested: str = "auto",
               loaders: Optional[Dict[str, Callable[[Environment], Any]]] = None) -> ModelHandle:
    """Load the best candidate; a failure is recorded and the next candidate tried."""
    loaders = {**LOADERS, **(loaders or {})}
    candidates, skipped = plan_models(env, requested)
    for cand in candidates:
        start = time.perf_counter()
        try:
            pipe = loaders[cand.kind](env)
        except Exception as e:  # absent weights, no network, OOM while loading: try the next one
            first = str(e).splitlines()[0][:300] if str(e) else ""
            skipped.append(f"{cand.kind}: failed to load ({type(e).__name__}: {first})")
            continue
        return ModelHandle(cand.kind, pipe, "cuda" if cand.kind == "flux" else env.device, cand.reason, skipped,
                           time.perf_counter() - start, weights=env.sdxl_weights or "")
    raise NoModelError("No model could be loaded. " + "; ".join(skipped))
