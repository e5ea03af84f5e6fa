"""Generation stage: make every missing image, one file at a time, atomically. Safe to kill and rerun.

An image counts as done when its file exists (written via a temporary file + rename, sidecar before image),
so a resumed run makes exactly the images that are still missing, with the same seeds.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

from tqdm.auto import tqdm

from .loaders.base import Entry
from .methods import Method, MethodError, image_seed

ABORT_AFTER_FIRST_FAILURES = 3  # the first images all failing means a setup problem, not a bad prompt


def pending(method: Method, entries: Sequence[Entry], images_per_prompt: int,
            owns: Optional[Callable[[Entry, int], bool]] = None) -> List[Tuple[Entry, int]]:
    """Images still to make; with ``owns``, only this process's share (see ``eval.distributed``)."""
    return [(e, k) for e in entries for k in range(images_per_prompt)
            if (owns is None or owns(e, k)) and method.needs_generation(e, k)]


def run_generation(methods: Sequence[Method], entries: Sequence[Entry], images_per_prompt: int, seed: int,
                   progress: bool = True, owns: Optional[Callable[[Entry, int], bool]] = None) -> dict:
    """Generate what is missing for each method; returns ``{method: {"made": n, "failed": {image: reason}}}``."""
    summary = {}
    for method in methods:
        todo = pending(method, entries, images_per_prompt, owns)
        made, failed = 0, {}
        for entry, k in tqdm(todo, desc=f"generate {method.name}", unit="img", disable=not progress or not todo):
            try:
                method.generate(entry, k, image_seed(seed, entry, k, images_per_prompt))
                made += 1
            except MethodError:
                raise
            except Exception as e:  # one bad prompt must not cost the rest of the run
                failed[f"{entry.entry_id}/{k}"] = f"{type(e).__name__}: {e}"
                if made == 0 and len(failed) >= ABORT_AFTER_FIRST_FAILURES:
                    raise MethodError(f"{method.name}: the first {len(failed)} images all failed, last: "
                                      f"{failed[f'{entry.entry_id}/{k}']}") from e
        summary[method.name] = {"made": made, "failed": failed}
    return summary
