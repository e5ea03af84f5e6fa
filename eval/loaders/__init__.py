"""Benchmark loaders: one per benchmark, each returning a :class:`~eval.loaders.base.Benchmark`."""
from __future__ import annotations

import os
from typing import Optional

from .base import Benchmark, Entry, SubjectRef
from .dreambench import load_dreambench, load_dreambench_multi
from .faces import ENV_VAR as FACES_ENV_VAR
from .faces import load_faces

BENCHMARKS = ("dreambench", "dreambench-multi", "faces")
PEOPLE_BENCHMARKS = ("faces",)  # benches of people: the only ones where face-ID runs unless asked


def load_benchmark(name: str, data_dir: Optional[str] = None, *, download: bool = True) -> Benchmark:
    """Resolve the data folder for ``name`` and load it (DreamBench may download; see ``eval.data``)."""
    if name in ("dreambench", "dreambench-multi"):
        from ..data import resolve_dreambench_dir

        folder = resolve_dreambench_dir(data_dir, download=download)
        return load_dreambench(folder) if name == "dreambench" else load_dreambench_multi(folder)
    if name == "faces":
        folder = data_dir or os.environ.get(FACES_ENV_VAR)
        if not folder:
            raise FileNotFoundError(f"the faces benchmark needs a folder: pass --data-dir (or set {FACES_ENV_VAR})")
        return load_faces(folder)
    raise ValueError(f"unknown benchmark '{name}'; choose one of {', '.join(BENCHMARKS)}")


__all__ = ["BENCHMARKS", "PEOPLE_BENCHMARKS", "Benchmark", "Entry", "SubjectRef", "load_benchmark", "load_dreambench",
           "load_dreambench_multi", "load_faces"]
