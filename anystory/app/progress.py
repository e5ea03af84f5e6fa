"""What a run is doing right now, for the page: its stage and an ETA measured on this run alone.

Gradio's own progress timer estimates from the average duration of *earlier* calls (any settings), so after a
4-step run a 100-step run showed a nonsense ETA, and a hub download showed only "processing". Here a run reports
its stages (loading a model, matting, encoding subjects, step k/n, decoding); the time left is this run's mean
step time so far times the steps left. :func:`follow` runs the work in a thread and yields the status line
whenever it changes, so a Gradio generator can stream it while the work runs.
"""
from __future__ import annotations

import html
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional

from ..errors import Cancelled

STAGES = ("loading", "matting", "encoding subjects", "denoising", "decoding", "done")


@dataclass
class Status:
    stage: str
    detail: str
    elapsed: float
    step: int = 0
    steps: int = 0
    eta: Optional[float] = None  # seconds left, from this run's own step times; None until two steps are known

    def text(self) -> str:
        parts = [self.stage + (f": {self.detail}" if self.detail else "")]
        if self.stage == "denoising" and self.steps:
            parts[0] = f"step {self.step}/{self.steps}" + (f" ({self.detail})" if self.detail else "")
            parts.append(f"about {self.eta:.1f} s left" if self.eta is not None else "estimating time left")
        parts.append(f"{self.elapsed:.1f} s elapsed")
        return " · ".join(parts)

    def html(self) -> str:
        fraction = self.step / self.steps if self.steps else (1.0 if self.stage == "done" else 0.0)
        return (f'<div class="anystory-progress" data-stage="{html.escape(self.stage)}">'
                f'<progress max="1" value="{fraction:.3f}" style="width:100%"></progress>'
                f"<div>{html.escape(self.text())}</div></div>")


class RunProgress:
    """Collects one run's stages and step times; ``on_change(status)`` is called on every change."""

    def __init__(self, on_change: Optional[Callable[[Status], None]] = None,
                 clock: Callable[[], float] = time.perf_counter, cancel: Optional[threading.Event] = None):
        self.clock = clock
        self.cancel = cancel or threading.Event()  # set: the next step report raises Cancelled
        self.start = clock()
        self.on_change = on_change
        self.label = ""  # e.g. "shot 2/3" for a storyboard
        self._step_times: List[float] = []
        self.status = Status("starting", "", 0.0)

    def _emit(self, status: Status) -> None:
        self.status = status
        if self.on_change is not None:
            self.on_change(status)

    def stage(self, name: str, detail: str = "") -> None:
        detail = ", ".join(d for d in (self.label, detail) if d)
        self._emit(Status(name, detail, self.clock() - self.start))

    def step(self, k: int, n: int) -> None:
        """Pipeline progress: k = 0 before the first step (subjects are encoded then), k = n after the last.
        Called from the pipeline's step callback, so a cancelled job stops here, within one step."""
        if self.cancel.is_set():
            raise Cancelled("the job was cancelled: its browser session ended")
        now = self.clock()
        if k <= 0:
            self._step_times = []
            self.stage("encoding subjects")
            return
        if k >= n:
            self._step_times = []
            self.stage("decoding", "image and routing overlays")
            return
        self._step_times.append(now)
        eta = None
        if len(self._step_times) >= 2:  # the first step also carries the subjects' encoding: time from it on
            per_step = (self._step_times[-1] - self._step_times[0]) / (len(self._step_times) - 1)
            eta = per_step * (n - k)
        self._emit(Status("denoising", self.label, now - self.start, k, n, eta))

    def done(self) -> None:
        self._emit(Status("done", self.label, self.clock() - self.start))


class StagedSegmenter:
    """Wraps the app's segmenter: reports "loading" when its model is fetched on first use, "matting" per image."""

    def __init__(self, segmenter, progress: RunProgress):
        self.inner, self.progress, self.count = segmenter, progress, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, image):
        self.count += 1
        if getattr(self.inner, "_inner", False) is None:  # a lazy model not loaded yet: this call loads it
            self.progress.stage("loading", f"matting model {getattr(self.inner, 'model_id', '')} (first use; "
                                "it may be downloaded)")
        self.progress.stage("matting", f"subject image {self.count}")
        return self.inner(image)


_DONE = object()


def follow(work: Callable[[RunProgress], Any], cancel: Optional[threading.Event] = None) -> Iterator[Any]:
    """Run ``work(progress)`` in a thread; yield each new :class:`Status`, then, last, ``("result", value)``.

    An exception in ``work`` is raised here, in the caller's thread, so the UI handles it as before. When the
    caller stops reading (Gradio closes the generator of a client that went away) ``cancel`` is set, and the
    work stops at its next step report.
    """
    events: "queue.Queue" = queue.Queue()
    cancel = cancel or threading.Event()
    progress = RunProgress(on_change=events.put, cancel=cancel)
    box: dict = {}

    def target():
        try:
            box["value"] = work(progress)
            progress.done()
        except BaseException as e:  # handed to the caller
            box["error"] = e
        finally:
            events.put(_DONE)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield from _statuses(events)
    finally:  # normal end, an error, or the reader gone (GeneratorExit): nothing more is wanted of the work
        cancel.set()
    thread.join()
    if "error" in box:
        raise box["error"]
    yield ("result", box["value"])


def _statuses(events: "queue.Queue") -> Iterator["Status"]:
    """The newest status of each batch of events, until the work is done."""
    finished = False
    while not finished:
        batch = [events.get()]
        while True:  # only the newest status is worth drawing
            try:
                batch.append(events.get_nowait())
            except queue.Empty:
                break
        finished = batch[-1] is _DONE
        statuses = [b for b in batch if b is not _DONE]
        if statuses:
            yield statuses[-1]
