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

``background`` (optional, in ``settings`` for the whole story and per shot, a shot's own winning): an image of the
scene's backdrop (SDXL only, ``anystory/sdxl/background.py``); ``background_start`` its strength (the share of its
mean colour in the starting latent; absent: the weights' own value).

``reference`` and ``background`` paths are relative to the script's folder. A ``.zip`` bundle carries the script with its images.
YAML note: a prompt that *starts* with ``{`` must be quoted (YAML would read a mapping).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import stat
import zipfile
import zlib
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
#: A bundle holds a script and a reference and a mask per character; nothing else is unpacked.
MAX_BUNDLE_ENTRIES = 2 * MAX_CHARACTERS + 1 + (1 + MAX_SHOTS)  # ... and a background for the story and each shot
MAX_ENTRY_BYTES = 10 * 1024 * 1024
#: Script text (a long story is a few tens of KB) and its nesting (a script is 4 levels deep).
MAX_SCRIPT_BYTES = 512 * 1024
MAX_SCRIPT_DEPTH = 8
MAX_TITLE_CHARS = 200
MAX_TEXT_CHARS = 2000
#: The form's ranges: an imported number obeys the same ones (``anystory/app/inputs.py``: seeds are 31-bit).
SEED_RANGE = (-1, 2**31 - 1)
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 30.0)
SIZE_RANGE = (64, 4096)
BACKGROUND_START_RANGE = (0.0, 5.0)  # the Generate tab's (``anystory/app/background.py``)

CHARACTER_KEYS = ("alias", "description", "reference", "mask", "scale", "reference_scale")
SHOT_KEYS = ("prompt", "characters", "seed", "negative_prompt", "regions", "background", "background_start")
SETTING_KEYS = ("seed", "steps", "guidance", "width", "height", "negative_prompt", "background", "background_start")
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
    background: Any = None  # path (relative to the script) or an image; None: the story's
    background_start: Optional[float] = None  # None: the story's, else the weights' own


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


def _text(v: Any, where: str, limit: int = MAX_TEXT_CHARS) -> str:
    """A text field: a string (or a number, written as text) of at most ``limit`` characters."""
    if v is None:
        return ""
    if isinstance(v, bool) or not isinstance(v, (str, int, float)):
        raise ScriptError(f"{where} must be text, got {type(v).__name__}")
    text = str(v).strip()
    if len(text) > limit:
        raise ScriptError(f"{where} is too long: {len(text)} characters, the limit is {limit}")
    return text


NUMBER_SETTINGS = {"seed": (SEED_RANGE, True), "steps": (STEPS_RANGE, True), "guidance": (GUIDANCE_RANGE, False),
                   "width": (SIZE_RANGE, True), "height": (SIZE_RANGE, True)}


def script_from_dict(data: Any) -> Script:
    """Build and validate a :class:`Script` from parsed JSON/YAML."""
    data = _check_keys(data, SCRIPT_KEYS, "the script")
    settings = dict(_check_keys(data.get("settings") or {}, SETTING_KEYS, "settings"))
    for key, ((lo, hi), integer) in NUMBER_SETTINGS.items():
        if settings.get(key) is not None:
            settings[key] = check_number(settings[key], f"settings.{key}", lo, hi, integer=integer, typed=True,
                                         error=ScriptError)
    if settings.get("negative_prompt") is not None:
        settings["negative_prompt"] = _text(settings["negative_prompt"], "settings.negative_prompt")
    background = dict(zip(("background", "background_start"), _background(settings, "settings")))
    settings.update({k: v for k, v in background.items() if v is not None})
    chars_raw = data.get("characters") or []
    if not isinstance(chars_raw, list):
        raise ScriptError("characters must be a list")
    if len(chars_raw) > MAX_CHARACTERS:
        raise ScriptError(f"too many characters: {len(chars_raw)}, the limit is {MAX_CHARACTERS}")
    characters = []
    for i, c in enumerate(chars_raw):
        c = _check_keys(c, CHARACTER_KEYS, f"character {i + 1}")
        alias = _text(c.get("alias"), f"character {i + 1} alias", 64)
        if not ALIAS_RE.match(alias):
            raise ScriptError(f"character {i + 1}: alias {alias!r} must start with a letter and use only letters, "
                              "digits, '_' or '-' (at most 32)")
        if any(alias == o.alias for o in characters):
            raise ScriptError(f"character {i + 1}: alias '{alias}' is used twice")
        characters.append(Character(alias, _text(c.get("description"), f"character '{alias}' description"),
                                    _path(c.get("reference"), f"character '{alias}' reference"),
                                    _path(c.get("mask"), f"character '{alias}' mask"),
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
        prompt = _text(s.get("prompt"), f"shot {i + 1} prompt")
        if not prompt:
            raise ScriptError(f"shot {i + 1} has no prompt")
        cast = s.get("characters")
        if cast is not None:
            if isinstance(cast, str):
                cast = [a.strip() for a in cast.split(",") if a.strip()]
            if not isinstance(cast, list) or not all(isinstance(a, str) for a in cast):
                raise ScriptError(f"shot {i + 1}: characters must be a list of aliases")
            if len(cast) > MAX_CHARACTERS:
                raise ScriptError(f"shot {i + 1}: {len(cast)} characters listed, the limit is {MAX_CHARACTERS}")
        seed = s.get("seed")
        if seed is not None:
            seed = check_number(seed, f"shot {i + 1} seed", *SEED_RANGE, integer=True, typed=True, error=ScriptError)
        shots.append(Shot(prompt, cast, seed, _text(s.get("negative_prompt"), f"shot {i + 1} negative_prompt"),
                          _shot_regions(s.get("regions"), i), *_background(s, f"shot {i + 1}")))
    script = Script(characters, shots, _text(data.get("title"), "the title", MAX_TITLE_CHARS), settings)
    for i in range(len(shots)):
        cast = shot_cast(script, i)  # unknown aliases, duplicates
        stray = [a for a in shots[i].regions if a not in cast]
        if stray:
            raise ScriptError(f"shot {i + 1}: a region is given for '{stray[0]}', who does not act in it "
                              f"(cast: {', '.join(cast) or 'none'})")
    return script


def _path(v: Any, where: str) -> Any:
    """A reference or mask: a relative path in a script (an image object when the page built the script)."""
    if isinstance(v, str):
        return _text(v, where, 1024) or None
    if isinstance(v, (bytes, int, float, list, dict, tuple, bool)):
        raise ScriptError(f"{where} must be a file name (relative to the script), got {type(v).__name__}")
    return v


def _background(d: dict, where: str) -> tuple:
    """``(background, background_start)`` of the settings or a shot: a file name and a number, each optional."""
    start = d.get("background_start")
    if start is not None:
        start = check_number(start, f"{where} background_start", *BACKGROUND_START_RANGE, typed=True, error=ScriptError)
    return _path(d.get("background"), f"{where} background"), start


def _shot_regions(raw: Any, i: int) -> Dict[str, tuple]:
    """A shot's ``regions``: alias -> box in fractions of the frame, each checked by the one region rule."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_CHARACTERS:
        raise ScriptError(f"shot {i + 1}: regions must map character aliases to boxes [x0, y0, x1, y1], at most "
                          f"{MAX_CHARACTERS}")
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


def script_to_dict(script: Script, references: Optional[Dict[str, str]] = None,
                   backgrounds: Optional[Dict[int, str]] = None) -> dict:
    """Plain data for JSON/YAML. ``references``: alias -> path to write (images themselves are not text);
    ``backgrounds``: the same for backgrounds, 0 the story's, k shot k's."""
    references, backgrounds = references or {}, backgrounds or {}
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
    for i, s in enumerate(script.shots):
        d = {"prompt": s.prompt}
        if s.characters is not None:
            d["characters"] = list(s.characters)
        if s.seed is not None:
            d["seed"] = s.seed
        if s.negative_prompt:
            d["negative_prompt"] = s.negative_prompt
        if s.regions:
            d["regions"] = {a: list(box) for a, box in s.regions.items()}
        d.update(_background_fields(s.background, s.background_start, backgrounds.get(i + 1)))
        shots.append(d)
    out = {"title": script.title} if script.title else {}
    settings = {k: v for k, v in script.settings.items() if v is not None and not k.startswith("background")}
    settings.update(_background_fields(script.settings.get("background"), script.settings.get("background_start"),
                                       backgrounds.get(0)))
    if settings:
        out["settings"] = settings
    out["characters"] = chars
    out["shots"] = shots
    return out


def _background_fields(image: Any, start: Optional[float], written: Optional[str]) -> dict:
    """A background's script fields: its file name (the bundle's, else the script's own) and strength."""
    d = {}
    name = written or (image if isinstance(image, str) else None)
    if name:
        d["background"] = name
    if start is not None:
        d["background_start"] = start
    return d


# ---- text formats -------------------------------------------------------------------------------------------------
def parse_script(text: str, fmt: Optional[str] = None) -> Script:
    """Parse JSON or YAML (``fmt``: 'json', 'yaml' or None to detect: JSON if it parses as JSON).

    Bounded before anything is built: at most :data:`MAX_SCRIPT_BYTES` of text, :data:`MAX_SCRIPT_DEPTH` levels,
    and no YAML aliases (438 bytes of nested aliases expanded to gigabytes)."""
    if not text or not text.strip():
        raise ScriptError("the script is empty")
    if len(text) > MAX_SCRIPT_BYTES:
        raise ScriptError(f"the script is {len(text) // 1024} KB of text; the limit is {MAX_SCRIPT_BYTES // 1024} KB")
    fmt = (fmt or "").lower().lstrip(".")
    if fmt in ("", "json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if fmt == "json":
                raise ScriptError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise ScriptError(f"the script is nested too deeply (the limit is {MAX_SCRIPT_DEPTH} levels)") from None
        else:
            _check_depth(data)
            return script_from_dict(data)
    return script_from_dict(_load_yaml(text))


def _check_depth(data: Any) -> None:
    """Refuse parsed data nested deeper than a script ever is (walked without recursion)."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_SCRIPT_DEPTH:
            raise ScriptError(f"the script is nested too deeply (the limit is {MAX_SCRIPT_DEPTH} levels)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((v, depth + 1) for v in children if isinstance(v, (dict, list)))


def _load_yaml(text: str) -> Any:
    """YAML with the safe loader, refusing aliases and nesting deeper than :data:`MAX_SCRIPT_DEPTH` as the
    document is composed, before any value is built."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ScriptError(f"YAML aliases (*name) are not allowed in a script (line {mark.line + 1}); write "
                                  "the value out")
            self.depth += 1
            if self.depth > MAX_SCRIPT_DEPTH:
                raise ScriptError(f"the script is nested too deeply (the limit is {MAX_SCRIPT_DEPTH} levels)")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    try:
        return yaml.load(text, Loader=BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ScriptError(f"invalid YAML{where}: {getattr(e, 'problem', None) or e}. Quote prompts that start "
                          "with '{', e.g. prompt: \"{cat} sleeps\"") from None


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
    if os.path.getsize(path) > MAX_SCRIPT_BYTES:
        raise ScriptError(f"{os.path.basename(path)} is {os.path.getsize(path) // 1024} KB; a script may have at most "
                          f"{MAX_SCRIPT_BYTES // 1024} KB")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ScriptError(f"{os.path.basename(path)} is not UTF-8 text (byte {e.start}); save the script as UTF-8") from None
    return parse_script(text, "json" if ext == ".json" else "yaml")


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
    if isinstance(script.settings.get("background"), str):
        script.settings["background"] = _inside(root, script.settings["background"], "settings background")
    for i, shot in enumerate(script.shots):
        if isinstance(shot.background, str):
            shot.background = _inside(root, shot.background, f"shot {i + 1} background")
    return missing


def _inside(root: str, name: str, where: str) -> str:
    """A script's file name as a path under ``root`` (the script's folder), or a :class:`ScriptError` naming it:
    a background has no upload field to fill in later, so a missing one is an error, not a gap."""
    path = os.path.realpath(os.path.join(root, name))
    if not (path.startswith(root + os.sep) and os.path.isfile(path)):
        raise ScriptError(f"{where}: file not found: {name} (paths are relative to the script's folder)")
    return path


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
    """A .zip with ``script.yaml`` (or .json), every character's reference (and mask) and the story's and each
    shot's background as PNG."""
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
    backgrounds = {}
    for k, image in enumerate([script.settings.get("background")] + [s.background for s in script.shots]):
        picture = _image_of(image, "settings background" if k == 0 else f"shot {k} background")
        if picture is not None:
            backgrounds[k] = f"backgrounds/{'story' if k == 0 else f'shot{k}'}.png"
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            files[backgrounds[k]] = buf.getvalue()
    data = script_to_dict(script, refs, backgrounds)
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
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise ScriptError(f"{os.path.basename(path)} is not a valid .zip bundle") from None
    with z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        _check_bundle(infos)
        root = os.path.realpath(dest_dir)
        for info in infos:
            target = os.path.realpath(os.path.join(root, info.filename))
            if not target.startswith(root + os.sep):
                raise ScriptError(f"the bundle contains an unsafe path: {info.filename}")
        try:
            for info in infos:
                z.extract(info, root)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, OSError) as e:
            raise ScriptError(f"{os.path.basename(path)} is damaged and cannot be unpacked "
                              f"({type(e).__name__}); export the bundle again") from None
    for name in SCRIPT_NAMES:
        if os.path.isfile(os.path.join(root, name)):
            script = load_script_file(os.path.join(root, name))
            return script, resolve_references(script, root)
    raise ScriptError(f"the bundle has no script ({', '.join(SCRIPT_NAMES)})")


def _check_bundle(infos: List[zipfile.ZipInfo]) -> None:
    """Entry count, sizes (as the archive declares them, and zipfile stops at the declared size) and kinds."""
    if len(infos) > MAX_BUNDLE_ENTRIES:
        raise ScriptError(f"the bundle has {len(infos)} files; a bundle holds a script, at most a reference and a "
                          f"mask per character and a background for the story and each shot ({MAX_BUNDLE_ENTRIES} "
                          "files)")
    if sum(i.file_size for i in infos) > MAX_BUNDLE_BYTES:
        raise ScriptError(f"the bundle unpacks to more than {MAX_BUNDLE_BYTES // 2**20} MB")
    for info in infos:
        if info.file_size > MAX_ENTRY_BYTES:
            raise ScriptError(f"{info.filename} in the bundle is {info.file_size / 2**20:.1f} MB; the limit per file is "
                              f"{MAX_ENTRY_BYTES // 2**20} MB")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ScriptError(f"the bundle contains a link ({info.filename}); only files are allowed")


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
    regions), its seed (the shot's own, else the story's), negative prompt and background (the shot's, else the
    settings')."""

    index: int
    prompt: str
    cast: List[str]
    subjects: List[Subject]
    seed: Any
    negative_prompt: str
    background: Any = None  # the shot's own, else the story's
    background_start: Optional[float] = None
    background_field: str = ""  # how an error names it: the shot, and whose background it is


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
                              seed if shot.seed is None else shot.seed, shot.negative_prompt or default_negative,
                              *_shot_background(script, i)))
    return plans


def _shot_background(script: Script, i: int) -> tuple:
    """(image, strength, field name) of shot ``i``'s background: each the shot's own, else the story's."""
    shot, settings = script.shots[i], script.settings
    own = shot.background is not None
    image = shot.background if own else settings.get("background")
    start = shot.background_start if shot.background_start is not None else settings.get("background_start")
    return image, start, f"Shot {i + 1} background" + ("" if own else " (settings.background)")


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
