"""The run's pandas tables, built from the per-image rows: per subject, per prompt type, per method.

Scores are means over rows (one row per image and subject, so a multi-subject image counts each subject's
region once); rows without a score (missing or unreadable image, no face found, ``n/a``) are left out of the
means and counted in their own columns instead. Every metric comes with ``<m>_n`` (rows that have a score);
per method also ``<m>_std`` (sample standard deviation over rows) and ``<m>_ci_low`` / ``<m>_ci_high``: a 95%
percentile bootstrap interval of the mean that resamples *entries* (prompts) with replacement, since the
images and subjects of one prompt are not independent draws. Settings columns (run, bench, protocol, scale,
subset, images per prompt, model names) are the same in every row, so a table read alone still says what it is.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import pandas as pd

COUNT_COLUMNS = ["images", "rows", "scored", "missing", "unreadable", "not_applicable"]
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def score_columns(rows: pd.DataFrame, columns: Sequence[str]) -> List[str]:
    return [c for c in columns if c in rows.columns and c != "face_found"]


def bootstrap_ci(values: np.ndarray, clusters: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Tuple[float, float]:
    """95% interval of the mean of ``values`` (NaN left out), resampling whole ``clusters``; NaNs if none."""
    keep = ~np.isnan(values)
    values, clusters = values[keep], clusters[keep]
    if not values.size:
        return float("nan"), float("nan")
    _, cluster_index = np.unique(clusters, return_inverse=True)
    sums = np.bincount(cluster_index, weights=values)
    counts = np.bincount(cluster_index).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def _counts(group: pd.DataFrame) -> Dict[str, object]:
    status = group["status"].astype(str)
    counts = {
        "images": int(group[["entry_id", "sample"]].drop_duplicates().shape[0]),
        "rows": int(len(group)),
        "scored": int((status == "ok").sum()),
        "missing": int(status.str.startswith("missing").sum()),
        "unreadable": int(status.str.startswith("unreadable").sum()),
        "not_applicable": int(status.str.startswith("n/a").sum()),
    }
    if "face_found" in group.columns:
        found = group["face_found"]
        counts["faces_found"] = int((found == True).sum())  # noqa: E712 - object column with None
        counts["no_face"] = int((found == False).sum())  # noqa: E712
    sources = group["region_source"].value_counts()
    counts["regions"] = ", ".join(f"{k}: {v}" for k, v in sources.items())
    return counts


def _statistics(group: pd.DataFrame, cols: Sequence[str], dispersion: bool) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for c in cols:
        values = pd.to_numeric(group[c], errors="coerce").to_numpy(dtype=np.float64)
        scored = values[~np.isnan(values)]
        out[c] = float(scored.mean()) if scored.size else float("nan")
        if dispersion:
            out[f"{c}_std"] = float(scored.std(ddof=1)) if scored.size > 1 else float("nan")
        out[f"{c}_n"] = int(scored.size)
        if dispersion:
            out[f"{c}_ci_low"], out[f"{c}_ci_high"] = bootstrap_ci(values, group["entry_id"].to_numpy())
    return out


def aggregate(rows: pd.DataFrame, by: Sequence[str], columns: Sequence[str], labels: Dict[str, object] = None,
              dispersion: bool = False) -> pd.DataFrame:
    """One row per group: the statistics of each score column, the counts, then the settings ``labels``."""
    by, cols = list(by), score_columns(rows, columns)
    records = []
    for key, group in rows.groupby(by, sort=False):
        record = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        record.update(_statistics(group, cols, dispersion))
        record.update(_counts(group))
        records.append(record)
    table = pd.DataFrame(records)
    for name, value in (labels or {}).items():
        table[name] = value
    return table


def build_tables(rows: pd.DataFrame, columns: Sequence[str], labels: Dict[str, object] = None
                 ) -> Dict[str, pd.DataFrame]:
    return {
        "per_method": aggregate(rows, ["method"], columns, labels, dispersion=True),
        "per_subject": aggregate(rows, ["method", "subject"], columns, labels),
        "per_prompt_type": aggregate(rows, ["method", "prompt_type"], columns, labels),
    }


def markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table (no extra dependency); integers stay integers."""
    def cell(v):
        if v is None or v is pd.NA:
            return "n/a"
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule] + body)
