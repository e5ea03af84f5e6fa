"""How much one visitor may hold the demo's single worker: one job per session in the queue, a work budget per
request, and a job whose browser has gone stopped within one denoising step.

Gradio 6.31 stops *reading* a generator whose client disconnected and then closes it, but the model runs in a
worker thread (:func:`anystory.app.progress.follow`) that would go on to the last step while the next visitor
waits. A cancel flag per job, set when the generator is closed or the session ends (``demo.unload``), is checked
by the pipeline's ``callback_on_step_end`` (through the progress tracker): the job raises :class:`Cancelled` at
the end of the step it is in. Gradio's queue has no per-session bound; :func:`one_job_per_session` adds one at
the queue's door, so a second click is refused before it takes a place in the queue.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, Iterable, Set

from .inputs import InputError
from .progress import Cancelled  # noqa: F401 - the job's side of a cancel flag

#: Denoising steps x images (x shots, for a storyboard) one request may ask for; ANYSTORY_MAX_WORK overrides it.
DEFAULT_MAX_WORK = 1000
MAX_WORK_ENV = "ANYSTORY_MAX_WORK"
BUSY_MESSAGE = ("You already have a job in the queue or running: wait for it to finish (its frames appear as they "
                "are made), or reload the page to cancel it.")


def max_work() -> int:
    raw = os.environ.get(MAX_WORK_ENV, "")
    return int(raw) if raw.strip().isdigit() and int(raw) > 0 else DEFAULT_MAX_WORK


def check_work(steps: int, images: int = 1, shots: int = 1) -> int:
    """The request's work (steps x images x shots) if it is within the budget, else an error that says so."""
    work = int(steps) * int(images) * int(shots)
    limit = max_work()
    if work > limit:
        parts = [f"{steps} steps"] + ([f"{images} images"] if images != 1 else []) + (
            [f"{shots} shots"] if shots != 1 else [])
        raise InputError(f"Work budget: this request needs {work} denoising steps ({' x '.join(parts)}); one request "
                         f"may use at most {limit}. Use fewer steps" + (", shots" if shots != 1 else "")
                         + (" or images" if images != 1 else "") + ".")
    return work


class SessionJobs:
    """The cancel flags of each session's running jobs."""

    def __init__(self):
        self._flags: Dict[str, Set[threading.Event]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(request: Any) -> str:
        return str(getattr(request, "session_hash", None) or "anonymous")

    def start(self, request: Any) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._flags.setdefault(self._key(request), set()).add(flag)
        return flag

    def finish(self, request: Any, flag: threading.Event) -> None:
        """The job's handler is over (done, failed, or closed by Gradio): whatever still runs for it stops."""
        flag.set()
        with self._lock:
            flags = self._flags.get(self._key(request), set())
            flags.discard(flag)
            if not flags:
                self._flags.pop(self._key(request), None)

    def cancel(self, request: Any) -> int:
        """Stop every job of the session (it ended); returns how many were told."""
        with self._lock:
            flags = self._flags.pop(self._key(request), set())
        for flag in flags:
            flag.set()
        return len(flags)


    def running(self, session_hash: str) -> bool:
        with self._lock:
            return bool(self._flags.get(session_hash))


def one_job_per_session(demo, heavy: Iterable[Any], jobs: SessionJobs) -> None:
    """Refuse, at the queue's door, a session's second job among the ``heavy`` functions while one waits in the
    queue or runs (``jobs``: each heavy handler holds a flag there from its first line to its last). Call after
    ``demo.queue()``; wraps Gradio 6.31's ``Queue.push``."""
    queue = demo._queue
    targets = set(heavy)
    original = queue.push

    def waiting(session_hash: str) -> bool:
        return any(e.session_hash == session_hash and getattr(e.fn, "fn", None) in targets
                   for q in list(queue.event_queue_per_concurrency_id.values()) for e in list(q.queue))

    async def push(body, request, username):
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is not None and fn.fn in targets and body.session_hash:
            if jobs.running(body.session_hash) or waiting(body.session_hash):
                return False, BUSY_MESSAGE, "error"
        return await original(body, request, username)

    queue.push = push
