"""``report.md`` (tables, models, what was not computed and why) and a bar chart of the per-method scores."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence

import pandas as pd

from .atomic import write_text, write_with
from .metrics.base import RANDOM_INIT
from .metrics.copy_paste import __doc__ as COPY_PASTE_DOC
from .published import beside_ours
from .tables import markdown, score_columns


def bar_chart(per_method: pd.DataFrame, columns: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = score_columns(per_method, columns)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(cols) * max(1, len(per_method))), 4.0))
    if cols:
        width = 0.8 / max(1, len(per_method))
        for i, (_, row) in enumerate(per_method.iterrows()):
            values = pd.to_numeric(row[cols], errors="coerce").astype(float)
            xs = [x + i * width for x in range(len(cols))]
            ax.bar(xs, values, width, label=str(row["method"]))
            for x, v in zip(xs, values):
                if pd.isna(v):  # nothing scored (e.g. no face found): say so, never draw it as a zero
                    ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks([x + width * (len(per_method) - 1) / 2 for x in range(len(cols))])
        ax.set_xticklabels(cols, rotation=20)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metric was computed", ha="center", va="center")
    ax.set_title("mean score per method")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(run_dir: str, config: dict, tables: Dict[str, pd.DataFrame], columns: List[str]) -> str:
    bar_chart(tables["per_method"], columns, os.path.join(run_dir, "chart.png"))
    scoring = config.get("scoring", {})
    lines = [f"# Evaluation: {config['bench']}", ""]
    if any(RANDOM_INIT in str(d.get("weights", "")) for d in scoring.get("metrics", {}).values()):
        lines += [f"> **WARNING: some metrics use randomly initialised models - {RANDOM_INIT}.**", ""]
    protocol = config.get("protocol", {})
    lines += [f"- bench: {config['bench']}",
              f"- protocol: {protocol.get('protocol')} (compares with: {protocol.get('compares_with')}; as "
              f"{protocol.get('used_by')})",
              f"- scale: {protocol.get('scale')}",
              *[f"- {column}: {name}" + ("" if column in config.get("model_labels", {}) else " (not computed)")
                for column, name in config.get("requested_model_labels", config.get("model_labels", {})).items()],
              f"- data: `{config.get('data_dir')}` ({config.get('entries')} entries"
              f"{'; ' + config['subset_note'] if config.get('subset_note') else ''}), "
              f"{config['images_per_prompt']} image(s) per prompt, seed {config['seed']}",
              f"- methods: {', '.join(m['name'] for m in config['methods'])}",
              f"- rows: one per image and subject; {len(tables.get('rows', []))} in `rows.parquet` / `rows.csv`"]
    for method, missing in config.get("missing_images", {}).items():
        lines.append(f"- **{method}: {missing['count']} of {missing['expected']} images missing** (first: "
                     f"`{missing['first']}`)")
    lines += ["", "## Metrics", ""]
    for name, d in scoring.get("metrics", {}).items():
        extra = "; ".join(f"{k}: {v}" for k, v in d.items() if k not in ("metric", "model", "weights", "label"))
        lines.append(f"- **{name}**: {d.get('model')} - weights `{d.get('weights')}`" + (f" ({extra})" if extra else ""))
    for name, reason in scoring.get("unavailable", {}).items():
        lines.append(f"- **{name}: not computed** - {reason}")
    lines += ["", "### Copy-paste score", "", COPY_PASTE_DOC.strip(), ""]
    per_method = tables["per_method"]
    published = beside_ours(config["bench"], per_method, protocol.get("protocol"), protocol.get("scale"))
    if not published.empty:
        lines += ["## Beside published numbers", "",
                  "Published rows were measured by their authors under their own protocol (models, sampling, "
                  "seeds) and are not re-measured here; compare them with ours only as far as the protocols "
                  "agree. Our `real-images` row is DreamBooth's oracle (each real photo except the reference "
                  "against the subject's other photos).", "", markdown(published, 3), ""]
    if "no_face" in per_method.columns:
        found = ", ".join(f"{r.method}: {r.faces_found} of {r.faces_found + r.no_face}"
                          for r in per_method.itertuples())
        lines += [f"Face found in the scored region: {found} (no face -> no face-ID score, counted here).", ""]
    for key, title in (("per_method", "Per method"), ("per_prompt_type", "Per prompt type"),
                       ("per_subject", "Per subject")):
        lines += [f"## {title}", "", markdown(tables[key]), ""]
    lines += ["![mean score per method](chart.png)", ""]
    path = os.path.join(run_dir, "report.md")
    write_text(path, "\n".join(lines))
    return path
