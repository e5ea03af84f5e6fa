"""Atomic file writes: a file is either absent or complete, even after ``kill -9``.

Everything is written to a temporary file in the target's folder, flushed and fsynced, then moved into place
with ``os.replace`` (atomic on POSIX within one file system; it replaces a symbolic link itself, never its
target). A killed process leaves at most a stray ``*.tmp-*`` file, which readers ignore.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically, on an exception it
    is removed and ``path`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    stem, ext = os.path.splitext(os.path.basename(path))
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
