"""Atomic file writes: a result file is either absent or complete, even after ``kill -9``.

Everything is written to a temporary file in the target's folder, flushed and fsynced, then moved into place
with ``os.replace`` (atomic on POSIX within one file system). A killed process leaves at most a stray
``*.tmp-*`` file, which readers ignore and :func:`remove_stale_temporaries` cleans up.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Callable, Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base = os.path.basename(path)
    stem, ext = os.path.splitext(base)
    fd, tmp = tempfile.mkstemp(prefix=f"{stem}{TMP_MARK}", suffix=ext, dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
