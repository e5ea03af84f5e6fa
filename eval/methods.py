"""Where each method's images come from: a pipeline we run, a folder of someone else's images, or a reference row.

* ``anystory-sdxl`` / ``anystory-flux`` / ``anystory-miniature``: our pipelines, imported only here (generation),
  so scoring works without them. Images go to ``<run>/images/<method>/<entry_id>/<k>.png`` with a sidecar
  ``<k>.json`` (seed; for several subjects the boxes read from the last step's routing maps).
* ``folder:PATH``: any method's images, in one of the layouts below; nothing is generated.
* ``real-images``: the subject's *other* real photos as outputs (the DreamBooth real-vs-real oracle; a photo
  is never compared with itself, so a subject with a single photo has no oracle row: status ``n/a``).
* ``copy-reference``: the reference photo returned unchanged (the copy-paste extreme).

Folder layouts (``python -m eval.run --bench B --list-entries`` prints every entry id, list index and prompt)::

    ours:  PATH/<entry_id>/<k>.png     k = 0 .. images-per-prompt-1; .jpg, .jpeg and .webp also accepted
           PATH/<entry_id>/<k>.json    optional: {"boxes": [[x0, y0, x1, y1] or null per subject], "region_source": ...}
    uno:   PATH/<index>_<k>.png        UNO's inference.py naming: index = position in the benchmark's list

Extensions are matched in either case; an empty (zero-byte) file counts as absent, so it never hides another.

For multi-subject entries the reference rows are the subjects' photos side by side, each at its own size,
with their boxes in the sidecar.
"""
from __future__ import annotations

import abc
import os
import re
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from anystory.errors import MethodError
from anystory.images import read_rgb
from anystory.presets import preset

from .atomic import save_image, write_json
from .loaders.base import Entry

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LAYOUTS = {"ours": "PATH/<entry_id>/<k>.png", "uno": "PATH/<index>_<k>.png"}
#: Each pipeline method and the preset (``anystory/presets.py``) it runs with, unless the run sets steps or guidance.
METHOD_PRESETS = {"anystory-sdxl": "sdxl", "anystory-flux": "flux", "anystory-miniature": "miniature"}
PIPELINE_METHODS = tuple(METHOD_PRESETS)
REFERENCE_METHODS = ("real-images", "copy-reference")


def image_seed(base_seed: int, entry: Entry, k: int, images_per_prompt: int) -> int:
    """Seed of image ``k`` of ``entry``: fixed by the entry's position in the *full* benchmark, so a subset
    or a resumed run draws the same noise as the full uninterrupted run."""
    return base_seed + entry.index * images_per_prompt + k


class Method(abc.ABC):
    name: str
    generates = False

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", self.name).strip("_") or "method"

    @abc.abstractmethod
    def image_path(self, entry: Entry, k: int) -> Optional[str]:
        """Where image ``k`` of ``entry`` is (or will be); ``None`` when a folder lacks it."""

    def expected_path(self, entry: Entry, k: int) -> str:
        """Where image ``k`` of ``entry`` should be (named when it is missing)."""
        return self.image_path(entry, k) or ""

    def not_applicable(self, entry: Entry, k: int) -> Optional[str]:
        """Why this method has deliberately no image here (never counted as missing), else ``None``."""
        return None

    def expected_layout(self) -> str:
        return "written by the generation stage (run it, or --stage all)"

    def sidecar_path(self, entry: Entry, k: int) -> Optional[str]:
        path = self.image_path(entry, k)
        return None if path is None else os.path.splitext(path)[0] + ".json"

    def needs_generation(self, entry: Entry, k: int) -> bool:
        return False

    def generate(self, entry: Entry, k: int, seed: int) -> None:  # pragma: no cover - generating methods
        raise NotImplementedError

    def exclude(self, entry: Entry, k: int, slot: int) -> Optional[str]:
        """A real photo to leave out of the comparison set of subject ``slot`` (the image itself)."""
        return None

    def describe(self) -> Dict[str, str]:
        return {"name": self.name}


class OutputFolderMethod(Method):
    """A method whose images we write into the run folder."""

    generates = True

    def __init__(self, name: str, run_dir: str):
        self.name, self.run_dir = name, run_dir

    def image_path(self, entry: Entry, k: int) -> str:
        return os.path.join(self.run_dir, "images", self.slug, entry.entry_id, f"{k}.png")

    def needs_generation(self, entry: Entry, k: int) -> bool:
        return not os.path.isfile(self.image_path(entry, k))

    def expected_layout(self) -> str:
        return (f"{os.path.join(self.run_dir, 'images', self.slug)}/<entry_id>/<k>.png, written by the generation "
                "stage (run it, or --stage all)")

    def write(self, entry: Entry, k: int, image: Image.Image, sidecar: dict) -> None:
        """Sidecar first, image last: an image on disk means both are complete."""
        write_json(self.sidecar_path(entry, k), sidecar)
        save_image(self.image_path(entry, k), image)


class FolderMethod(Method):
    def __init__(self, path: str, name: Optional[str] = None, layout: str = "ours"):
        if layout not in LAYOUTS:
            raise MethodError(f"unknown folder layout '{layout}'; choose one of {', '.join(LAYOUTS)}")
        self.path, self.layout = os.path.abspath(path), layout
        if not os.path.isdir(self.path):
            raise MethodError(f"folder method: {self.path} is not a folder (layout {layout}: {LAYOUTS[layout]}; "
                              "see docs/evaluation.md or --list-entries)")
        self.name = name or f"folder:{os.path.basename(self.path.rstrip(os.sep))}"

    def _stem(self, entry: Entry, k: int) -> str:
        if self.layout == "uno":
            return os.path.join(self.path, f"{entry.index}_{k}")
        return os.path.join(self.path, entry.entry_id, str(k))

    def expected_path(self, entry: Entry, k: int) -> str:
        return self._stem(entry, k) + IMAGE_EXTENSIONS[0]

    def expected_layout(self) -> str:
        layout = f"'{self.layout}': {LAYOUTS[self.layout].replace('PATH', self.path)} (k = 0 .. images-per-prompt - 1)"
        other = "uno" if self.layout == "ours" else "ours"
        if other == "uno" and any(re.fullmatch(r"\d+_\d+\.\w+", n) for n in os.listdir(self.path)):
            layout += "; the folder holds <index>_<k> files: pass --layout uno"
        return layout

    def image_path(self, entry: Entry, k: int) -> Optional[str]:
        stem = self._stem(entry, k)
        for ext in IMAGE_EXTENSIONS:
            for path in (stem + ext, stem + ext.upper()):
                if os.path.isfile(path) and os.path.getsize(path) > 0:
                    return path
        return None

    def describe(self) -> Dict[str, str]:
        return {"name": self.name, "folder": self.path, "layout": self.layout}


def _side_by_side(paths: Sequence[str]):
    images = []
    for p in paths:
        images.append(read_rgb(p, os.path.basename(p)))
    width, height = sum(im.width for im in images), max(im.height for im in images)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    boxes, x = [], 0
    for im in images:
        canvas.paste(im, (x, 0))
        boxes.append([x, 0, x + im.width, im.height])
        x += im.width
    return canvas, boxes


class ReferenceMethod(OutputFolderMethod):
    """``real-images`` or ``copy-reference``: single-subject outputs are the photo files themselves;
    multi-subject outputs are side-by-side composites written into the run folder."""

    def __init__(self, name: str, run_dir: str):
        if name not in REFERENCE_METHODS:
            raise ValueError(name)
        super().__init__(name, run_dir)

    def photo(self, entry: Entry, k: int, slot: int) -> Optional[str]:
        """The photo standing for subject ``slot``; ``None`` for the oracle of a subject with one photo."""
        subject = entry.subjects[slot]
        if self.name == "copy-reference":
            return subject.reference
        others = subject.other_photos
        return others[(entry.prompt_index + k) % len(others)] if others else None

    def not_applicable(self, entry: Entry, k: int) -> Optional[str]:
        lone = [s.name for j, s in enumerate(entry.subjects) if self.photo(entry, k, j) is None]
        return f"{', '.join(lone)}: a single real photo, nothing to stand for it but itself" if lone else None

    def image_path(self, entry: Entry, k: int) -> Optional[str]:
        if len(entry.subjects) == 1:
            return self.photo(entry, k, 0)
        return super().image_path(entry, k)

    def needs_generation(self, entry: Entry, k: int) -> bool:
        return len(entry.subjects) > 1 and not self.not_applicable(entry, k) and super().needs_generation(entry, k)

    def generate(self, entry: Entry, k: int, seed: int) -> None:
        image, boxes = _side_by_side([self.photo(entry, k, j) for j in range(len(entry.subjects))])
        self.write(entry, k, image, {"boxes": boxes, "region_source": "composite layout", "seed": None})

    def sidecar_path(self, entry: Entry, k: int) -> Optional[str]:
        return None if len(entry.subjects) == 1 else super().sidecar_path(entry, k)

    def exclude(self, entry: Entry, k: int, slot: int) -> Optional[str]:
        return self.photo(entry, k, slot) if self.name == "real-images" else None


def boxes_from_routing(maps, n_subjects: int, size) -> List[Optional[List[int]]]:
    """Per subject, the box (in image pixels) of the latent cells routed to it at the last step."""
    last = np.asarray(maps.float().cpu().numpy() if hasattr(maps, "cpu") else maps)
    owner = last.argmax(axis=0)
    h, w = owner.shape
    boxes = []
    for i in range(n_subjects):
        ys, xs = np.nonzero(owner == i)
        if not len(ys):
            boxes.append(None)
            continue
        sx, sy = size[0] / w, size[1] / h
        boxes.append([int(xs.min() * sx), int(ys.min() * sy), int(np.ceil((xs.max() + 1) * sx)),
                      int(np.ceil((ys.max() + 1) * sy))])
    return boxes


class PipelineMethod(OutputFolderMethod):
    """Runs an AnyStory pipeline: one image per call with its own seeded generator (reproducible per image,
    whichever images a resumed run still has to make)."""

    def __init__(self, name: str, run_dir: str, load: Callable[[], object], call_kwargs: Optional[dict] = None,
                 info: Optional[Dict[str, str]] = None):
        super().__init__(name, run_dir)
        self._load, self.call_kwargs, self.info = load, dict(call_kwargs or {}), dict(info or {})
        self.pipe = None

    def describe(self) -> Dict[str, str]:
        return dict(self.info, name=self.name, **{k: str(v) for k, v in self.call_kwargs.items()})

    def generate(self, entry: Entry, k: int, seed: int) -> None:
        import torch

        from anystory.subjects import Subject

        if self.pipe is None:
            try:
                self.pipe = self._load()
            except MethodError:
                raise
            except Exception as e:  # a model that cannot load is a setup problem: never load it again per image
                raise MethodError(f"{self.name} could not be loaded ({type(e).__name__}: {str(e)[:300]})") from e
            if hasattr(self.pipe, "set_progress_bar_config"):
                self.pipe.set_progress_bar_config(disable=True)
        several = len(entry.subjects) > 1
        out = self.pipe(entry.prompt, subjects=[Subject(s.reference, name=s.name) for s in entry.subjects],
                        generator=torch.Generator("cpu").manual_seed(seed), return_routing_maps=several,
                        **self.call_kwargs)
        image = out.images[0]
        sidecar = {"seed": seed, "prompt": entry.prompt}
        maps = getattr(out, "routing_maps", None)
        if several and maps:
            sidecar.update(boxes=boxes_from_routing(maps[-1][0], len(entry.subjects), image.size),
                           region_source="routing-map")
        self.write(entry, k, image, sidecar)


def _load_miniature(device: str):
    try:
        from anystory.loading import load_miniature
    except ImportError as e:
        raise MethodError(f"anystory-miniature needs the shipped miniature (anystory.loading.load_miniature), "
                          f"which cannot be imported here: {e}") from e
    return load_miniature(device=device)


def _load_sdxl(weights: Optional[str], base: Optional[str], device: str):
    if not weights:
        raise MethodError("anystory-sdxl needs AnyStory SDXL weights: pass --anystory-weights DIR (or set "
                          "ANYSTORY_SDXL_WEIGHTS); --base-model picks the SDXL base (hub id or folder)")
    from anystory.loading import ModelUnavailableError, load_sdxl_anystory

    try:
        return load_sdxl_anystory(weights, base, device=device)
    except (ModelUnavailableError, FileNotFoundError) as e:
        raise MethodError(f"anystory-sdxl: {e}") from e


def _load_flux(weights: Optional[str], base: Optional[str], device: str):
    from anystory.loading import load_flux_release

    try:
        pipe = load_flux_release(weights, flux=base)
    except Exception as e:
        raise MethodError(f"anystory-flux could not be loaded ({type(e).__name__}: {str(e)[:300]}); pass local "
                          "folders with --base-model (FLUX.1-dev) and --anystory-weights") from e
    return pipe.to(device)


def preset_call(spec: str) -> dict:
    """The pipeline keywords a pipeline method runs with unless the run sets them (its model's preset); ``{}`` for
    the other methods."""
    return preset(METHOD_PRESETS[spec]).call() if spec in METHOD_PRESETS else {}


def make_method(spec: str, run_dir: str, *, device: str = "cpu", anystory_weights: Optional[str] = None,
                base_model: Optional[str] = None, call_kwargs: Optional[dict] = None, layout: str = "ours") -> Method:
    """A method from its command-line name (see the module docstring); ``layout`` is that of ``folder:`` ones."""
    if spec.startswith("folder:"):
        return FolderMethod(spec[len("folder:"):], layout=layout)
    if spec in REFERENCE_METHODS:
        return ReferenceMethod(spec, run_dir)
    if spec not in PIPELINE_METHODS:
        raise MethodError(f"unknown method '{spec}': use {', '.join(PIPELINE_METHODS + REFERENCE_METHODS)} or "
                          "folder:PATH")
    kwargs = dict(preset_call(spec), **{k: v for k, v in (call_kwargs or {}).items() if v is not None})
    if spec == "anystory-miniature":
        return PipelineMethod(spec, run_dir, lambda: _load_miniature(device), kwargs, {"weights": "shipped miniature"})
    weights = anystory_weights or (os.environ.get("ANYSTORY_SDXL_WEIGHTS") if spec == "anystory-sdxl" else None)
    if spec == "anystory-sdxl":
        if not weights:  # refuse before the run folder records anything, so the same --out works once corrected
            _load_sdxl(weights, base_model, device)
        return PipelineMethod(spec, run_dir, lambda: _load_sdxl(weights, base_model, device), kwargs,
                              {"weights": str(weights), "base": str(base_model or "default SDXL base")})
    return PipelineMethod(spec, run_dir, lambda: _load_flux(weights, base_model, device), kwargs,
                          {"weights": str(weights or "released"), "base": str(base_model or "FLUX.1-dev")})
