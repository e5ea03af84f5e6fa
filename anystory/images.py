"""Reading images and masks as the user means them: one rule for every place an image or mask enters.

``Subject``, both pipelines, the app's uploads, storyboard references and the eval loaders all call
:func:`read_image` / :func:`read_mask`, so a photo reads the same everywhere and a bad one gets the same
``ValueError`` naming the problem.

Images. A file or PIL image is turned upright by its EXIF orientation first (a phone photo is used as it is
displayed). Arrays (HxW, HxWx1, HxWx3, HxWx4) are read by dtype and range: uint8 as is; uint16 scaled to 8 bits;
bool as 0/255; other integer types when their values lie in [0, 255]; float in [0, 1] or in [0, 255] (values
all <= 1 are read as [0, 1]); anything else is a ``ValueError`` naming the dtype and the range. A fully
transparent image is refused: there is nothing in it to use.

Masks. PIL images in any mode and bool / integer / float arrays. An RGBA (LA, PA, transparent P) mask uses its
alpha channel when the alpha varies, else its luminance (editors export opaque RGBA). The foreground is decided
relative to the mask's own range: values above the midpoint of its minimum and maximum, so 0/1, 0/255, 0..1 and
0..255 masks all work; a constant mask is all foreground when nonzero, all background when zero. EXIF orientation
is applied to mask files too, so a mask drawn on the photo as displayed matches it.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from .errors import InvalidInputError

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: ITU-R 601-2 luma, the weights of PIL's ``convert("L")``.
_LUMA = np.array([0.299, 0.587, 0.114])


def _range(arr: np.ndarray) -> str:
    return f"{arr.dtype} in [{arr.min():g}, {arr.max():g}]" if arr.size else f"{arr.dtype} (empty)"


def _check_shape(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise InvalidInputError(f"{what}: array must be HxW or HxWxC and non-empty, got shape {arr.shape}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        raise InvalidInputError(f"{what}: array must have 1, 3 or 4 channels (HxWxC), got shape {arr.shape}")
    return arr


def array_to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """The documented dtype/range rule for image arrays (see the module docstring)."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.min() >= 0 and arr.max() <= 255:
            return arr.astype(np.uint8)
        raise InvalidInputError(f"{what}: cannot read an image array of {_range(arr)}; integer arrays must be uint8, "
                         "uint16, or hold values in [0, 255].")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InvalidInputError(f"{what}: array ({arr.dtype}) contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1:
            return np.round(arr.astype(np.float64) * 255).astype(np.uint8)
        if lo >= 0 and hi <= 255:
            return np.round(arr.astype(np.float64)).astype(np.uint8)
        raise InvalidInputError(f"{what}: cannot read an image array of {_range(arr)}; float arrays must lie in [0, 1] "
                         "or [0, 255].")
    raise InvalidInputError(f"{what}: cannot read an image array of dtype {arr.dtype}; use uint8, uint16, bool, "
                     "integer or float.")


def open_image_file(path: Union[str, os.PathLike], what: str) -> Image.Image:
    """A decoded image file, upright; a missing or undecodable file is a ``ValueError`` naming it."""
    if not os.path.exists(path):
        raise InvalidInputError(f"{what}: file not found: {os.fspath(path)}")
    if os.path.isdir(path):
        raise InvalidInputError(f"{what}: {os.fspath(path)} is a folder, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im)
    except Exception as e:  # PIL raises several types for unreadable or truncated files
        raise InvalidInputError(f"{what}: cannot read image file {os.fspath(path)} ({type(e).__name__}: {e})") from None


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation (a no-op for images without one)."""
    try:
        exif = image.getexif()
    except Exception:
        return image
    if exif.get(0x0112, 1) in (1, None):
        return image
    return ImageOps.exif_transpose(image)


def _as_pil(value: ImageLike, what: str, array_reader) -> Image.Image:
    if isinstance(value, (str, os.PathLike)):
        if isinstance(value, str) and not value.strip():
            raise InvalidInputError(f"{what}: empty file path")
        return open_image_file(value, what)
    if isinstance(value, np.ndarray):
        return array_reader(value, what)
    if isinstance(value, Image.Image):
        return upright(value)
    raise InvalidInputError(f"{what}: expected a PIL image, numpy array or file path, got {type(value).__name__}")


def _image_from_array(value: np.ndarray, what: str) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(array_to_uint8(_check_shape(value, what), what)))


def has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def read_image(value: ImageLike, what: str = "image") -> Image.Image:
    """A PIL image as the user sees it (upright, 8-bit arrays), mode kept so an alpha cut-out survives."""
    image = _as_pil(value, what, _image_from_array)
    if image.width == 0 or image.height == 0:
        raise InvalidInputError(f"{what}: the image has zero size ({image.width}x{image.height}).")
    if has_alpha(image):
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if not alpha.any():
            raise InvalidInputError(f"{what}: the image is fully transparent (alpha 0 everywhere); "
                                    "there is nothing to use.")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparency is composited on white, 16-bit is rescaled to 8-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(image).astype(np.uint16)
        return Image.fromarray(array_to_uint8(arr, "image")).convert("RGB")
    if image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if has_alpha(image) or image.mode == "P":
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def read_rgb(value: ImageLike, what: str = "image") -> Image.Image:
    """:func:`read_image`, then RGB (transparency on white)."""
    return to_rgb(read_image(value, what))


# ---- masks --------------------------------------------------------------------------------------------------------
def _mask_values(arr: np.ndarray, what: str) -> np.ndarray:
    """HxW values of a mask array: alpha when it varies, else luminance (colour), else the array itself."""
    arr = _check_shape(np.asarray(arr), what)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InvalidInputError(f"{what}: cannot read a mask array of dtype {arr.dtype}; use bool, integer or float.")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise InvalidInputError(f"{what}: mask array ({arr.dtype}) contains NaN or infinite values")
    if arr.ndim == 3:
        if arr.shape[2] == 4 and arr[..., 3].min() != arr[..., 3].max():
            return arr[..., 3]
        return arr[..., :3].astype(np.float64) @ _LUMA
    return arr


def _pil_mask_values(image: Image.Image) -> np.ndarray:
    if image.mode == "1":
        return np.asarray(image, dtype=bool)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F", "L"):
        return np.asarray(image)
    if has_alpha(image):
        rgba = np.asarray(image.convert("RGBA"))
        if rgba[..., 3].min() != rgba[..., 3].max():
            return rgba[..., 3]
    return np.asarray(image.convert("RGB").convert("L"))


def mask_foreground(values: np.ndarray) -> np.ndarray:
    """Boolean foreground of an HxW mask, decided relative to its own range (see the module docstring)."""
    if values.dtype == bool:
        return values
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        return np.full(values.shape, hi != 0, dtype=bool)
    return values > (lo + hi) / 2


def read_mask_image(value: ImageLike, what: str = "mask") -> Image.Image:
    """A mask file, PIL image or array as an upright PIL image (its alpha is data: no transparency check)."""
    image = _as_pil(value, what, _image_from_array)
    if image.width == 0 or image.height == 0:
        raise InvalidInputError(f"{what}: the mask has zero size ({image.width}x{image.height}).")
    return image


def read_mask(value: ImageLike, what: str = "mask") -> np.ndarray:
    """A boolean HxW foreground mask from a PIL image (any mode), an array or a file (EXIF applied)."""
    if isinstance(value, np.ndarray):
        values = _mask_values(value, what)
    else:
        values = _pil_mask_values(_as_pil(value, what, _image_from_array))
    if values.size == 0:
        raise InvalidInputError(f"{what}: the mask has zero size {values.shape}.")
    return mask_foreground(values)
