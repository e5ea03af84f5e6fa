"""Atomic file writes: a result file is either absent or complete, even after ``kill -9``.

Everything is written to a temporary file in the target's folder, flushed and fsynced, then moved into place
with ``os.replace`` (atomic on POSIX within one file system). A killed process leaves at most a stray
``*.tmp-*`` file, which readers ignore and :func:`remove_stale_temporaries` cleans up.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from anystory.atomic import TMP_MARK, atomic_path


def write_with(path: str, writer: Callable[[str], None]) -> None:
    """Call ``writer(tmp_path)`` then move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str, text: str) -> None:
    def _w(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_with(path, _w)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_image(path: str, image) -> None:
    """Save a PIL image atomically; the format follows the extension of ``path``."""
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(os.path.splitext(path)[1].lower(), "PNG")
    options = {"compress_level": 1} if fmt == "PNG" else {}  # lossless either way; level 1 is much faster
    write_with(path, lambda tmp: image.save(tmp, format=fmt, **options))


def is_temporary(name: str) -> bool:
    return TMP_MARK in os.path.basename(name)


def remove_stale_temporaries(folder: str) -> int:
    """Delete temporaries left by a killed writer under ``folder``; returns how many were removed."""
    removed = 0
    for root, _, files in os.walk(folder):
        for name in files:
            if is_temporary(name):
                os.unlink(os.path.join(root, name))
                removed += 1
    return removed
