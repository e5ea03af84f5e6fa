"""The run's pandas tables, built from the per-image rows: per subject, per prompt type, per method.

Scores are means over rows (one row per image and subject, so a multi-subject image counts each subject's
region once); rows without a score (missing or unreadable image, no face found) are left out of the means
and counted in their own columns instead.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import pandas as pd

COUNT_COLUMNS = ["images", "rows", "scored", "missing", "unreadable"]


def score_columns(rows: pd.DataFrame, columns: Sequence[str]) -> List[str]:
    return [c for c in columns if c in rows.columns and c != "face_found"]


def _counts(group: pd.DataFrame) -> Dict[str, object]:
    status = group["status"].astype(str)
    counts = {
        "images": int(group[["entry_id", "sample"]].drop_duplicates().shape[0]),
        "rows": int(len(group)),
        "scored": int((status == "ok").sum()),
        "missing": int(status.str.startswith("missing").sum()),
        "unreadable": int(status.str.startswith("unreadable").sum()),
    }
    if "face_found" in group.columns:
        found = group["face_found"]
        counts["faces_found"] = int((found == True).sum())  # noqa: E712 - object column with None
        counts["no_face"] = int((found == False).sum())  # noqa: E712
    sources = group["region_source"].value_counts()
    counts["regions"] = ", ".join(f"{k}: {v}" for k, v in sources.items())
    return counts


def aggregate(rows: pd.DataFrame, by: Sequence[str], columns: Sequence[str],
              labels: Dict[str, str] = None) -> pd.DataFrame:
    by, cols = list(by), score_columns(rows, columns)
    numeric = rows[by + cols].copy()
    for c in cols:
        numeric[c] = pd.to_numeric(numeric[c], errors="coerce").astype(float)
    groups = rows.groupby(by, sort=False)
    counts = pd.DataFrame([dict(zip(by, key if isinstance(key, tuple) else (key,)), **_counts(g))
                           for key, g in groups])
    table = counts
    if cols:
        means = numeric.groupby(by, sort=False)[cols].mean().reset_index()
        table = means.merge(counts, on=by, how="left")
    for name, value in (labels or {}).items():
        table[name] = value
    return table


def build_tables(rows: pd.DataFrame, columns: Sequence[str], labels: Dict[str, str] = None) -> Dict[str, pd.DataFrame]:
    return {
        "per_method": aggregate(rows, ["method"], columns, labels),
        "per_subject": aggregate(rows, ["method", "subject"], columns),
        "per_prompt_type": aggregate(rows, ["method", "prompt_type"], columns),
    }


def markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table (no extra dependency)."""
    def cell(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if np.isnan(v) else f"{v:.{digits}f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule] + body)
