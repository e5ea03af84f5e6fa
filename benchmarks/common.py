"""Measurement helpers shared by the benchmarks: UNet/transformer step timing, peak memory, pass counting."""
from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager

import torch

SUBJECTS = (0, 1, 2, 4)  # AnyStory configurations timed against the bare pipeline, by subject count


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: str):
    """Yields a dict whose ``peak_mb`` is filled on exit: max allocated on CUDA, sampled process RSS on CPU."""
    result = {"peak_mb": float("nan"), "kind": "cuda max allocated" if device.startswith("cuda") else "process RSS"}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    peak = [_rss_bytes()]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["peak_mb"] = peak[0] / 2**20


class ForwardTimer:
    """Times every forward of ``module`` (one denoising step = one forward), synchronising CUDA. ``skip()``
    true at the end of a forward drops it (FLUX runs its reference pass through the same transformer)."""

    def __init__(self, module: torch.nn.Module, device: str, skip=None):
        self.times, self._starts, self.device, self.skip = [], [], device, skip
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._starts.append(time.perf_counter())  # a stack: a forward may run inside another's pre-hook

    def _post(self, *_):
        self._sync()
        start = self._starts.pop()
        if self.skip is None or not self.skip():
            self.times.append(time.perf_counter() - start)

    def remove(self):
        for h in self._handles:
            h.remove()


class CallCounter:
    """Counts forward calls of a module and the batch items they processed."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self.items = 0, 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.items += args[0].shape[0] if args and torch.is_tensor(args[0]) else 1

    def remove(self):
        self._handle.remove()


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def interleaved(configs, module: torch.nn.Module, device: str, repeats: int, passes, skip=None,
                per_call=None) -> list:
    """Time ``configs`` (``(label, subjects, call)``, ``call(seed)`` runs one pipeline call) against each other.

    Each config is warmed up once, then ``repeats`` rounds run every config once: a drift in the speed of a shared
    machine then hits all of them alike, which keeps their ratios honest. Round r starts at config r (the order
    rotates), so no config always runs right after the same neighbour. ``passes()`` is a running count of
    reference-encoder passes (subject rows). One row per config: median and fastest step time over all its steps
    (on a shared machine other processes only ever add time, so the fastest step is the least disturbed one),
    passes per call, peak memory; and per ``per_call`` entry (``{column: ForwardTimer}``, once-per-call work such as encoders,
    timed apart from the steps) the milliseconds per call its forwards took.
    """
    for _, _, call in configs:
        call(-1)
    timer = ForwardTimer(module, device, skip=skip)
    times = {label: [] for label, _, _ in configs}
    counted = {label: 0 for label, _, _ in configs}
    peaks = {label: 0.0 for label, _, _ in configs}
    per_call = per_call or {}
    once = {label: dict.fromkeys(per_call, 0.0) for label, _, _ in configs}
    kind = None
    try:
        for r in range(repeats):
            for label, _, call in configs[r % len(configs):] + configs[: r % len(configs)]:
                before, seen = passes(), len(timer.times)
                marks = {column: len(t.times) for column, t in per_call.items()}
                with peak_memory(device) as mem:
                    call(r)
                times[label] += timer.times[seen:]
                counted[label] += passes() - before
                for column, t in per_call.items():
                    once[label][column] += sum(t.times[marks[column]:])
                peaks[label], kind = max(peaks[label], mem["peak_mb"]), mem["kind"]
    finally:
        timer.remove()
    rows = [{"config": label, "subjects": n, "step_ms": 1000 * median(times[label]),
             "step_min_ms": 1000 * min(times[label], default=float("nan")),
             "reference_passes_per_call": counted[label] / repeats, "peak_mb": peaks[label], "memory": kind,
             **{column: 1000 * total / repeats for column, total in once[label].items()}}
            for label, n, _ in configs]
    for row in rows:
        row["step_ratio"] = row["step_ms"] / rows[0]["step_ms"]
        row["step_min_ratio"] = row["step_min_ms"] / rows[0]["step_min_ms"]
    return rows


def write_report(out_dir: str, report: dict, table: str) -> None:
    """A study's ``results.json`` (every number) and ``results.md`` (its table) in ``out_dir``; prints the table."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
