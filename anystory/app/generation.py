"""One generation in the demo: a request checked against the loaded model, run, and packaged for the page.

:func:`check_request` is the one rule for a request's prompt and numbers (the Generate tab and every storyboard shot
use it, once, before anything is spent); :func:`generate` runs a checked request. Errors keep their kind: bad
input is an :class:`~anystory.errors.InvalidInputError`, running out of memory a :class:`GenerationError` with
advice, and anything else is a bug and propagates unchanged (never dressed up as the user's mistake).
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence

import torch
from PIL import Image

from ..errors import GenerationError, InvalidInputError
from ..images import read_mask
from ..subjects import AlphaOrWholeImageSegmenter, Subject
from .background import background_call
from .inputs import InputError, check_number, check_prompt, resolve_seed
from .jobs import check_work
from .models import ModelHandle
from .visualize import (contrasting_colors, dominant_color, legend_html, routing_colormap, routing_overlay, save_png,
                        side_by_side, subject_overlays, subject_shares, thumbnail_uri)

Progress = Callable[[int, int], None]


@dataclass
class Request:
    prompt: str
    subjects: Sequence[Subject]
    negative_prompt: str = ""
    seed: Any = -1
    steps: Any = None
    guidance: Any = None
    height: Any = None
    width: Any = None
    num_images: Any = 1
    colors: Optional[List[tuple]] = None  # one per subject; default: the palette in subject order
    background: Any = None  # an image of the backdrop (``anystory/app/background.py``), SDXL only
    background_start: Any = None  # its strength; None: the weights' own
    background_field: str = "Background image"  # how an error names it (a storyboard names the shot)


@dataclass
class CheckedRequest:
    """A request that passed :func:`check_request`: the pipeline's keyword arguments and the resolved seed."""

    subjects: List[Subject]
    kwargs: dict
    seed: int
    colors: Optional[List[tuple]] = None


@dataclass
class Result:
    images: List[Image.Image]
    overlays: List[Image.Image]
    legend: str
    seed: int
    files: List[str]
    info: str
    routing_note: str = ""
    route_maps: List[Image.Image] = field(default_factory=list)  # the maps alone, coloured, at image size
    subject_overlays: List[List[Image.Image]] = field(default_factory=list)  # per image: one overlay per subject
    names: List[str] = field(default_factory=list)


OOM_ADVICE = ("Out of memory while generating {what}. Lower the resolution, generate fewer images or use fewer "
              "subjects, or enable CPU offload (start the app with --offload).")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "failed to allocate" in text)


def check_request(handle: ModelHandle, req: Request) -> CheckedRequest:
    """Every numeric and text input checked against the loaded model, and the seed resolved (-1: drawn now)."""
    d = handle.defaults
    prompt = check_prompt(req.prompt, handle.pipe)
    negative = check_prompt(req.negative_prompt, handle.pipe, what="Negative prompt", required=False)
    steps = check_number(d.steps if req.steps in (None, "") else req.steps, "Steps", 1, 100, integer=True)
    guidance = check_number(d.guidance if req.guidance in (None, "") else req.guidance, "Guidance", 0.0, 30.0)
    sizes = []
    for what, v in (("Height", req.height), ("Width", req.width)):
        v = check_number(d.size if v in (None, "") else v, what, d.min_size, d.max_size, integer=True)
        if v % d.size_step:
            raise InputError(f"{what} must be a multiple of {d.size_step} for this model, got {v}.")
        sizes.append(v)
    num = check_number(req.num_images, "Images per prompt", 1, 4, integer=True)
    check_work(steps, num)
    if len(req.subjects) > handle.max_subjects:
        raise InputError(f"Too many subjects: {len(req.subjects)} given, this model takes at most {handle.max_subjects}.")
    background = background_call(handle, req.background, req.background_start, req.background_field)
    seed = resolve_seed(req.seed)
    kwargs = dict(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                  height=sizes[0], width=sizes[1], num_images_per_prompt=num, **background)
    return CheckedRequest(list(req.subjects), kwargs, seed, req.colors)


def _run_pipeline(handle: ModelHandle, call: dict, what: str):
    """The pipeline call under the model's lock; input errors pass as they are, running out of memory becomes a
    :class:`GenerationError` with advice, and every other exception (a bug) propagates unchanged."""
    with handle.lock:
        try:
            return handle.pipe(**call)
        except InvalidInputError:
            raise
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise GenerationError(OOM_ADVICE.format(what=what)) from e


def generate(handle: ModelHandle, checked: CheckedRequest, progress: Optional[Progress] = None,
             out_dir: Optional[str] = None) -> Result:
    """Run one checked request and package it: images, routing overlays, a colour key, PNG files to download."""
    kwargs, seed, subjects = checked.kwargs, checked.seed, checked.subjects
    steps = kwargs["num_inference_steps"]
    maps_wanted = handle.returns_routing_maps

    def on_step(pipe, i, t, tensors):
        if progress is not None:
            progress(i + 1, steps)
        return {}

    call = dict(kwargs, subjects=list(subjects), generator=torch.Generator("cpu").manual_seed(seed),
                callback_on_step_end=on_step)
    ignored = ""
    if handle.kind == "flux" and call.get("negative_prompt"):  # guidance-distilled: FLUX.1-dev has no negative prompt
        call.pop("negative_prompt")
        ignored = " The negative prompt is not used by FLUX.1-dev (guidance-distilled)."
    if maps_wanted:
        call["return_routing_maps"] = True
    if progress is not None:
        progress(0, steps)  # the subjects are encoded before the first step
    start = time.perf_counter()
    size = f"{kwargs['width']}x{kwargs['height']}"
    out = _run_pipeline(handle, call, f"{size} with {len(subjects)} subject(s) and "
                                      f"{kwargs['num_images_per_prompt']} image(s)")
    seconds = time.perf_counter() - start
    images = list(out.images)
    names = [s.name or f"subject {i + 1}" for i, s in enumerate(subjects)]
    maps = getattr(out, "routing_maps", None) if maps_wanted else None
    overlays, route_maps, per_subject, legend, note = [], [], [], "", ""
    if maps:
        last = maps[-1]
        pictures = [_subject_picture(s) for s in subjects]
        colors = checked.colors or contrasting_colors([dominant_color(im, m) if im is not None else (128, 128, 128)
                                                       for im, m in pictures])
        for b, image in enumerate(images):
            frame_maps = last[min(b, last.shape[0] - 1)]
            overlays.append(routing_overlay(image, frame_maps, colors=colors))
            route_maps.append(routing_colormap(frame_maps, image.size, colors=colors))
            per_subject.append(subject_overlays(image, frame_maps, colors=colors))
        legend = legend_html(names, subject_shares(last[0]), colors=colors,
                             thumbnails=[thumbnail_uri(im, m) if im is not None else None for im, m in pictures])
        note = f"Routing at the last of {len(maps)} steps (averaged over the model's routed layers)."
    else:
        note = "This model does not report routing maps."
    out_dir = out_dir or tempfile.mkdtemp(prefix="anystory_")
    files = []
    for b, image in enumerate(images):
        files.append(save_png(image, out_dir, f"anystory_seed{seed}_{b}"))
        if overlays:
            files.append(save_png(side_by_side([image, overlays[b]]), out_dir, f"anystory_seed{seed}_{b}_routing"))
    info = (f"Seed **{seed}** - {steps} steps, guidance {kwargs['guidance_scale']:g}, {size}, "
            f"{len(subjects)} subject(s){' and a background reference' if 'background' in kwargs else ''} - "
            f"{seconds:.1f} s on {handle.device}." + ignored)
    return Result(images, overlays, legend, seed, files, info, note, route_maps, per_subject, names)


def _subject_picture(subject: Subject) -> tuple:
    """(image, boolean mask) of a subject, for its legend colour and thumbnail; (None, None) when not at hand."""
    if not isinstance(subject.image, Image.Image):
        return None, None
    try:
        mask = read_mask(subject.mask) if subject.mask is not None else AlphaOrWholeImageSegmenter()(subject.image)
    except InvalidInputError:  # only its colour and thumbnail are lost
        mask = None
    return subject.image, mask
