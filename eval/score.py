"""Scoring stage: every expected image -> one row per subject, written in atomic parquet parts. Resumable.

Rows are keyed by (method, entry_id, sample, subject_slot). Each chunk of images is scored and written as one
part file (temporary file + rename), so after ``kill -9`` the parts on disk hold complete images only; a
resumed run scores exactly the images that no part holds (and those recorded as missing that exist now), and
:func:`assemble` keeps the newest row per key, so no row is doubled or lost.

Regions: for several subjects each is scored on its own box when the image's sidecar gives one
(``region_source`` names where it came from), else on the whole image (``whole-image``).
"""
from __future__ import annotations

import glob
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import pandas as pd
from tqdm.auto import tqdm

from .atomic import is_temporary, write_with
from .loaders.base import Entry
from .methods import Method
from .metrics.base import BatchContext, Metric, ScoreItem, load_rgb
from .protocols import PROTOCOLS, Protocol

KEY = ["method", "entry_id", "sample", "subject_slot"]
PARTS = "scores"


@dataclass
class Unit:
    """One expected image."""

    order: int
    method: Method
    entry: Entry
    sample: int
    seed: Optional[int]


def expected_units(methods: Sequence[Method], entries: Sequence[Entry], images_per_prompt: int,
                   seed_of) -> List[Unit]:
    units = []
    for method in methods:
        for entry in entries:
            for k in range(images_per_prompt):
                units.append(Unit(len(units), method, entry, k, seed_of(method, entry, k)))
    return units


def read_parts(run_dir: str) -> pd.DataFrame:
    files = sorted(p for p in glob.glob(os.path.join(run_dir, PARTS, "part-*.parquet")) if not is_temporary(p))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(p) for p in files], ignore_index=True)


def _read_sidecar(path: Optional[str]) -> dict:
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _region(image, boxes, slot: int):
    """``(crop, source)`` for subject ``slot``; the whole image when no usable box is given."""
    if image is None or not boxes or slot >= len(boxes) or boxes[slot] is None:
        return image, "whole-image"
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[slot])
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.width, x1), min(image.height, y1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return image, "whole-image"
    return image.crop((x0, y0, x1, y1)), None


def absent_images(units: Sequence[Unit]) -> Dict[str, List[Unit]]:
    """Per method, the expected images that are not on disk (a deliberate ``n/a`` is not absent)."""
    absent: Dict[str, List[Unit]] = {}
    for u in units:
        absent.setdefault(u.method.name, [])
        path = u.method.image_path(u.entry, u.sample)
        if (path is None or not os.path.isfile(path)) and not u.method.not_applicable(u.entry, u.sample):
            absent[u.method.name].append(u)
    return absent


def _unit_rows(unit: Unit, failures: Dict[str, str], protocol: Protocol) -> List[tuple]:
    """``[(row, ScoreItem or None)]`` for each subject of the unit's image."""
    method, entry, k = unit.method, unit.entry, unit.sample
    path = method.image_path(entry, k)
    image, status = None, "ok"
    reason = method.not_applicable(entry, k)
    if reason:
        status = f"n/a: {reason}"
    elif path is None or not os.path.isfile(path):
        failure = failures.get(f"{method.name}/{entry.entry_id}/{k}")
        status = f"missing (generation failed: {failure})" if failure else "missing"
    else:
        try:
            image = load_rgb(path)
        except Exception as e:  # an unreadable file is marked in its row; the run goes on
            status = f"unreadable: {type(e).__name__}: {e}"
    sidecar = _read_sidecar(method.sidecar_path(entry, k))
    boxes = sidecar.get("boxes")
    out = []
    for slot, subject in enumerate(entry.subjects):
        region, fallback = _region(image, boxes, slot)
        row = {
            "method": method.name, "entry_id": entry.entry_id, "sample": k, "subject_slot": slot,
            "entry_index": entry.index, "prompt": entry.prompt, "prompt_type": entry.prompt_type,
            "prompt_index": entry.prompt_index, "subject": subject.name, "subject_class": subject.class_name,
            "n_subjects": len(entry.subjects), "seed": unit.seed, "image_path": path or "",
            "region_source": fallback or str(sidecar.get("region_source", "sidecar boxes")), "status": status,
        }
        exclude = method.exclude(entry, k, slot)
        item = None if image is None else ScoreItem(region, image, entry.prompt, subject, exclude,
                                                    protocol.comparison_set(subject, exclude))
        out.append((row, item))
    return out


def units_to_score(units: Sequence[Unit], done: pd.DataFrame) -> List[Unit]:
    """Units without rows, and units scored as missing whose image has appeared since (a resumed generation)."""
    if done.empty:
        return list(units)
    latest = done.drop_duplicates(subset=KEY, keep="last")
    status = dict(zip(zip(latest["method"], latest["entry_id"], latest["sample"]), latest["status"].astype(str)))
    todo = []
    for u in units:
        s = status.get((u.method.name, u.entry.entry_id, u.sample))
        if s is None:
            todo.append(u)
        elif s.startswith("missing"):
            path = u.method.image_path(u.entry, u.sample)
            if path and os.path.isfile(path):
                todo.append(u)
    return todo


def score_units(units: Sequence[Unit], metrics: Sequence[Metric], run_dir: str, chunk_size: int = 16,
                failures: Optional[Dict[str, str]] = None, progress: bool = True,
                protocol: Protocol = PROTOCOLS["dreambooth"]) -> int:
    """Score the units no part holds yet, under ``protocol`` (comparison set and scale); returns how many
    images were scored now."""
    todo = units_to_score(units, read_parts(run_dir))
    columns = [c for m in metrics for c in m.columns]
    bar = tqdm(total=len(todo), desc="score", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), chunk_size):
        chunk = todo[start:start + chunk_size]
        pairs = [p for u in chunk for p in _unit_rows(u, failures or {}, protocol)]
        rows = [dict(r, **{c: None for c in columns}) for r, _ in pairs]
        scored = [(row, item) for row, (_, item) in zip(rows, pairs) if item is not None]
        if scored:
            ctx = BatchContext()
            for metric in metrics:
                for (row, _), values in zip(scored, metric.score([it for _, it in scored], ctx)):
                    row.update(protocol.scaled(values))
        frame = pd.DataFrame(rows)
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"  # chronological: last one wins
        write_with(os.path.join(run_dir, PARTS, name), lambda tmp: frame.to_parquet(tmp, index=False))
        bar.update(len(chunk))
    bar.close()
    return len(todo)


def assemble(run_dir: str, units: Sequence[Unit]) -> pd.DataFrame:
    """All rows of the expected units, one per key, in benchmark order; raises if any is missing."""
    parts = read_parts(run_dir)
    if parts.empty:
        raise RuntimeError(f"no scores under {run_dir}/{PARTS}")
    parts = parts.drop_duplicates(subset=KEY, keep="last")
    wanted = {(u.method.name, u.entry.entry_id, u.sample): u.order for u in units}
    keep = [(m, e, s) in wanted for m, e, s in zip(parts["method"], parts["entry_id"], parts["sample"])]
    rows = parts[keep].copy()
    rows["order"] = [wanted[m, e, s] for m, e, s in zip(rows["method"], rows["entry_id"], rows["sample"])]
    missing = set(wanted.values()) - set(rows["order"])
    if missing:
        raise RuntimeError(f"{len(missing)} images have no scores yet; rerun with --resume")
    return rows.sort_values(["order", "subject_slot"]).drop(columns="order").reset_index(drop=True)
