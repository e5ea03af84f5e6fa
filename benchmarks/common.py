"""Measurement helpers shared by the benchmarks: UNet/transformer step timing, peak memory, pass counting."""
from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager

import torch


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
    """Times every forward of ``module`` (one denoising step = one forward), synchronising CUDA."""

    def __init__(self, module: torch.nn.Module, device: str):
        self.times, self._start, self.device = [], None, device
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _sync(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.times.append(time.perf_counter() - self._start)

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
