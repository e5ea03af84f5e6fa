"""Subject preprocessing of the authors' FLUX release, so the released weights see what they saw there.

Two entry points of the release differ, and a user of either gets it here (``subject_preprocessing``):

``"app"`` (default), the authors' demo (``app.py::image_matting``): the mask is binarised at ``> 200`` (8-bit
values); without a mask, an alpha channel that is not everywhere ``> 200`` is the mask (same threshold), else
the pipeline's ``Segmenter`` decides. The crop is the app's integer arithmetic on the inclusive bounding box:
centre ``(min + max) // 2``, side ``1.04 * max(w, h)`` measured between the extreme pixels, corner
``centre - side // 2``, passed as floats to ``PIL.Image.crop`` (which rounds them). The image (alpha dropped, as
``convert("RGB")``) is kept inside the mask and white outside; the mask stays binary.

``"none"``, the authors' ``generate()`` / ``inference.py``: image and mask as given, no crop, and a soft mask
keeps its values: the encoders multiply the image by ``mask / 255`` and a token is the subject's where the
pooled mask is above 0.

Either way the encoders then take the release's arithmetic (``AnyStoryFluxPipeline.encode_subjects``): SigLIP's
mask through the SigLIP processor with nearest resampling, the reference mask by a nearest PIL resize.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import InvalidInputError
from ..images import has_alpha, read_image, read_mask_image, to_rgb
from ..subjects import AlphaOrWholeImageSegmenter, PreparedSubject, Segmenter, as_subject_list, prepare_subjects

RELEASE_MASK_THRESHOLD = 200  # the authors' app: np.array(mask) > 200
RELEASE_CROP_EXPAND = 1.04
PREPROCESSING = ("app", "none")


@dataclass
class ReleaseSubject(PreparedSubject):
    """A subject as the release hands it to its encoders: ``mask_values`` (uint8, HxW of ``image``) is what the
    encoders multiply by (``/ 255``); ``mask`` stays the boolean foreground (``mask_values > 0``)."""

    mask_values: Optional[np.ndarray] = None


def mask_values(mask) -> np.ndarray:
    """8-bit values of a mask as the app receives it (an ``L`` image); an alpha channel that varies is the mask."""
    image = read_mask_image(mask)
    if has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() != alpha.max():
            return alpha
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = to_rgb(image)
    values = np.asarray(image.convert("L"))
    # a 0/1 mask marks its subject (anystory/images.py's rule); as 0/255 it means that to the release's arithmetic
    return values * np.uint8(255) if values.max() == 1 else values


def release_rgb(image: Image.Image) -> Image.Image:
    """The app's ``convert("RGB")``: an alpha channel is dropped, not composited (the mask removes the rest)."""
    return image.convert("RGBA").convert("RGB") if has_alpha(image) else to_rgb(image)


def release_crop_box(binary: np.ndarray) -> tuple:
    """The app's square box (floats; ``PIL.Image.crop`` rounds them)."""
    ys, xs = np.nonzero(binary)
    min_x, max_x, min_y, max_y = np.min(xs), np.max(xs), np.min(ys), np.max(ys)
    cx, cy = (min_x + max_x) // 2, (min_y + max_y) // 2
    s = max(max_x - min_x, max_y - min_y) * RELEASE_CROP_EXPAND
    x0, y0 = cx - s // 2, cy - s // 2
    return x0, y0, x0 + s, y0 + s


def release_matting(image: Image.Image, binary: np.ndarray):
    """``app.py::image_matting`` after the mask is known: (segmented square crop RGB, its 0/255 mask)."""
    box = release_crop_box(binary)
    crop = np.asarray(release_rgb(image).crop(box))
    mask = np.asarray(Image.fromarray((binary * 255).astype(np.uint8)).crop(box))
    m = mask[..., None] / 255.0
    return Image.fromarray((m * crop + (1 - m) * 255.0).astype(np.uint8)), mask


class _Remembering(Segmenter):
    """The pipeline's segmenter, run once per image: validation and the release's preparation share its mask."""

    def __init__(self, segmenter: Segmenter):
        self.inner, self.name, self.masks = segmenter, segmenter.name, []

    def __call__(self, image):
        mask = np.asarray(self.inner(image), dtype=bool)
        self.last_source = getattr(self.inner, "last_source", None)
        self.masks.append(mask)
        return mask


def prepare_release_subjects(subjects, max_subjects: int, segmenter: Optional[Segmenter],
                             preprocessing: str = "app") -> List[ReleaseSubject]:
    """Validate as every pipeline does (:func:`prepare_subjects`), then prepare as the release does."""
    if preprocessing not in PREPROCESSING:
        raise InvalidInputError(f"subject_preprocessing must be one of {PREPROCESSING}, got {preprocessing!r}")
    remembering = _Remembering(segmenter or AlphaOrWholeImageSegmenter())
    checked = prepare_subjects(subjects, max_subjects, remembering)
    segmented = iter(remembering.masks)
    out = []
    for i, (s, p) in enumerate(zip(as_subject_list(subjects), checked)):
        label = f"subject {i}" + (f" ({s.name})" if isinstance(s.name, str) and s.name else "")
        raw = read_image(s.image, f"{label} image")
        if s.mask is not None:
            values = mask_values(s.mask)
        else:
            found = next(segmented).astype(np.uint8) * 255
            alpha = np.asarray(raw.convert("RGBA"))[..., 3] if has_alpha(raw) else None
            # the app: an alpha channel not everywhere > 200 is the mask, else its matting model decides
            values = alpha if alpha is not None and not (alpha > RELEASE_MASK_THRESHOLD).all() else found
        if preprocessing == "none":
            out.append(ReleaseSubject(release_rgb(raw), values > 0, p.name, p.scale, p.reference_scale,
                                      p.mask_source, region=p.region, mask_values=values))
            continue
        binary = values > RELEASE_MASK_THRESHOLD
        if not binary.any():
            raise InvalidInputError(f"{label}: no mask value above {RELEASE_MASK_THRESHOLD} (the authors' threshold, "
                                    f"of 255; the largest here is {int(values.max())}): the mask marks no subject.")
        image, mask = release_matting(raw, binary)
        out.append(ReleaseSubject(image, mask > 0, p.name, p.scale, p.reference_scale, p.mask_source,
                                  region=p.region, mask_values=mask))
    return out


def encoder_mask_values(prepared: Sequence[PreparedSubject]) -> List[np.ndarray]:
    """uint8 masks the encoders multiply by (a plain ``PreparedSubject``'s boolean mask as 0/255)."""
    return [p.mask_values if getattr(p, "mask_values", None) is not None else p.mask.astype(np.uint8) * 255
            for p in prepared]
