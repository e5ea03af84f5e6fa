"""The Storyboard tab without Gradio: its character slots and shots table to a checked Script and back, and the
script's export files.

The table is only a way to write a script: every rule lives in :func:`~anystory.app.storyboard.script_from_dict`,
so a script typed here, imported from YAML or JSON, or unpacked from a bundle is checked the same way.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from .inputs import InputError, check_number
from .region_canvas import region_text
from .storyboard import NUMBER_SETTINGS, Script, ScriptError, dump_script, export_bundle, script_from_dict

STORY_SLOTS = 6
STORY_FIELDS = ("alias", "description", "reference")
#: The shots table's columns; "regions" reads ``alias: x0, y0, x1, y1`` entries separated by ``;``.
SHOT_COLUMNS = ("prompt", "characters", "regions")
FORM_NAMES = {"seed": "Story seed", "steps": "Steps"}


def _cell(row: Sequence[Any], k: int) -> str:
    return str(row[k] if len(row) > k and row[k] is not None else "").strip()


def _rows(shot_rows: Any) -> List[List[str]]:
    """The table's value (a DataFrame, or a list of rows) -> rows of stripped strings, one per column."""
    rows = shot_rows.values.tolist() if hasattr(shot_rows, "values") else list(shot_rows or [])
    return [[_cell(row, k) for k in range(len(SHOT_COLUMNS))] for row in rows]


def parse_shot_regions(text: str, shot: int) -> Dict[str, List[float]]:
    """``"cat: 0, 0.3, 0.5, 1; dog: 0.5, 0, 1, 1"`` -> alias -> the box's numbers, unchecked: the script's own
    region rule checks them, so a bad box gets the same message wherever the script came from."""
    out: Dict[str, List[float]] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        alias, sep, numbers = entry.partition(":")
        if not sep or not alias.strip():
            raise InputError(f"Shot {shot}: region '{entry}' must read 'alias: x0, y0, x1, y1' (fractions of the "
                             "frame), entries separated by ';'.")
        values = [v for v in numbers.replace(",", " ").split() if v]
        try:
            out[alias.strip()] = [float(v) for v in values]
        except ValueError:
            raise InputError(f"Shot {shot}: region of '{alias.strip()}' must be four numbers x0, y0, x1, y1 "
                             f"(fractions of the frame), got '{numbers.strip()}'.") from None
    return out


def script_from_ui(char_values: Sequence[Any], shot_rows: Any, title: str = "", settings: Optional[dict] = None) -> Script:
    """The Storyboard tab's slots (``STORY_FIELDS`` each) and shots table (``SHOT_COLUMNS``) -> a checked Script."""
    n = len(STORY_FIELDS)
    chars = []
    for i in range(0, len(char_values), n):
        alias, description, reference = char_values[i:i + n]
        if not (alias or "").strip() and reference is None and not (description or "").strip():
            continue
        if not (alias or "").strip():
            raise InputError(f"Character {i // n + 1}: give it an alias (a short name used as {{alias}} in prompts).")
        chars.append({"alias": alias.strip(), "description": description or "", "reference": reference})
    shots = []
    for prompt, cast, regions in _rows(shot_rows):
        if not prompt and not cast and not regions:
            continue
        shot: Dict[str, Any] = {"prompt": prompt}
        if cast:
            shot["characters"] = [a.strip() for a in cast.split(",") if a.strip()]
        if regions:
            shot["regions"] = parse_shot_regions(regions, len(shots) + 1)
        shots.append(shot)
    references = {c["alias"]: c.pop("reference") for c in chars}
    settings = {k: v for k, v in (settings or {}).items() if v not in (None, "")}
    for key, value in settings.items():  # the form's fields, named as the page names them
        if key in NUMBER_SETTINGS:
            (lo, hi), integer = NUMBER_SETTINGS[key]
            settings[key] = check_number(value, FORM_NAMES.get(key, key.capitalize()), lo, hi, integer=integer)
    data = {"title": title or "", "settings": settings,
            "characters": chars, "shots": shots}
    try:
        script = script_from_dict(data)
    except ScriptError as e:
        raise InputError(f"Storyboard: {e}.") from None
    for c in script.characters:
        c.reference = references[c.alias]
    return script


def ui_from_script(script: Script, slots: int = STORY_SLOTS) -> tuple:
    """(flat character slot values, shot rows) to fill the Storyboard tab from an imported script."""
    if len(script.characters) > slots:
        raise InputError(f"The script has {len(script.characters)} characters; this page shows at most {slots}.")
    values: List[Any] = []
    for i in range(slots):
        if i < len(script.characters):
            c = script.characters[i]
            values += [c.alias, c.description, c.reference]
        else:
            values += ["", "", None]
    rows = [[s.prompt, ", ".join(s.characters) if s.characters is not None else "",
             "; ".join(f"{alias}: {region_text(box)}" for alias, box in s.regions.items())] for s in script.shots]
    return values, rows


def unused_fields(script: Script) -> List[str]:
    """The script's fields this page has no place for (they would be lost on generate or export), named as in the
    script, so an import can say which it could not use."""
    unused = [f"settings.{k}" for k in ("guidance", "width", "height", "negative_prompt")
              if script.settings.get(k) not in (None, "")]
    for c in script.characters:
        unused += [f"character '{c.alias}' {what}" for what, used in (
            ("mask", c.mask is not None), ("scale", c.scale != 1.0), ("reference_scale", c.reference_scale != 1.0))
            if used]
    for i, shot in enumerate(script.shots):
        unused += [f"shot {i + 1} {what}" for what, used in (("seed", shot.seed is not None),
                                                             ("negative_prompt", bool(shot.negative_prompt)),
                                                             ("background", shot.background is not None),
                                                             ("background_start", shot.background_start is not None))
                   if used]
    return unused


def export_script_files(script: Script, out_dir: str) -> List[str]:
    """script.yaml, script.json (reference names only) and a .zip bundle with the images, for download."""
    os.makedirs(out_dir, exist_ok=True)
    names = {c.alias: f"references/{c.alias}.png" for c in script.characters if c.reference is not None}
    paths = []
    for fmt in ("yaml", "json"):
        path = os.path.join(out_dir, f"storyboard.{fmt}")
        with open(path, "w", encoding="utf-8") as f:
            f.write(dump_script(script, fmt, names))
        paths.append(path)
    paths.append(export_bundle(script, os.path.join(out_dir, "storyboard.zip")))
    return paths


def add_shot(shot_rows: Any) -> List[List[str]]:
    """The shots table with one empty row added at the end (the rows typed so far kept as they are)."""
    return _rows(shot_rows) + [[""] * len(SHOT_COLUMNS)]


def remove_shot(shot_rows: Any) -> List[List[str]]:
    """The shots table without its last row; one row always stays (an empty table has nowhere to type)."""
    rows = _rows(shot_rows)
    return rows[:-1] if len(rows) > 1 else [[""] * len(SHOT_COLUMNS)]
