"""What the demo accepts from a user, checked before any model runs, with messages that say what to change.

Everything here is plain Python (no Gradio) so the bad-input tests call exactly what the app calls. Limits are
module constants so a Space can tune them in one place. :class:`InputError` is an
:class:`~anystory.errors.InvalidInputError`, the one kind of error the UI shows as the user's to fix; only those
are relabelled here (any other exception is a bug and passes unchanged).
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .. import errors
from ..errors import InputError, InvalidInputError
from ..images import read_image, read_mask_image
from ..regions import Box, check_region, parse_region_text
from ..subjects import Segmenter, Subject, prepare_subjects

MAX_UPLOAD_MB = 10
MAX_UPLOAD_BYTES = MAX_UPLOAD_MB * 1024 * 1024
#: Pixel limit per uploaded image (decompression bombs, and RAM for matting); 4096 x 4096.
MAX_IMAGE_PIXELS = 4096 * 4096
SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SUPPORTED_FORMATS = {"PNG", "JPEG", "WEBP", "BMP", "TIFF", "MPO"}  # MPO: phone JPEGs with a depth frame
MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**31 - 1
MAX_NAME_CHARS = 64


class UploadPath(str):
    """An upload's path on the server (``<random>/upload.png``: anystory/app/retention.py) that remembers the
    name the visitor gave it, for messages only; it is never written to disk."""

    orig_name: Optional[str] = None


def shown_name(path: Any) -> str:
    """The name a user knows a file by: the visitor's own for an upload, else the file's name."""
    return getattr(path, "orig_name", None) or os.path.basename(os.fspath(path))


def _fmt_mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def load_image_file(value: Any, what: str, kind: str = "image") -> Image.Image:
    """An uploaded image or mask (path, PIL image or array), checked for size, type and pixel count, then read by
    :mod:`anystory.images`' one rule (EXIF orientation, array dtypes; an image may not be fully transparent).

    Returns a loaded PIL image. ``kind="mask"`` skips the transparency check: a mask's alpha is just data."""
    if isinstance(value, (Image.Image, np.ndarray)):
        source: Any = value
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        shown = shown_name(value)
        if not os.path.isfile(path):
            raise InputError(f"{what}: file not found: {shown}")
        ext = os.path.splitext(path)[1].lower()
        if ext not in SUPPORTED_EXTENSIONS:
            raise InputError(f"{what}: unsupported file type '{ext or 'no extension'}' "
                             f"({shown}); use PNG, JPEG, WebP, BMP or TIFF.")
        size = os.path.getsize(path)
        if size > MAX_UPLOAD_BYTES:
            raise InputError(f"{what}: the file is {_fmt_mb(size)}; the limit is {MAX_UPLOAD_MB} MB. "
                             "Resize or compress it.")
        try:
            with Image.open(path) as probe:  # header only: size and format before any pixel is decoded
                fmt, (w, h) = probe.format, probe.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise InputError(f"{what}: the image is too large to decode safely.") from None
        except Exception as e:  # PIL raises several types for files that are not images
            raise InputError(f"{what}: cannot read {shown} as an image ({type(e).__name__}); "
                             "upload a PNG, JPEG, WebP, BMP or TIFF image.") from None
        if w * h > MAX_IMAGE_PIXELS:
            raise InputError(_too_many_pixels(what, w, h))
        if fmt not in SUPPORTED_FORMATS:
            raise InputError(f"{what}: unsupported image format {fmt} ({shown}); "
                             "use PNG, JPEG, WebP, BMP or TIFF.")
        source = path
    else:
        raise InputError(f"{what}: expected an image file, got {type(value).__name__}")
    try:
        if isinstance(source, np.ndarray) and source.ndim in (2, 3) and source.size:
            if source.shape[0] * source.shape[1] > MAX_IMAGE_PIXELS:
                raise InputError(_too_many_pixels(what, source.shape[1], source.shape[0]))
        img = read_mask_image(source, what) if kind == "mask" else read_image(source, what)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"{what}: the image is too large to decode safely.") from None
    except InvalidInputError as e:
        message = str(e)
        if isinstance(source, str):  # the user knows the upload by its name, not by the server's temp path
            message = message.replace(source, shown)
            if "cannot read image file" in message:
                message = (f"{what}: cannot read {shown} as an image: the file is damaged or "
                           "truncated. Upload it again or use another image.")
        raise InputError(message) from None
    if img.width * img.height > MAX_IMAGE_PIXELS:
        raise InputError(_too_many_pixels(what, img.width, img.height))
    if img.width == 0 or img.height == 0:
        raise InputError(f"{what}: the image is empty ({img.width}x{img.height}).")
    return img


def _too_many_pixels(what: str, w: int, h: int) -> str:
    side = int(MAX_IMAGE_PIXELS**0.5)
    return f"{what}: the image is {w}x{h} pixels; the limit is {side}x{side} ({MAX_IMAGE_PIXELS / 1e6:.1f} MP). Resize it."


def editor_layers(value: Optional[dict]) -> List[Image.Image]:
    """The RGBA layers of an image editor's value (what the user painted), in order; none for an empty editor."""
    if not value:
        return []
    return [(layer if isinstance(layer, Image.Image) else Image.fromarray(np.asarray(layer))).convert("RGBA")
            for layer in value.get("layers") or [] if layer is not None]


def editor_strokes(value: Optional[dict]) -> List[Tuple[Tuple[int, int], np.ndarray]]:
    """(size, painted-pixel mask) of every editor layer that holds a stroke."""
    strokes = [(layer.size, np.asarray(layer)[..., 3] > 0) for layer in editor_layers(value)]
    return [(size, alpha) for size, alpha in strokes if alpha.any()]


def drawn_mask(editor_value: Optional[dict], image_size: Tuple[int, int], what: str) -> Optional[np.ndarray]:
    """The mask a user painted in the image editor (any layer's strokes), or None when nothing was painted."""
    strokes = editor_strokes(editor_value)
    if not strokes:
        return None
    sizes = {s for s, _ in strokes}
    if sizes != {tuple(image_size)}:
        (w, h), (iw, ih) = next(iter(sizes)), image_size
        raise InputError(f"{what}: the drawn mask is {w}x{h} but the image is {iw}x{ih}; "
                         "draw over the subject image itself (it is loaded into the editor) or upload a mask.")
    return np.logical_or.reduce([a for _, a in strokes])


def drawn_region(editor_value: Optional[dict], label: str) -> Optional[Box]:
    """The box around every stroke on a region canvas (``anystory/app/region_canvas.py``), in fractions of the
    canvas, which has the output's shape; None when nothing is drawn."""
    strokes = editor_strokes(editor_value)
    if not strokes:
        return None
    w, h = strokes[0][0]
    if any(size != (w, h) for size, _ in strokes):
        raise InputError(f"{label}: the region canvas's layers differ in size; clear the canvas and draw again.")
    painted = np.logical_or.reduce([a for _, a in strokes])
    rows, cols = np.flatnonzero(painted.any(axis=1)), np.flatnonzero(painted.any(axis=0))
    box = (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)
    return check_region(tuple(round(float(v), 3) for v in box), label)


def slot_region(slot: "SubjectSlot", label: str) -> Optional[Box]:
    """A slot's region: the typed box when the field is filled (the precise form), else the drawn one."""
    try:
        if slot.region is not None and str(slot.region).strip():
            return parse_region_text(slot.region, label)
        return drawn_region(slot.region_drawn, label)
    except InputError:
        raise
    except InvalidInputError as e:
        raise InputError(str(e)) from None


@dataclass
class SubjectSlot:
    """One subject as the UI collects it: a reference image, an optional uploaded or drawn mask, a name, scales."""

    image: Any = None
    mask: Any = None
    drawn: Optional[dict] = None
    name: str = ""
    scale: float = 1.0
    reference_scale: float = 1.0
    region: Optional[str] = None  # "x0, y0, x1, y1" in fractions of the output (anystory/regions.py), blank = anywhere
    region_drawn: Optional[dict] = None  # the region canvas's editor value; used when ``region`` is blank

    def is_empty(self) -> bool:
        return self.image is None and self.mask is None and not (self.drawn and self.drawn.get("layers"))


def collect_subjects(slots: Sequence[SubjectSlot], max_subjects: int, segmenter: Segmenter,
                     require_one: bool = True, noun: str = "Subject") -> Tuple[List[Subject], List[str]]:
    """Validated :class:`Subject` objects with full-size masks, and where each mask came from.

    Masks are resolved here (upload, else drawing, else ``segmenter``) so the user sees the source, and the
    pipelines receive explicit masks: matting runs once per subject.
    """
    used = [(i, s) for i, s in enumerate(slots) if not s.is_empty()]
    if require_one and not used:
        raise InputError("No subject image: upload at least one reference image.")
    if len(used) > max_subjects:
        raise InputError(f"Too many subjects: {len(used)} given, this model takes at most {max_subjects}. "
                         "Remove some subjects.")
    subjects, sources = [], []
    for i, slot in used:
        name = check_name(slot.name, f"{noun} {i + 1} name")
        label = f"{noun} {i + 1}" + (f" ({name})" if name else "")
        if slot.image is None:
            raise InputError(f"{label}: a mask was given but no image; upload the subject's reference image.")
        image = load_image_file(slot.image, f"{label} image")
        if slot.mask is not None:
            mask: Any = load_image_file(slot.mask, f"{label} mask", kind="mask")
            source = "uploaded mask"
        else:
            mask = drawn_mask(slot.drawn, image.size, label)
            source = "drawn mask"
            if mask is None:
                mask = np.asarray(segmenter(image), dtype=bool)
                source = f"automatic ({getattr(segmenter, 'last_source', None) or segmenter.name})"
        region = slot_region(slot, label)
        subject = Subject(image=image, mask=mask, name=name or f"subject {i + 1}",
                          scale=slot.scale, reference_scale=slot.reference_scale, region=region)
        try:  # the shared checks (mask size and content, scales), relabelled with the UI's 1-based numbering
            prepare_subjects([Subject(image, mask, "", subject.scale, subject.reference_scale)], max_subjects)
        except InvalidInputError as e:
            raise InputError(re.sub(r"^subject 0", label, str(e))) from None
        subjects.append(subject)
        sources.append(f"{label}: {source}")
    return subjects, sources


def prompt_tokenizer(pipe) -> Tuple[Any, int]:
    """The tokenizer that carries the prompt, and its limit: FLUX's T5 (512) beats CLIP (77, SDXL's two)."""
    candidates = [t for t in (getattr(pipe, "tokenizer_2", None), getattr(pipe, "tokenizer", None))
                  if t is not None and 0 < getattr(t, "model_max_length", 0) <= 4096]
    if not candidates:
        return None, 0
    best = max(candidates, key=lambda t: t.model_max_length)
    return best, best.model_max_length


def check_prompt(prompt: Optional[str], pipe, what: str = "Prompt", required: bool = True) -> str:
    """The stripped prompt; an error when it is not text, missing, or longer than the text encoder reads (it would
    be cut)."""
    if prompt is not None and not isinstance(prompt, str):
        raise InputError(f"{what} must be text, got {type(prompt).__name__}.")
    text = (prompt or "").strip()
    if not text:
        if required:
            raise InputError(f"{what} is empty: describe the scene, e.g. 'a cat and an astronaut in a cafe'.")
        return ""
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"{what} is too long: {len(text)} characters; the limit is {MAX_PROMPT_CHARS}.")
    tok, limit = prompt_tokenizer(pipe)
    if tok is not None:
        n = len(tok(text, truncation=False).input_ids)
        if n > limit:
            raise InputError(f"{what} is too long: {n} tokens, the text encoder reads at most {limit} "
                             "(the rest would be silently dropped). Shorten it.")
    return text


def resolve_seed(seed: Any, rng: Optional[random.Random] = None) -> int:
    """-1 (or empty) means random; anything else must be an integer in [0, 2**31 - 1]."""
    if seed is None or seed == "":
        seed = -1
    try:
        value = int(float(seed))
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"Seed must be an integer (-1 for random), got {seed!r}.") from None
    if value == -1:
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)
    if not 0 <= value <= MAX_SEED:
        raise InputError(f"Seed must be -1 (random) or between 0 and {MAX_SEED}, got {value}.")
    return value


def check_name(name: Any, what: str) -> str:
    """A subject's name: text of at most :data:`MAX_NAME_CHARS` characters (it labels the legend and files)."""
    if name is None:
        return ""
    if not isinstance(name, str):
        raise InputError(f"{what} must be text, got {type(name).__name__}.")
    name = name.strip()
    if len(name) > MAX_NAME_CHARS:
        raise InputError(f"{what} is too long: {len(name)} characters; the limit is {MAX_NAME_CHARS}.")
    return name


def random_seed(seed: Any) -> bool:
    """Whether a form's seed asks for a random one (-1 or empty); anything else is checked where it is used."""
    if seed is None or seed == "":
        return True
    try:
        return float(seed) == -1
    except (TypeError, ValueError):
        return False


def subject_count(value: Any, most: int) -> int:
    """The page's hidden subject count for showing slots: a bad value shows one slot (Generate names it)."""
    try:
        return max(1, min(most, int(float(value or 1))))
    except (TypeError, ValueError, OverflowError):
        return 1


def check_number(value: Any, what: str, lo: float, hi: float, integer: bool = False) -> float:
    return errors.check_number(value, what, lo, hi, integer=integer, error=InputError)
