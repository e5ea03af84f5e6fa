"""The subjects as the nodes pass them (``ANYSTORY_SUBJECTS``) and their conditioning for one sampling run.

A subject node encodes its reference once (``encode.py``); the apply node's settings and the run's step count
and latent size turn the list into the diffusers pipeline's ``FluxConditioning`` (the same fields, windows and
bias), which ``AnyStoryFluxState`` then serves to the patched blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from anystory.errors import InvalidInputError
from anystory.flux.conditioning_flux import FluxConditioning, step_window
from anystory.regions import closed_at_grid, region_pixels

MAX_SUBJECTS = 4


@dataclass(frozen=True)
class EncodedSubject:
    """One subject: its 81 redux and 9 router tokens ``[1, t, C]``, packed reference latents ``[1, R, c]`` with
    their position ids ``[R, 3]`` and in-mask flags ``[R]``, strengths and an optional region of the output
    (a box ``(x0, y0, x1, y1)`` in fractions, or a ``[H, W]`` mask)."""

    redux: torch.Tensor
    router: torch.Tensor
    ref_latents: torch.Tensor
    ref_ids: torch.Tensor
    ref_mask: torch.Tensor
    strength: float = 1.0
    reference_strength: float = 1.0
    region: object = None


@dataclass(frozen=True)
class Settings:
    """The apply node's schedule (fractions of the sampling run, the authors' defaults) and router choice."""

    redux_scale: float = 0.6
    redux_start: float = 0.1
    redux_end: float = 0.3
    ref_start: Optional[float] = None  # None: 0, or 0.09 with >= 2 subjects (the authors' demo)
    ref_end: float = 1.0
    use_router: Optional[bool] = None  # None: on with >= 2 subjects or any region

    def check(self) -> "Settings":
        for a, b in (("redux_start", "redux_end"), ("ref_start", "ref_end")):
            lo, hi = getattr(self, a), getattr(self, b)
            if lo is not None and lo > hi:
                raise InvalidInputError(f"{a} ({lo}) must not exceed {b} ({hi})")
        return self


@dataclass
class SubjectSet:
    subjects: List[EncodedSubject] = field(default_factory=list)

    def plus(self, subject: EncodedSubject) -> "SubjectSet":
        if len(self.subjects) >= MAX_SUBJECTS:
            raise InvalidInputError(f"AnyStory takes at most {MAX_SUBJECTS} subjects; this chain has one more")
        if self.subjects and subject.ref_ids.shape != self.subjects[0].ref_ids.shape:
            raise InvalidInputError("all subjects of a chain need the same reference size")
        return SubjectSet(self.subjects + [subject])


def _closed(subjects: List[EncodedSubject], grid: Tuple[int, int]) -> Optional[torch.Tensor]:
    if all(s.region is None for s in subjects):
        return None
    size = (grid[0] * 16, grid[1] * 16)  # the output in pixels (FLUX: 8x VAE, 2x2 patches)
    masks = []
    for i, s in enumerate(subjects):
        if isinstance(s.region, torch.Tensor):
            masks.append(F.interpolate(s.region[None, None].float(), size=size, mode="nearest")[0, 0])
        else:
            masks.append(torch.from_numpy(region_pixels(s.region, *size, f"subject {i + 1}")).float())
    return closed_at_grid(torch.stack(masks), grid)


def run_conditioning(subjects: SubjectSet, settings: Settings, steps: int, grid: Tuple[int, int]) -> FluxConditioning:
    """What the pipeline's ``conditioning_inputs`` computes, for a run of ``steps`` steps at an image-token grid."""
    items = subjects.subjects
    n = len(items)
    ref_start = settings.ref_start if settings.ref_start is not None else (0.09 if n > 1 else 0.0)
    closed = _closed(items, grid)
    use_router = settings.use_router if settings.use_router is not None else (n > 1 or closed is not None)
    if closed is not None and not use_router:
        raise InvalidInputError("subject boxes/regions need the router: set use_router to 'auto' or 'on'")
    redux = torch.cat([s.redux * (settings.redux_scale * s.strength) for s in items], dim=1)
    ref_mask = torch.cat([s.ref_mask for s in items])
    scale = torch.tensor([s.reference_strength for s in items], dtype=torch.float32)
    log_scale = torch.where(scale > 0, scale.clamp(min=1e-30).log(), torch.full_like(scale, float("-inf")))
    r = items[0].ref_mask.numel()
    ref_bias = torch.where(ref_mask, 0.0, -100.0) + log_scale.repeat_interleave(r)
    return FluxConditioning(
        num_subjects=n, redux_tokens=redux, router_tokens=torch.cat([s.router for s in items], dim=1),
        ref_latents=torch.cat([s.ref_latents for s in items]), ref_ids=items[0].ref_ids, ref_bias=ref_bias,
        ref_mask=ref_mask, redux_window=step_window(steps, settings.redux_start, settings.redux_end),
        ref_window=step_window(steps, ref_start, settings.ref_end), use_router=bool(use_router),
        closed_regions=closed, record_maps=True)
