"""Typed configuration sections: dataclasses built from plain mappings (YAML, ``--set``), every key and type checked.

A section also reads as the dict it replaced (``cfg["stage2"]["lr"]``, ``.get``, ``.items``, ``dict(section)``), so
the stages keep their access pattern; what it adds is that a key no section declares, at any depth, and a value of
the wrong type are errors naming their full path (``stage2.trajectory.combine_wieght: unknown key; known: ...``).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from collections.abc import Mapping, MutableMapping
from typing import Any, Dict, Iterable, Optional, Union, get_args, get_origin, get_type_hints

_SCALARS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    """Field name -> resolved annotation, in declaration order."""
    resolved = get_type_hints(cls)
    return {f.name: resolved[f.name] for f in dataclasses.fields(cls)}


class Section(MutableMapping):
    """Base of every config dataclass: the mapping view of its fields (assignments are type-checked too)."""

    def __getitem__(self, key):
        if key not in _hints(type(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __setitem__(self, key, value) -> None:
        hints = _hints(type(self))
        if key not in hints:
            raise KeyError(f"{key}: unknown key; known: {', '.join(hints)}")
        setattr(self, key, check(value, hints[key], key))

    def __delitem__(self, key) -> None:
        raise TypeError(f"{key}: config keys cannot be removed (set the value instead)")

    def __iter__(self):
        return iter(_hints(type(self)))

    def __len__(self) -> int:
        return len(_hints(type(self)))

    def to_dict(self) -> dict:
        """Plain nested dicts and lists (what YAML would hold)."""
        return plain(self)


def plain(value):
    """Sections and mappings as plain dicts, recursively (copies)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return copy.deepcopy(value)


def merge(base: Mapping, override: Mapping | None) -> dict:
    """``override`` over ``base``, mappings merged key by key, everything else replaced."""
    out = plain(base)
    for k, v in (override or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else plain(v)
    return out


def section(cls, **values):
    """A dataclass field whose default is ``cls(**values)``, a fresh copy each time (stages share a class, not
    their defaults)."""
    return field(default_factory=lambda: cls(**copy.deepcopy(values)))


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def build(cls, data, path: str = "", default: Optional["Section"] = None):
    """``cls`` (a :class:`Section` dataclass) from ``data`` over ``default`` (an instance; else ``cls()``): unset
    keys keep their defaults, nested sections included."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = _hints(cls)
    refuse_unknown(data, hints, path)
    default = default if default is not None else cls()
    values = {}
    for k, v in data.items():
        below = default[k]
        if isinstance(below, Section) and isinstance(v, Mapping):
            values[k] = build(type(below), v, _join(path, k), below)
        else:
            values[k] = check(v, hints[k], _join(path, k))
    return dataclasses.replace(default, **values)


def refuse_unknown(data: Mapping, known: Iterable[str], path: str) -> None:
    """An error naming the first key of ``data`` not in ``known``, with its full path and the known keys."""
    known = list(known)
    for key in data:
        if key not in known:
            raise ValueError(f"{_join(path, key)}: unknown key; known: {', '.join(known)}")


def _type_name(tp) -> str:
    if tp in _SCALARS:
        return _SCALARS[tp]
    if get_origin(tp) is Union:
        return " or ".join(_type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"a list of {_type_name(get_args(tp)[0]).split(' ', 1)[-1]}s"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check(value, tp, path: str):
    """``value`` checked against the annotation ``tp`` (ints and numeric strings pass as floats); nested sections
    are built."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin is Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return check(value, options[0], path)
        for option in options:
            try:
                return check(value, option, path)
            except ValueError:
                continue
        raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, Section):
        return build(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return [check(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: expected a mapping, got {value!r}")
        return plain(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _number(value):  # PyYAML reads 1e-4 (no dot) as a string
        return float(value)
    if not ok:
        raise ValueError(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


@dataclass
class StageConfig(Section):
    """What every training stage has: the keys :class:`~anystory.training.loop.StageLoop` reads."""

    steps: int = 1000
    batch_size: int = 1
    lr: float = 1e-4
    ema: float = 0.0  # decay of an exponential moving average of the trained weights (0: none)
    gradient_accumulation: int = 1
    weight_decay: float = 0.0
    stop_after: Optional[int] = None  # stop at this step, checkpointed; a run without it resumes from there
