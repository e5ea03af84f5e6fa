"""Where the DreamBench photos come from: ``--data-dir``, else ``$ANYSTORY_DREAMBENCH_DIR``, else a download.

The download (only possible with internet access) takes the DreamBooth dataset from google/dreambooth and the
zero-shot evaluation lists from bytedance/UNO, each at a pinned commit, checks every file against the SHA-256
in ``dreambench_manifest.json`` (computed from the upstream git blobs) and only then moves the folder into the
cache, so a half-finished or tampered download is never used. Offline, a missing folder is an error that says
how to point the harness at a local copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
from typing import Dict, List, Optional

from anystory.errors import DataIntegrityError, DataNotFoundError

ENV_VAR = "ANYSTORY_DREAMBENCH_DIR"
MANIFEST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dreambench_manifest.json")
REQUIRED = ("prompts_and_classes.txt", os.path.join("lists", "single_subject.json"),
            os.path.join("lists", "multi_subject.json"))


def load_manifest(path: str = MANIFEST_PATH) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "anystory", "dreambench")


def missing_files(folder: str) -> List[str]:
    """Required files absent from ``folder`` (empty when it looks like a DreamBench copy)."""
    return [name for name in REQUIRED if not os.path.isfile(os.path.join(folder, name))]


def _hint() -> str:
    return (f"Pass --data-dir /path/to/dreambench (or set {ENV_VAR}): a folder holding prompts_and_classes.txt, "
            "<subject>/NN.jpg and lists/single_subject.json + lists/multi_subject.json (see docs/evaluation.md).")


def _checked(folder: str, how: str) -> str:
    if not os.path.isdir(folder):
        raise DataNotFoundError(f"DreamBench data folder not found: {folder} ({how}). {_hint()}")
    missing = missing_files(folder)
    if missing:
        raise DataNotFoundError(f"{folder} ({how}) is not a DreamBench folder: missing {', '.join(missing)}. "
                                f"{_hint()}")
    return os.path.abspath(folder)


def resolve_dreambench_dir(data_dir: Optional[str] = None, *, download: bool = True,
                           cache_dir: Optional[str] = None, manifest: Optional[dict] = None) -> str:
    """The DreamBench folder to use, in the documented order; downloads into the cache when allowed."""
    if data_dir:
        return _checked(data_dir, "given by --data-dir")
    env = os.environ.get(ENV_VAR)
    if env:
        return _checked(env, f"from ${ENV_VAR}")
    cache_dir = cache_dir or default_cache_dir()
    if os.path.isdir(cache_dir) and not missing_files(cache_dir):
        return os.path.abspath(cache_dir)
    if not download:
        raise DataNotFoundError(f"No DreamBench data: no --data-dir, ${ENV_VAR} unset, nothing in the cache "
                                f"{cache_dir}, and downloading is disabled. {_hint()}")
    try:
        return download_dreambench(cache_dir, manifest=manifest)
    except (OSError, tarfile.TarError) as e:
        raise DataNotFoundError(f"No DreamBench data: no --data-dir, ${ENV_VAR} unset, and the download into "
                                f"{cache_dir} failed ({type(e).__name__}: {e}); offline machines need a local "
                                f"copy. {_hint()}") from e


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: str, manifest: Optional[dict] = None) -> Dict[str, str]:
    """``{relative path: problem}`` for every manifest file that is missing or differs (empty = all good)."""
    manifest = manifest or load_manifest()
    problems = {}
    for rel, info in manifest["files"].items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            problems[rel] = "missing"
        elif sha256_file(path) != info["sha256"]:
            problems[rel] = "checksum mismatch"
    return problems


def _fetch(url: str, dest: str) -> None:
    with urllib.request.urlopen(url, timeout=120) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def download_dreambench(dest: str, manifest: Optional[dict] = None) -> str:
    """Download, verify and install DreamBench at ``dest``; returns ``dest``. Nothing lands there unverified."""
    manifest = manifest or load_manifest()
    sources = manifest["sources"]
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".dreambench-download-", dir=parent)
    try:
        wanted = {info["upstream"]: rel for rel, info in manifest["files"].items() if info["source"] == "dreambooth"}
        if wanted:
            archive = os.path.join(staging, "dreambooth.tar.gz")
            _fetch(sources["dreambooth"]["archive"], archive)
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    inner = member.name.split("/", 1)[1] if "/" in member.name else ""
                    if member.isfile() and inner in wanted:  # only manifest files: no path tricks possible
                        target = os.path.join(staging, "data", wanted[inner])
                        os.makedirs(os.path.dirname(target), exist_ok=True)
                        with tar.extractfile(member) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
            os.unlink(archive)
        for rel, info in manifest["files"].items():
            if info["source"] == "uno":
                target = os.path.join(staging, "data", rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                _fetch(sources["uno"]["raw"] + info["upstream"], target)
        problems = verify_folder(os.path.join(staging, "data"), manifest)
        if problems:
            listed = ", ".join(f"{k} ({v})" for k, v in sorted(problems.items())[:10])
            raise DataIntegrityError(f"DreamBench download failed verification: {listed}"
                                     f"{' ...' if len(problems) > 10 else ''}")
        with open(os.path.join(staging, "data", "SOURCE.md"), "w", encoding="utf-8") as f:
            f.write("# DreamBench (downloaded by eval.data)\n\n" + "\n".join(
                f"- {name}: {s['repo']} at commit {s['commit']} ({s['licence']})" for name, s in sources.items())
                + "\n\nEvery file was checked against eval/dreambench_manifest.json.\n")
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.replace(os.path.join(staging, "data"), dest)
        return os.path.abspath(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
