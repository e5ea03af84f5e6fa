"""The demo's logic without Gradio: which model to run (and why), and one generation from checked inputs.

Model choice, best first (``--model auto``):

1. FLUX.1-dev with the authors' AnyStory weights, when a CUDA GPU with enough memory is present and the
   weights are reachable (local cache, or the hub when online);
2. SDXL AnyStory, when its weights are configured (``--sdxl-weights`` / ``ANYSTORY_SDXL_WEIGHTS``);
3. the shipped miniature (offline, CPU).

A candidate that fails to load hands over to the next one, and every skip is recorded, so the UI can say what
is loaded *and why the better ones are not*. ``--model tiny`` is an untrained, random-weight pipeline for
testing the app's wiring only; it is never chosen automatically and the UI says its output is noise.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from PIL import Image

from .inputs import (InputError, SubjectSlot, check_number, check_prompt, collect_subjects, load_image_file,
                         resolve_seed)
from .storyboard import (Frame, Script, ScriptError, dump_script, export_bundle, render_storyboard, script_from_dict,
                         shot_cast, shot_prompt, shot_subjects)
from ..hub import (FLUX_ANYSTORY_FILE, FLUX_ANYSTORY_REPO, FLUX_BASE, FLUX_REDUX, hub_endpoint, hub_offline,
                  hub_reachable)
from ..images import read_mask
from ..subjects import MAX_SUBJECTS, AlphaOrWholeImageSegmenter, Subject
from .visualize import (contrasting_colors, dominant_color, legend_html, routing_colormap, routing_overlay, save_png,
                        side_by_side, subject_overlays, subject_shares, thumbnail_uri)

KINDS = ("flux", "sdxl", "miniature", "tiny")

#: FLUX with 4-bit NF4 transformer and T5 and model offload (``--vram 16``, ``anystory/flux/low_vram.py``) fits a
#: 16 GB GPU (which reports about 15-16 GiB); below that it is not tried.
FLUX_MIN_GIB = 15.0
#: Everything resident in bf16 (transformer, T5-XXL, CLIP, VAE, Redux encoder, AnyStory): below this, offload.
FLUX_RESIDENT_GIB = 38.0
#: One file per repository that must be reachable for FLUX to be worth trying.
FLUX_REQUIRED = ((FLUX_ANYSTORY_REPO, FLUX_ANYSTORY_FILE), (FLUX_BASE, "model_index.json"),
                 (FLUX_REDUX, "image_encoder/config.json"))

TITLES = {
    "flux": "AnyStory on FLUX.1-dev (the authors' released weights)",
    "sdxl": "AnyStory on SDXL (our architecture, weights from {weights})",
    "miniature": "the AnyStory miniature (SDXL-shaped, trained by us on a synthetic world; CPU, offline)",
    "tiny": "a tiny UNTRAINED test pipeline (random weights: the output is noise; for testing the app only)",
}


@dataclass
class Defaults:
    """Per-model generation defaults and limits for the UI's sliders."""

    steps: int
    guidance: float
    size: int
    min_size: int
    max_size: int
    size_step: int


DEFAULTS = {
    "flux": Defaults(steps=25, guidance=3.5, size=512, min_size=256, max_size=1024, size_step=64),
    "sdxl": Defaults(steps=30, guidance=5.0, size=1024, min_size=512, max_size=1536, size_step=64),
    "miniature": Defaults(steps=20, guidance=3.0, size=128, min_size=64, max_size=256, size_step=32),
    "tiny": Defaults(steps=4, guidance=3.0, size=64, min_size=32, max_size=128, size_step=32),
}


def defaults_for(kind: str, pipe) -> Defaults:
    """The kind's defaults; small models take their size from the pipeline itself (native size, UNet stride)."""
    d = DEFAULTS[kind]
    unet = getattr(pipe, "unet", None)
    if kind in ("miniature", "tiny") and unet is not None and hasattr(pipe, "default_sample_size"):
        factor = int(pipe.vae_scale_factor)
        native = int(pipe.default_sample_size) * factor
        step = factor * 2 ** (len(unet.config.block_out_channels) - 1)
        d = Defaults(d.steps, d.guidance, native, max(step, native // 2), native * 2, step)
    return d


# ---- environment --------------------------------------------------------------------------------------------------
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
    miniature: WeightsStatus = field(default_factory=lambda: WeightsStatus(False, "not checked"))
    flux_vram: str = "auto"  # the app's --vram: FLUX quantization and offload preset (anystory.flux.low_vram)

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"


def probe_environment(sdxl_weights: Optional[str] = None, sdxl_base: Optional[str] = None,
                      flux_local_weights: Optional[str] = None, check_flux: bool = True) -> Environment:
    env = Environment(sdxl_weights=sdxl_weights or os.environ.get("ANYSTORY_SDXL_WEIGHTS") or None,
                      sdxl_base=sdxl_base or os.environ.get("ANYSTORY_SDXL_BASE") or None,
                      miniature=miniature_status())
    env.cuda = torch.cuda.is_available()
    if env.cuda:
        props = torch.cuda.get_device_properties(0)
        env.gpu_name, env.gpu_memory_gib = props.name, props.total_memory / 2**30
    if check_flux and env.cuda and env.gpu_memory_gib >= FLUX_MIN_GIB:
        env.flux_code = flux_pipeline_importable()
        if env.flux_code.available:
            env.flux_weights = flux_weights_status(flux_local_weights or os.environ.get("ANYSTORY_FLUX_WEIGHTS"))
    return env


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
    pipe = load_flux_release(os.environ.get("ANYSTORY_FLUX_WEIGHTS"), torch_dtype=torch.bfloat16,
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


class NoModelError(RuntimeError):
    """No model could be loaded; the message lists why for each."""


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
    defaults: Optional[Defaults] = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self):
        if self.defaults is None:
            self.defaults = defaults_for(self.kind, self.pipe)
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


# ---- generation ---------------------------------------------------------------------------------------------------
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


class GenerationError(RuntimeError):
    """Generation failed for a reason the user can act on (the message says how)."""


def check_request(handle: ModelHandle, req: Request) -> dict:
    """Every numeric and text input checked against the loaded model; returns the pipeline's keyword arguments."""
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
    if len(req.subjects) > handle.max_subjects:
        raise InputError(f"Too many subjects: {len(req.subjects)} given, this model takes at most {handle.max_subjects}.")
    return dict(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps, guidance_scale=guidance,
                height=sizes[0], width=sizes[1], num_images_per_prompt=num)


def generate(handle: ModelHandle, req: Request, progress: Optional[Callable[[int, int], None]] = None,
             out_dir: Optional[str] = None) -> Result:
    """Check, run, and package one generation: images, routing overlays, a colour key, PNG files to download."""
    kwargs = check_request(handle, req)
    seed = resolve_seed(req.seed)
    steps = kwargs["num_inference_steps"]
    maps_wanted = handle.returns_routing_maps

    def on_step(pipe, i, t, tensors):
        if progress is not None:
            progress(i + 1, steps)
        return {}

    call = dict(kwargs, subjects=list(req.subjects), generator=torch.Generator("cpu").manual_seed(seed),
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
    with handle.lock:
        try:
            out = handle.pipe(**call)
        except InputError:
            raise
        except ValueError as e:  # the pipeline's own check_inputs / prepare_subjects
            raise InputError(str(e)) from None
        except Exception as e:
            if is_out_of_memory(e):
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                what = (f"{kwargs['width']}x{kwargs['height']} with {len(req.subjects)} subject(s) and "
                        f"{kwargs['num_images_per_prompt']} image(s)")
                raise GenerationError(OOM_ADVICE.format(what=what)) from e
            raise
    seconds = time.perf_counter() - start
    images = list(out.images)
    names = [s.name or f"subject {i + 1}" for i, s in enumerate(req.subjects)]
    maps = getattr(out, "routing_maps", None) if maps_wanted else None
    overlays, route_maps, per_subject, legend, note = [], [], [], "", ""
    if maps:
        last = maps[-1]
        pictures = [_subject_picture(s) for s in req.subjects]
        colors = req.colors or contrasting_colors([dominant_color(im, m) if im is not None else (128, 128, 128)
                                                   for im, m in pictures])
        for b, image in enumerate(images):
            overlays.append(routing_overlay(image, last[min(b, last.shape[0] - 1)], colors=colors))
            route_maps.append(routing_colormap(last[min(b, last.shape[0] - 1)], image.size, colors=colors))
            per_subject.append(subject_overlays(image, last[min(b, last.shape[0] - 1)], colors=colors))
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
    info = (f"Seed **{seed}** - {steps} steps, guidance {kwargs['guidance_scale']:g}, "
            f"{kwargs['width']}x{kwargs['height']}, {len(req.subjects)} subject(s) - {seconds:.1f} s on {handle.device}."
            + ignored)
    return Result(images, overlays, legend, seed, files, info, note, route_maps, per_subject, names)


# ---- UI glue (still Gradio-free) ----------------------------------------------------------------------------------
SLOT_FIELDS = ("image", "mask", "drawn", "name", "scale", "reference_scale", "region")


def slots_from_values(values: Sequence[Any]) -> List[SubjectSlot]:
    """Flat UI values (``SLOT_FIELDS`` per slot, in order) -> :class:`SubjectSlot` list."""
    n = len(SLOT_FIELDS)
    if len(values) % n:
        raise ValueError(f"expected a multiple of {n} slot values, got {len(values)}")
    return [SubjectSlot(**dict(zip(SLOT_FIELDS, values[i:i + n]))) for i in range(0, len(values), n)]


def run_generation(handle: ModelHandle, segmenter, slots: Sequence[SubjectSlot], prompt: str, negative_prompt: str = "",
                   seed: Any = -1, steps: Any = None, guidance: Any = None, width: Any = None, height: Any = None,
                   num_images: Any = 1, progress: Optional[Callable[[int, int], None]] = None,
                   out_dir: Optional[str] = None) -> Result:
    """The Generate tab: subjects from the slots (validated, masks resolved), then :func:`generate`."""
    subjects, sources = collect_subjects(slots, handle.max_subjects, segmenter)
    req = Request(prompt, subjects, negative_prompt, seed, steps, guidance, height, width, num_images)
    check_request(handle, req)  # prompt and numbers before any matting output is shown
    result = generate(handle, req, progress, out_dir)
    result.info += "  \nMasks: " + "; ".join(sources) + "."
    return result


def story_subjects(script: Script, segmenter, max_characters: int = 16) -> Dict[str, Subject]:
    """One validated Subject per character with a reference (matting runs once per character, not per shot)."""
    acting = {a for i in range(len(script.shots)) for a in shot_cast(script, i)}
    chars = [c for c in script.characters if c.reference is not None or c.alias in acting]
    for c in chars:
        if c.reference is None:
            raise InputError(f"Character '{c.alias}' acts in a shot but has no reference image; upload one.")
    slots = [SubjectSlot(c.reference, c.mask, None, c.alias, c.scale, c.reference_scale) for c in chars]
    subjects, _ = collect_subjects(slots, max_characters, segmenter, require_one=False, noun="Character")
    return {c.alias: s for c, s in zip(chars, subjects)}


def _subject_picture(subject: Subject) -> tuple:
    """(image, boolean mask) of a subject, for its legend colour and thumbnail; (None, None) when not at hand."""
    if not isinstance(subject.image, Image.Image):
        return None, None
    try:
        mask = read_mask(subject.mask) if subject.mask is not None else AlphaOrWholeImageSegmenter()(subject.image)
    except ValueError:
        mask = None
    return subject.image, mask


def _reference_picture(reference: Any) -> tuple:
    """(image, mask) of a character's reference as the default segmenter sees it; (None, None) when unreadable."""
    if reference is None:
        return None, None
    try:
        image = load_image_file(reference, "reference")
        return image, AlphaOrWholeImageSegmenter()(image)
    except Exception:  # a bad reference is reported where it is used; here it only loses its colour choice
        return None, None


def story_colors(script: Script) -> Dict[str, tuple]:
    """One colour per character for the whole story, so overlays of different frames can be compared; each chosen
    to differ from the dominant colour of the character's reference (a red character is not keyed in red)."""
    pictures = [_reference_picture(c.reference) for c in script.characters]
    dominant = [dominant_color(im, m) if im is not None else (128, 128, 128) for im, m in pictures]
    return dict(zip([c.alias for c in script.characters], contrasting_colors(dominant)))


def story_legend(script: Script) -> str:
    colors = story_colors(script)
    thumbs = [thumbnail_uri(im, m) if im is not None else None
              for im, m in (_reference_picture(c.reference) for c in script.characters)]
    return legend_html([c.alias for c in script.characters], colors=[colors[c.alias] for c in script.characters],
                       thumbnails=thumbs)


def storyboard_frames(handle: ModelHandle, segmenter, script: Script, seed: Any = -1, steps: Any = None,
                      guidance: Any = None, width: Any = None, height: Any = None,
                      progress: Optional[Callable[[int, int], None]] = None,
                      out_dir: Optional[str] = None) -> Iterator[Frame]:
    """Frames of ``script`` one by one; one seed for the whole story (resolved once) keeps characters consistent."""
    story_seed = resolve_seed(script.settings.get("seed", seed) if seed in (None, "", -1) else seed)
    steps = steps if steps not in (None, "") else script.settings.get("steps")
    guidance = guidance if guidance not in (None, "") else script.settings.get("guidance")
    width = width if width not in (None, "") else script.settings.get("width")
    height = height if height not in (None, "") else script.settings.get("height")
    subjects = story_subjects(script, segmenter)
    palette = story_colors(script)
    total_shots = len(script.shots)
    done = [0]

    def run_shot(prompt, subs, shot_seed, negative):
        def shot_progress(i, n):
            if progress is not None:
                progress(done[0] * n + i, total_shots * n)

        colors = [palette[s.name] for s in subs]
        result = generate(handle, Request(prompt, subs, negative, shot_seed, steps, guidance, height, width, 1, colors),
                          shot_progress, out_dir)
        done[0] += 1
        return result

    for i in range(total_shots):  # every prompt checked before the first frame is spent
        prompt = shot_prompt(script, i)
        check_request(handle, Request(prompt, shot_subjects(script, i, subjects), script.shots[i].negative_prompt,
                                      story_seed, steps, guidance, height, width, 1))
    yield from render_storyboard(script, subjects, story_seed, run_shot, handle.max_subjects)


STORY_SLOTS = 6
STORY_FIELDS = ("alias", "description", "reference")


def script_from_ui(char_values: Sequence[Any], shot_rows: Any, title: str = "", settings: Optional[dict] = None) -> Script:
    """The Storyboard tab's slots (``STORY_FIELDS`` each) and shots table (prompt, characters) -> a checked Script."""
    n = len(STORY_FIELDS)
    chars = []
    for i in range(0, len(char_values), n):
        alias, description, reference = char_values[i:i + n]
        if not (alias or "").strip() and reference is None and not (description or "").strip():
            continue
        if not (alias or "").strip():
            raise InputError(f"Character {i // n + 1}: give it an alias (a short name used as {{alias}} in prompts).")
        chars.append({"alias": alias.strip(), "description": description or "", "reference": reference})
    rows = shot_rows.values.tolist() if hasattr(shot_rows, "values") else list(shot_rows or [])
    shots = []
    for row in rows:
        prompt = str(row[0] if len(row) > 0 and row[0] is not None else "").strip()
        cast = str(row[1] if len(row) > 1 and row[1] is not None else "").strip()
        if not prompt and not cast:
            continue
        shot = {"prompt": prompt}
        if cast:
            shot["characters"] = [a.strip() for a in cast.split(",") if a.strip()]
        shots.append(shot)
    references = {c["alias"]: c.pop("reference") for c in chars}
    data = {"title": title or "", "settings": {k: v for k, v in (settings or {}).items() if v not in (None, "")},
            "characters": chars, "shots": shots}
    try:
        script = script_from_dict(data)
    except ScriptError as e:
        raise InputError(f"Storyboard: {e}.") from None
    for c in script.characters:
        c.reference = references[c.alias]
    return script


def ui_from_script(script: Script, slots: int = STORY_SLOTS) -> tuple:
    """(flat character slot values, shot rows) to fill the Storyboard tab from an imported script."""
    if len(script.characters) > slots:
        raise InputError(f"The script has {len(script.characters)} characters; this page shows at most {slots}.")
    values: List[Any] = []
    for i in range(slots):
        if i < len(script.characters):
            c = script.characters[i]
            values += [c.alias, c.description, c.reference]
        else:
            values += ["", "", None]
    rows = [[s.prompt, ", ".join(s.characters) if s.characters is not None else ""] for s in script.shots]
    return values, rows


def export_script_files(script: Script, out_dir: str) -> List[str]:
    """script.yaml, script.json (reference names only) and a .zip bundle with the images, for download."""
    os.makedirs(out_dir, exist_ok=True)
    names = {c.alias: f"references/{c.alias}.png" for c in script.characters if c.reference is not None}
    paths = []
    for fmt in ("yaml", "json"):
        path = os.path.join(out_dir, f"storyboard.{fmt}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(dump_script(script, fmt, names))
        paths.append(path)
    paths.append(export_bundle(script, os.path.join(out_dir, "storyboard.zip")))
    return paths
