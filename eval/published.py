"""Published numbers of other methods, each with the paper and table it comes from, for report.md.

They were measured by their authors under their own protocol (models, sampling, seeds), not re-measured here,
so they stand *beside* our rows, marked as published, never merged into our tables. Add a number only with
its paper and table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import pandas as pd

DREAMBOOTH_PAPER = "DreamBooth (Ruiz et al., CVPR 2023), Table 1"
UNO_SINGLE = "UNO (Wu et al. 2025, arXiv 2504.02160), Table 1"
UNO_MULTI = "UNO (Wu et al. 2025, arXiv 2504.02160), Table 2"


@dataclass(frozen=True)
class Published:
    bench: str
    method: str
    scores: Dict[str, float]
    source: str
    protocol: str = "dreambooth"


PUBLISHED: List[Published] = [
    Published("dreambench", "real images (oracle)", {"dino": 0.774, "clip_i": 0.885}, DREAMBOOTH_PAPER),
    Published("dreambench", "UNO", {"dino": 0.760, "clip_i": 0.835, "clip_t": 0.304}, UNO_SINGLE),
    Published("dreambench", "MS-Diffusion", {"dino": 0.671, "clip_i": 0.792, "clip_t": 0.321},
              UNO_SINGLE + " (as UNO reports it)"),
    Published("dreambench-multi", "UNO", {"dino": 0.542, "clip_i": 0.733, "clip_t": 0.322}, UNO_MULTI),
]
COLUMNS = ("dino", "clip_i", "clip_t")


def published_for(bench: str) -> List[Published]:
    return [p for p in PUBLISHED if p.bench == bench]


def beside_ours(bench: str, per_method: pd.DataFrame, protocol: str, scale: str) -> pd.DataFrame:
    """Our per-method means (measured) followed by the published rows for ``bench`` (empty if none)."""
    published = published_for(bench)
    if not published:
        return pd.DataFrame()
    rows = [{"method": str(r["method"]), "source": "measured here", "protocol": protocol, "scale": scale,
             **{c: r[c] for c in COLUMNS if c in per_method.columns}} for _, r in per_method.iterrows()]
    rows += [{"method": p.method, "source": f"published: {p.source}", "protocol": f"{p.protocol} (theirs)",
              "scale": "[0, 1]", **p.scores} for p in published]
    return pd.DataFrame(rows)
