"""Where the CLI writes an image: never over an existing file unless asked, never through a symbolic link.

``--out`` used to overwrite silently and follow links (``--out x.png`` with ``x.png -> ~/.bashrc`` wrote the
image into the link's target). :func:`check_output` refuses both up front, before a model is loaded;
:func:`save_image` writes a temporary file beside the target and renames it into place, so a link that appears in
between is replaced, never written through, and a failed write leaves no half file.
"""
from __future__ import annotations

import os

from PIL import Image

from .atomic import atomic_path
from .errors import InvalidInputError


def check_output(path: str, overwrite: bool = False, flag: str = "--out") -> str:
    """``path`` if an image may be written there, else an error naming the flag and what to do."""
    if os.path.islink(path):
        raise InvalidInputError(f"{flag} {path} is a symbolic link; refusing to write through it (give a plain path)")
    if os.path.isdir(path):
        raise InvalidInputError(f"{flag} {path} is a folder; give a file name such as {os.path.join(path, 'out.png')}")
    if os.path.exists(path) and not overwrite:
        raise InvalidInputError(f"{flag} {path} already exists; pass --overwrite to replace it")
    return path


def save_image(image: Image.Image, path: str, overwrite: bool = False) -> str:
    """Write ``image`` to ``path`` (format by extension) through :func:`~anystory.atomic.atomic_path`."""
    check_output(path, overwrite)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG"))
        if not overwrite and os.path.lexists(path):  # appeared while the image was written
            raise InvalidInputError(f"--out {path} appeared while writing; pass --overwrite to replace it")
    return path
