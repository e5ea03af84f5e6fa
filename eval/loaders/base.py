"""What a benchmark loader returns: entries (prompt + subjects), each subject with its reference and real photos."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class SubjectRef:
    """One subject of an entry. ``real_photos`` (absolute paths, sorted) include ``reference``."""

    name: str
    class_name: str
    reference: str
    real_photos: Tuple[str, ...]

    @property
    def other_photos(self) -> Tuple[str, ...]:
        """The subject's real photos except the reference (the copy-paste score's comparison set)."""
        return tuple(p for p in self.real_photos if p != self.reference)


@dataclass(frozen=True)
class Entry:
    """One prompt of a benchmark with its subjects. ``index`` is the position in the full benchmark, so a
    subset's images (and seeds) are the full run's."""

    entry_id: str
    index: int
    prompt: str
    subjects: Tuple[SubjectRef, ...]
    prompt_type: str
    prompt_index: int


@dataclass
class Benchmark:
    name: str
    entries: List[Entry]
    data_dir: str
    info: Dict[str, str] = field(default_factory=dict)

    def subset(self, n: int) -> "Benchmark":
        """A fixed sample of ``n`` entries (seed 0, kept in benchmark order): the same for every run and method,
        and spread over subjects and prompt types rather than the first subject's prompts."""
        if n is None or n >= len(self.entries):
            return self
        if n < 1:
            raise ValueError(f"--subset must be >= 1 (got {n})")
        picks = sorted(np.random.RandomState(0).permutation(len(self.entries))[:n].tolist())
        return Benchmark(self.name, [self.entries[i] for i in picks], self.data_dir,
                         dict(self.info, subset=f"{n} of {len(self.entries)} entries (fixed sample, seed 0)"))

    def subjects(self) -> Sequence[SubjectRef]:
        seen = {}
        for e in self.entries:
            for s in e.subjects:
                seen.setdefault(s.name, s)
        return list(seen.values())
