"""What the public demo keeps of its visitors, and for how long: every file a session leaves is deleted.

Strangers upload photos of faces. Gradio keeps each upload under its cache folder with the visitor's own file name
(``jane_doe_passport.png``) and never deletes it unless told to; the app's outputs and unpacked storyboard bundles
lived in a temp folder for the life of the process and after it. Here:

- :func:`private_root` makes one folder per app run (random name, mode 0700) and points Gradio's cache into it,
  with a process umask of 077, so nothing of a session is readable by other local users (files 0600, folders 0700);
- :func:`anonymize_uploads` stores each upload as ``<random>/upload.<ext>``: the visitor's file name never
  reaches the disk (the page still shows it: the browser keeps it);
- :class:`SessionFiles` gives each browser session its own randomly named folder (inside Gradio's cache, so the
  page is served the files themselves, not untracked copies) for outputs, previews and bundles, notes
  the uploads the session's events hand to the app, and deletes all of it when the session ends (Gradio's
  ``unload``) and, whatever happens, once it is older than the retention window (a sweeper thread; Gradio's own
  ``delete_cache`` ages its cache copies of outputs by the same window).

The window is ``ANYSTORY_RETENTION_S`` seconds (default :data:`DEFAULT_RETENTION_S`, one hour); docs/privacy.md.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Set

from PIL import Image

DEFAULT_RETENTION_S = 3600
RETENTION_ENV = "ANYSTORY_RETENTION_S"
PRIVATE_UMASK = 0o077
#: How an upload is named on disk: nothing of the visitor's file name but its (image or script) extension.
KEPT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".yaml", ".yml", ".json", ".zip")


def retention_seconds(value: Optional[str] = None) -> int:
    """The retention window: ``value`` (else ``ANYSTORY_RETENTION_S``, else one hour), at least one second."""
    raw = value if value is not None else os.environ.get(RETENTION_ENV, "")
    if raw in (None, ""):
        return DEFAULT_RETENTION_S
    try:
        seconds = int(float(raw))
    except ValueError:
        raise ValueError(f"{RETENTION_ENV} must be a number of seconds, got {raw!r}") from None
    if seconds < 1:
        raise ValueError(f"{RETENTION_ENV} must be at least 1 second, got {raw!r}")
    return seconds


def private_root(parent: Optional[str] = None) -> str:
    """A fresh folder (mode 0700, random name) for this run's files, with Gradio's cache inside it.

    Sets the process umask to 077 first: every file Gradio or the app writes from now on is 0600 (folders 0700).
    Must run before the Blocks are built (Gradio reads ``GRADIO_TEMP_DIR`` then)."""
    os.umask(PRIVATE_UMASK)
    root = tempfile.mkdtemp(prefix="anystory_", dir=parent)
    os.chmod(root, 0o700)
    cache = os.path.join(root, "uploads")
    os.makedirs(cache, mode=0o700)
    os.environ["GRADIO_TEMP_DIR"] = cache
    return root


def anonymous_name(filename: Optional[str]) -> str:
    """``upload.<ext>`` for a known extension (the image reader and the script importer go by it), else ``upload``."""
    ext = os.path.splitext(filename or "")[1].lower()
    return "upload" + (ext if ext in KEPT_EXTENSIONS else "")


def anonymize_uploads() -> None:
    """Rename every upload to ``<random>/upload.<ext>`` right after Gradio stores it (Gradio 6.31 keeps
    ``<sha256 of the content>/<the visitor's file name>``; a random folder also keeps two visitors who upload
    the same photo from sharing, and then deleting, one file). Idempotent."""
    from gradio import routes

    if getattr(routes.upload_fn, "_anystory_anonymous", False):
        return
    original = routes.upload_fn

    async def upload_fn(request, upload_dir, *args, **kwargs):
        kwargs["force_move"] = True  # every file is in place when this returns (no background copy to race)
        # Gradio would store the upload where the cache keeps a copy of the same content and name (an example's):
        # a staging folder of this request's own keeps it from replacing, then taking away, that copy
        staging = tempfile.mkdtemp(prefix=".incoming_", dir=upload_dir)
        try:
            output_files, files_to_copy, locations = await original(request, staging, *args, **kwargs)
            renamed = []
            for path in output_files:
                folder = os.path.join(upload_dir, secrets.token_hex(16))
                os.makedirs(folder, mode=0o700)
                target = os.path.join(folder, anonymous_name(os.path.basename(path)))
                os.replace(path, target)
                renamed.append(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return renamed, files_to_copy, locations

    upload_fn._anystory_anonymous = True
    routes.upload_fn = upload_fn


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:  # not empty (another upload of the same content is being stored) or already gone
        pass


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    if os.path.basename(path).startswith("upload"):  # an anonymized upload: its random folder goes with it
        _remove_empty(os.path.dirname(path))


class SessionFiles:
    """Each browser session's files: a folder per session for what the app writes, plus the uploads its events
    brought; deleted when the session ends or when older than ``ttl`` seconds, whichever comes first."""

    def __init__(self, root: str, upload_root: Optional[str] = None, ttl: int = DEFAULT_RETENTION_S):
        self.root = os.path.realpath(root)
        self.upload_root = os.path.realpath(upload_root) if upload_root else None
        self.ttl = ttl
        self.sessions_dir = os.path.join(self.root, "sessions")
        os.makedirs(self.sessions_dir, mode=0o700, exist_ok=True)
        self._folders: Dict[str, str] = {}
        self._uploads: Dict[str, Set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @staticmethod
    def _key(request: Any) -> str:
        return str(getattr(request, "session_hash", None) or "anonymous")

    def folder(self, request: Any) -> str:
        """A fresh random-named folder (0700) inside the session's own one, for one job's files."""
        key = self._key(request)
        with self._lock:
            base = self._folders.get(key)
            if base is None or not os.path.isdir(base):
                base = self._folders[key] = os.path.join(self.sessions_dir, secrets.token_hex(16))
                os.makedirs(base, mode=0o700, exist_ok=True)
        job = os.path.join(base, secrets.token_hex(8))
        os.makedirs(job, mode=0o700)
        return job

    def as_files(self, request: Any, value: Any) -> Any:
        """An event's output with every image written as a PNG into the session's folder and replaced by its path.

        Gradio saves an image output into its cache under a content hash, where nothing ties it to the session;
        a path inside the cache folder (the session folders are there, see :func:`private_root`) is served as it
        is, so what the page shows goes when the session ends. Lists, tuples and dicts are walked."""
        folder = None

        def convert(v):
            nonlocal folder
            if isinstance(v, Image.Image):
                folder = folder or self.folder(request)
                path = os.path.join(folder, f"{secrets.token_hex(8)}.png")
                v.save(path, format="PNG")
                return path
            if isinstance(v, (list, tuple)):
                return type(v)(convert(x) for x in v)
            if isinstance(v, dict):
                return {k: convert(x) for k, x in v.items()}
            return v

        return convert(value)

    def claim(self, request: Any, *values: Any) -> None:
        """Note the uploads among an event's values (paths inside Gradio's upload folder) as the session's."""
        if self.upload_root is None:
            return
        found = {p for p in _paths(values) if self._is_upload(p)}
        if found:
            with self._lock:
                self._uploads.setdefault(self._key(request), set()).update(found)

    def _is_upload(self, path: str) -> bool:
        """A file :func:`anonymize_uploads` stored (``<upload root>/<random>/upload.<ext>``); not the examples'
        or the page's cache copies, which every session shares."""
        real = os.path.realpath(path)
        name = os.path.basename(real)
        return (os.path.dirname(os.path.dirname(real)) == self.upload_root and name == anonymous_name(name)
                and os.path.isfile(real))

    def end(self, request: Any) -> int:
        """The session ended: delete its folder and its uploads; returns how many entries were removed."""
        key = self._key(request)
        with self._lock:
            targets = list(self._uploads.pop(key, set()))
            folder = self._folders.pop(key, None)
        if folder:
            targets.append(folder)
        for path in targets:
            _remove(path)
        return len(targets)

    def sweep(self, now: Optional[float] = None) -> int:
        """Delete every session entry and upload older than the window (by modification time)."""
        limit = (time.time() if now is None else now) - self.ttl
        removed = 0
        jobs = [job for session in _entries(self.sessions_dir) for job in _entries(session)]
        entries = jobs + [e for e in _entries(self.upload_root) if _is_upload_folder(e)]
        for entry in entries:
            if _age_stamp(entry) < limit:
                _remove(entry)
                removed += 1
        with self._lock:
            for key in list(self._uploads):
                self._uploads[key] = {p for p in self._uploads[key] if os.path.exists(p)}
                if not self._uploads[key]:
                    del self._uploads[key]
            for key, folder in list(self._folders.items()):
                if not os.path.isdir(folder):
                    del self._folders[key]
        for session in _entries(self.sessions_dir):  # a session folder with no job left (not one just made)
            if _age_stamp(session) < limit:
                _remove_empty(session)
        return removed

    def start_sweeper(self, interval: Optional[float] = None) -> threading.Thread:
        """Sweep every ``interval`` seconds (default: a quarter of the window, at most a minute) until stopped."""
        every = interval or max(0.5, min(60.0, self.ttl / 4))

        def loop():
            while not self._stop.wait(every):
                self.sweep()

        thread = threading.Thread(target=loop, name="anystory-retention", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()


def _entries(top: Optional[str]) -> List[str]:
    """The first-level entries of a folder (none when it is absent)."""
    try:
        return [os.path.join(top, n) for n in os.listdir(top)] if top else []
    except (FileNotFoundError, NotADirectoryError):
        return []


def _is_upload_folder(path: str) -> bool:
    """A folder :func:`anonymize_uploads` made. Gradio's own cache copies (the page's default values, examples,
    outputs) are left to its ``delete_cache``, which knows which of them the page still needs."""
    try:
        names = os.listdir(path)
    except (NotADirectoryError, FileNotFoundError):
        return False
    return all(n == anonymous_name(n) for n in names)  # empty: its upload was deleted by Gradio's own sweep


def _age_stamp(path: str) -> float:
    """The newest modification time of the files in ``path`` (a folder still written to stays); an empty
    folder's own."""
    stamps = []
    if os.path.isdir(path) and not os.path.islink(path):
        for base, _, names in os.walk(path):
            for name in names:
                try:
                    stamps.append(os.lstat(os.path.join(base, name)).st_mtime)
                except FileNotFoundError:
                    continue
    try:
        return max(stamps) if stamps else os.lstat(path).st_mtime
    except FileNotFoundError:
        return float("inf")


def _paths(values: Iterable[Any]) -> Iterable[str]:
    """Every path-like string in event values (strings, lists, dicts such as an editor's or a file's value)."""
    for v in values:
        if isinstance(v, (str, os.PathLike)):
            yield os.fspath(v)
        elif isinstance(v, dict):
            yield from _paths(v.values())
        elif isinstance(v, (list, tuple)):
            yield from _paths(v)
        elif hasattr(v, "path") and isinstance(getattr(v, "path"), str):
            yield v.path
