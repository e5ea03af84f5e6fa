"""Storyboards: a cast of characters and a list of shots, rendered one consistent frame per shot.

A script names each character once (alias, reference image, text description) and then lists shots whose
prompts refer to characters as ``{alias}``. Every frame is generated with *only* the characters acting in that
shot, each with its own reference (never another's), and with one seed for the whole story, so the same
character looks the same from frame to frame.

Scripts are JSON or YAML with English keys::

    title: A walk in the park
    settings: {seed: 7, steps: 20, guidance: 3.0}
    characters:
      - {alias: cat, description: a ginger cat, reference: cat.png}
      - {alias: astronaut, description: an astronaut in a white suit, reference: astronaut.png}
    shots:
      - prompt: "{astronaut} waves at {cat} on the grass"
      - prompt: "{cat} sleeps under a tree"
        characters: [cat]
      - prompt: "{cat} and {astronaut} on the moon"
        regions: {cat: [0, 0.3, 0.5, 1], astronaut: [0.5, 0, 1, 1]}

``regions`` (optional, per shot): where a character may appear, a box ``[x0, y0, x1, y1]`` in fractions of the
frame (``anystory/regions.py``); characters without one go where the router puts them.

``reference`` paths are relative to the script's folder. A ``.zip`` bundle carries the script with its images.
YAML note: a prompt that *starts* with ``{`` must be quoted (YAML would read a mapping).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from PIL import Image

from ..errors import InvalidInputError, ScriptError, check_number
from ..images import read_image, read_mask_image
from ..regions import check_region
from ..subjects import Subject

ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
SCRIPT_NAMES = ("script.yaml", "script.yml", "script.json")
MAX_CHARACTERS = 16
MAX_SHOTS = 64
MAX_BUNDLE_BYTES = 64 * 1024 * 1024

CHARACTER_KEYS = ("alias", "description", "reference", "mask", "scale", "reference_scale")
SHOT_KEYS = ("prompt", "characters", "seed", "negative_prompt", "regions")
SETTING_KEYS = ("seed", "steps", "guidance", "width", "height", "negative_prompt")
SCRIPT_KEYS = ("title", "settings", "characters", "shots")


@dataclass
class Character:
    alias: str
    description: str = ""
    reference: Any = None  # path (relative to the script) or an image
    mask: Any = None
    scale: float = 1.0
    reference_scale: float = 1.0


@dataclass
class Shot:
    prompt: str
    characters: Optional[List[str]] = None  # None: the aliases used in the prompt, in order
    seed: Optional[int] = None
    negative_prompt: str = ""
    regions: Dict[str, tuple] = field(default_factory=dict)  # alias -> box (x0, y0, x1, y1), fractions


@dataclass
class Script:
    characters: List[Character] = field(default_factory=list)
    shots: List[Shot] = field(default_factory=list)
    title: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)

    def character(self, alias: str) -> Character:
        for c in self.characters:
            if c.alias == alias:
                return c
        raise ScriptError(f"unknown character '{alias}'; defined: {', '.join(c.alias for c in self.characters) or 'none'}")


# ---- structure ----------------------------------------------------------------------------------------------------
def _check_keys(d: Any, allowed, where: str) -> dict:
    if not isinstance(d, dict):
        raise ScriptError(f"{where} must be a mapping (key: value), got {type(d).__name__}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise ScriptError(f"unknown key '{unknown[0]}' in {where}; expected: {', '.join(allowed)}")
    return d


def _number(v: Any, where: str, integer: bool = False):
    return check_number(v, where, integer=integer, typed=True, error=ScriptError)


def script_from_dict(data: Any) -> Script:
    """Build and validate a :class:`Script` from parsed JSON/YAML."""
    data = _check_keys(data, SCRIPT_KEYS, "the script")
    settings = dict(_check_keys(data.get("settings") or {}, SETTING_KEYS, "settings"))
    for key in ("seed", "steps", "width", "height"):
        if key in settings and settings[key] is not None:
            settings[key] = _number(settings[key], f"settings.{key}", integer=True)
    if settings.get("guidance") is not None:
        settings["guidance"] = _number(settings["guidance"], "settings.guidance")
    chars_raw = data.get("characters") or []
    if not isinstance(chars_raw, list):
        raise ScriptError("characters must be a list")
    if len(chars_raw) > MAX_CHARACTERS:
        raise ScriptError(f"too many characters: {len(chars_raw)}, the limit is {MAX_CHARACTERS}")
    characters = []
    for i, c in enumerate(chars_raw):
        c = _check_keys(c, CHARACTER_KEYS, f"character {i + 1}")
        alias = str(c.get("alias") or "").strip()
        if not ALIAS_RE.match(alias):
            raise ScriptError(f"character {i + 1}: alias {alias!r} must start with a letter and use only letters, "
                              "digits, '_' or '-' (at most 32)")
        if any(alias == o.alias for o in characters):
            raise ScriptError(f"character {i + 1}: alias '{alias}' is used twice")
        characters.append(Character(alias, str(c.get("description") or "").strip(), c.get("reference"), c.get("mask"),
                                    _number(c.get("scale", 1.0), f"character '{alias}' scale"),
                                    _number(c.get("reference_scale", 1.0), f"character '{alias}' reference_scale")))
    shots_raw = data.get("shots") or []
    if not isinstance(shots_raw, list) or not shots_raw:
        raise ScriptError("the script has no shots: add at least one under 'shots'")
    if len(shots_raw) > MAX_SHOTS:
        raise ScriptError(f"too many shots: {len(shots_raw)}, the limit is {MAX_SHOTS}")
    shots = []
    for i, s in enumerate(shots_raw):
        if isinstance(s, str):
            s = {"prompt": s}
        s = _check_keys(s, SHOT_KEYS, f"shot {i + 1}")
        prompt = str(s.get("prompt") or "").strip()
        if not prompt:
            raise ScriptError(f"shot {i + 1} has no prompt")
        cast = s.get("characters")
        if cast is not None:
            if isinstance(cast, str):
                cast = [a.strip() for a in cast.split(",") if a.strip()]
            if not isinstance(cast, list) or not all(isinstance(a, str) for a in cast):
                raise ScriptError(f"shot {i + 1}: characters must be a list of aliases")
        seed = s.get("seed")
        shots.append(Shot(prompt, cast, None if seed is None else _number(seed, f"shot {i + 1} seed", integer=True),
                          str(s.get("negative_prompt") or ""), _shot_regions(s.get("regions"), i)))
    script = Script(characters, shots, str(data.get("title") or ""), settings)
    for i in range(len(shots)):
        cast = shot_cast(script, i)  # unknown aliases, duplicates
        stray = [a for a in shots[i].regions if a not in cast]
        if stray:
            raise ScriptError(f"shot {i + 1}: a region is given for '{stray[0]}', who does not act in it "
                              f"(cast: {', '.join(cast) or 'none'})")
    return script


def _shot_regions(raw: Any, i: int) -> Dict[str, tuple]:
    """A shot's ``regions``: alias -> box in fractions of the frame, each checked by the one region rule."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ScriptError(f"shot {i + 1}: regions must map character aliases to boxes [x0, y0, x1, y1]")
    out = {}
    for alias, box in raw.items():
        if not isinstance(box, (list, tuple)):
            raise ScriptError(f"shot {i + 1}: region of '{alias}' must be a box [x0, y0, x1, y1] (fractions of the "
                              f"frame), got {box!r}")
        try:
            out[str(alias)] = check_region(box, f"shot {i + 1}: '{alias}'")
        except InvalidInputError as e:
            raise ScriptError(str(e)) from None
    return out


def script_to_dict(script: Script, references: Optional[Dict[str, str]] = None) -> dict:
    """Plain data for JSON/YAML. ``references``: alias -> path to write (images themselves are not text)."""
    references = references or {}
    chars = []
    for c in script.characters:
        d = {"alias": c.alias, "description": c.description}
        ref = references.get(c.alias, c.reference if isinstance(c.reference, str) else None)
        if ref:
            d["reference"] = ref
        if isinstance(c.mask, str):
            d["mask"] = c.mask
        if c.scale != 1.0:
            d["scale"] = c.scale
        if c.reference_scale != 1.0:
            d["reference_scale"] = c.reference_scale
        chars.append(d)
    shots = []
    for s in script.shots:
        d = {"prompt": s.prompt}
        if s.characters is not None:
            d["characters"] = list(s.characters)
        if s.seed is not None:
            d["seed"] = s.seed
        if s.negative_prompt:
            d["negative_prompt"] = s.negative_prompt
        if s.regions:
            d["regions"] = {a: list(box) for a, box in s.regions.items()}
        shots.append(d)
    out = {"title": script.title} if script.title else {}
    if script.settings:
        out["settings"] = {k: v for k, v in script.settings.items() if v is not None}
    out["characters"] = chars
    out["shots"] = shots
    return out


# ---- text formats -------------------------------------------------------------------------------------------------
def parse_script(text: str, fmt: Optional[str] = None) -> Script:
    """Parse JSON or YAML (``fmt``: 'json', 'yaml' or None to detect: JSON if it parses as JSON)."""
    import yaml

    if not text or not text.strip():
        raise ScriptError("the script is empty")
    fmt = (fmt or "").lower().lstrip(".")
    if fmt in ("", "json"):
        try:
            return script_from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            if fmt == "json":
                raise ScriptError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ScriptError(f"invalid YAML{where}: {getattr(e, 'problem', None) or e}. Quote prompts that start "
                          "with '{', e.g. prompt: \"{cat} sleeps\"") from None
    return script_from_dict(data)


def _dump(data: dict, fmt: str) -> str:
    import yaml

    if fmt.lower().lstrip(".") == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)


def dump_script(script: Script, fmt: str = "yaml", references: Optional[Dict[str, str]] = None) -> str:
    return _dump(script_to_dict(script, references), fmt)


def load_script_file(path: str) -> Script:
    """A .json/.yaml/.yml script; references stay paths relative to the file (see :func:`resolve_references`)."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".json", ".yaml", ".yml"):
        raise ScriptError(f"unsupported script file '{ext or os.path.basename(path)}'; use .json, .yaml, .yml or a .zip bundle")
    with open(path, encoding="utf-8") as f:
        return parse_script(f.read(), "json" if ext == ".json" else "yaml")


def resolve_references(script: Script, base_dir: str) -> List[str]:
    """Turn relative reference/mask paths into absolute ones under ``base_dir``; returns the aliases still missing."""
    missing = []
    root = os.path.realpath(base_dir)
    for c in script.characters:
        for attr in ("reference", "mask"):
            value = getattr(c, attr)
            if isinstance(value, str) and value:
                path = os.path.realpath(os.path.join(root, value))
                if os.path.isfile(path) and (path == root or path.startswith(root + os.sep)):
                    setattr(c, attr, path)
                elif attr == "reference":
                    missing.append(c.alias)
                    setattr(c, attr, None)
                else:
                    setattr(c, attr, None)
        if c.reference is None and c.alias not in missing:
            missing.append(c.alias)
    return missing


# ---- bundles ------------------------------------------------------------------------------------------------------
def _image_of(value: Any, attr: str = "reference") -> Optional[Image.Image]:
    """A character's reference or mask read by the one image rule (upright, arrays by dtype)."""
    if value is None:
        return None
    try:
        return read_mask_image(value, attr) if attr == "mask" else read_image(value, attr)
    except InvalidInputError as e:
        raise ScriptError(str(e)) from None


def export_bundle(script: Script, path: str, fmt: str = "yaml") -> str:
    """A .zip with ``script.yaml`` (or .json) and every character's reference (and mask) as PNG."""
    refs, files = {}, {}
    for c in script.characters:
        for attr, suffix in (("reference", ""), ("mask", "_mask")):
            image = _image_of(getattr(c, attr), attr)
            if image is not None:
                name = f"references/{c.alias}{suffix}.png"
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                files[name] = buf.getvalue()
                if attr == "reference":
                    refs[c.alias] = name
    data = script_to_dict(script, refs)
    for c, d in zip(script.characters, data["characters"]):
        if f"references/{c.alias}_mask.png" in files:
            d["mask"] = f"references/{c.alias}_mask.png"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("script.json" if fmt == "json" else "script.yaml", _dump(data, fmt))
        for name, blob in files.items():
            z.writestr(name, blob)
    return path


def import_bundle(path: str, dest_dir: str) -> tuple:
    """Unpack a bundle safely (no paths outside ``dest_dir``, size-limited) -> (Script, missing aliases)."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ScriptError(f"{os.path.basename(path)} is not a valid .zip bundle") from None
    with z:
        infos = z.infolist()
        if sum(i.file_size for i in infos) > MAX_BUNDLE_BYTES:
            raise ScriptError(f"the bundle unpacks to more than {MAX_BUNDLE_BYTES // 2**20} MB")
        root = os.path.realpath(dest_dir)
        for info in infos:
            target = os.path.realpath(os.path.join(root, info.filename))
            if not target.startswith(root + os.sep):
                raise ScriptError(f"the bundle contains an unsafe path: {info.filename}")
        z.extractall(root)
    for name in SCRIPT_NAMES:
        if os.path.isfile(os.path.join(root, name)):
            script = load_script_file(os.path.join(root, name))
            return script, resolve_references(script, root)
    raise ScriptError(f"the bundle has no script ({', '.join(SCRIPT_NAMES)})")


def import_script(path: str, dest_dir: str) -> tuple:
    """Any script upload: a .zip bundle, or a .json/.yaml file (references relative to it) -> (Script, missing)."""
    if path.lower().endswith(".zip"):
        return import_bundle(path, dest_dir)
    script = load_script_file(path)
    return script, resolve_references(script, os.path.dirname(os.path.abspath(path)))


# ---- shots --------------------------------------------------------------------------------------------------------
def shot_cast(script: Script, index: int) -> List[str]:
    """The aliases acting in shot ``index`` (listed, else those the prompt names, in order), checked."""
    shot = script.shots[index]
    named = []
    for token in PLACEHOLDER_RE.findall(shot.prompt):
        alias = token.strip()
        try:
            script.character(alias)
        except ScriptError as e:
            raise ScriptError(f"shot {index + 1}: {e}") from None
        if alias not in named:
            named.append(alias)
    cast = named if shot.characters is None else list(shot.characters)
    for alias in cast:
        try:
            script.character(alias)
        except ScriptError as e:
            raise ScriptError(f"shot {index + 1}: {e}") from None
    if len(set(cast)) != len(cast):
        raise ScriptError(f"shot {index + 1}: a character is listed twice ({', '.join(cast)})")
    return cast


def shot_prompt(script: Script, index: int) -> str:
    """The prompt with every ``{alias}`` replaced by the character's description (or its alias when it has none)."""
    def sub(m: re.Match) -> str:
        c = script.character(m.group(1).strip())
        return c.description or c.alias

    return PLACEHOLDER_RE.sub(sub, script.shots[index].prompt)


def shot_subjects(script: Script, index: int, subjects: Dict[str, Subject]) -> List[Subject]:
    """The acting characters' subjects, in cast order, each with the shot's region for it (if any); ``subjects``
    maps alias -> that character's Subject."""
    out = []
    regions = script.shots[index].regions
    for alias in shot_cast(script, index):
        if alias not in subjects:
            raise ScriptError(f"shot {index + 1}: character '{alias}' has no reference image; upload one")
        out.append(dataclasses.replace(subjects[alias], region=regions[alias]) if alias in regions else subjects[alias])
    return out


@dataclass
class ShotPlan:
    """One shot ready to render: its prompt with descriptions in, its cast and their subjects (with the shot's
    regions), its seed (the shot's own, else the story's) and negative prompt (the shot's, else the settings')."""

    index: int
    prompt: str
    cast: List[str]
    subjects: List[Subject]
    seed: Any
    negative_prompt: str


def plan_shots(script: Script, subjects: Dict[str, Subject], seed: Any,
               max_subjects: Optional[int] = None) -> List[ShotPlan]:
    """Every shot planned, and its structure checked (cast, characters with references, cast size), before the
    first frame is made. ``subjects`` maps alias -> that character's Subject; ``seed`` is the story's seed."""
    plans = []
    default_negative = str(script.settings.get("negative_prompt") or "")
    for i, shot in enumerate(script.shots):
        cast = shot_cast(script, i)
        if max_subjects is not None and len(cast) > max_subjects:
            raise ScriptError(f"shot {i + 1}: {len(cast)} characters act, the model takes at most {max_subjects}")
        plans.append(ShotPlan(i, shot_prompt(script, i), cast, shot_subjects(script, i, subjects),
                              seed if shot.seed is None else shot.seed, shot.negative_prompt or default_negative))
    return plans


@dataclass
class Frame:
    index: int
    prompt: str
    cast: List[str]
    seed: int
    output: Any  # the app's generation.Result

    @property
    def caption(self) -> str:
        who = ", ".join(self.cast) if self.cast else "no characters"
        return f"Shot {self.index + 1} ({who}): {self.prompt}"
