"""DreamBench (DreamBooth's 30 subjects x 25 prompts), zero-shot: the single- and multi-subject lists.

Classes and prompt templates come from ``prompts_and_classes.txt``; the live subjects (cats and dogs, as in the
DreamBooth paper) use the "Live Subject Prompts", the others the "Object Prompts". Zero-shot prompts drop the
unique token: ``'a {0} {1} in the snow'.format('', 'dog')`` -> ``a dog in the snow``. Each list entry is checked
against that rule, so a list that does not match its templates fails loudly instead of scoring wrong prompts.

Multi-subject prompts (UNO's list) join two subjects: ``<prefix> c1 and <prefix> c2 <suffix>`` (``a red
backpack and a red stuffed animal``); when the first subject is live, its accessorization and property
prompts read ``<live prompt for c1>, next to it is a c2``.

Prompt types (DreamBooth): objects: 20 recontextualization + 5 property modification; live subjects:
10 recontextualization + 10 accessorization + 5 property modification.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Tuple

from .base import Benchmark, Entry, SubjectRef

LIST_PREFIX = "./dreambooth/dataset/"
LIVE_CLASSES = ("cat", "dog")
PROMPTS_PER_SUBJECT = 25
_TEMPLATE = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?\s*$", re.M)


def _squash(text: str) -> str:
    return " ".join(text.split())


def parse_prompts_and_classes(path: str) -> Tuple[Dict[str, str], List[str], List[str]]:
    """``(classes {subject: class}, object templates, live templates)`` from DreamBooth's text file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, sep, prompts = text.partition("Object Prompts")
    if not sep or "Live Subject Prompts" not in prompts:
        raise ValueError(f"{path}: expected 'Object Prompts' and 'Live Subject Prompts' sections")
    classes = {}
    for line in head.splitlines():
        line = line.strip()
        if "," in line and not line.startswith("subject_name"):
            subject, cls = (part.strip() for part in line.split(",", 1))
            classes[subject] = cls
    objects, live = (_TEMPLATE.findall(block) for block in prompts.split("Live Subject Prompts", 1))
    for name, templates in (("object", objects), ("live", live)):
        if len(templates) != PROMPTS_PER_SUBJECT:
            raise ValueError(f"{path}: {len(templates)} {name} prompt templates, expected {PROMPTS_PER_SUBJECT}")
    return classes, objects, live


def is_live(class_name: str) -> bool:
    return class_name in LIVE_CLASSES


def prompt_type(index: int, live: bool) -> str:
    if index >= 20:
        return "property modification"
    if live and index >= 10:
        return "accessorization"
    return "recontextualization"


def single_prompt(template: str, class_name: str) -> str:
    return _squash(template.format("", class_name))


def pair_prompt(template: str, index: int, class_1: str, class_2: str, first_live: bool) -> str:
    if first_live and index >= 10:
        return f"{single_prompt(template, class_1)}, next to it is a {class_2}"
    prefix, _, suffix = template.partition("{0} {1}")
    return _squash(f"{prefix}{class_1} and {prefix}{class_2}{suffix}")


class DreamBenchData:
    """The parsed folder: classes, templates and each subject's real photos."""

    def __init__(self, data_dir: str):
        self.data_dir = os.path.abspath(data_dir)
        self.classes, self.object_templates, self.live_templates = parse_prompts_and_classes(
            os.path.join(self.data_dir, "prompts_and_classes.txt"))
        self.photos = {}
        for subject in self.classes:
            photos = sorted(p for p in glob.glob(os.path.join(self.data_dir, subject, "*"))
                            if p.lower().endswith((".jpg", ".jpeg", ".png")))
            if not photos:
                raise ValueError(f"DreamBench subject '{subject}' has no photos in {self.data_dir}/{subject}")
            self.photos[subject] = tuple(photos)

    def templates(self, class_name: str) -> List[str]:
        return self.live_templates if is_live(class_name) else self.object_templates

    def subject(self, list_path: str, where: str) -> SubjectRef:
        if not list_path.startswith(LIST_PREFIX):
            raise ValueError(f"{where}: image path '{list_path}' does not start with '{LIST_PREFIX}'")
        rel = list_path[len(LIST_PREFIX):]
        name = rel.split("/", 1)[0]
        if name not in self.classes:
            raise ValueError(f"{where}: unknown subject '{name}' (not in prompts_and_classes.txt)")
        reference = os.path.join(self.data_dir, rel)
        if reference not in self.photos[name]:
            raise ValueError(f"{where}: reference photo {reference} not found")
        return SubjectRef(name, self.classes[name], reference, self.photos[name])

    def read_list(self, name: str) -> list:
        path = os.path.join(self.data_dir, "lists", name)
        with open(path, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e})") from None


def _match_template(data: DreamBenchData, prompt: str, subjects: Tuple[SubjectRef, ...], where: str) -> int:
    first = subjects[0]
    templates = data.templates(first.class_name)
    for i, template in enumerate(templates):
        if len(subjects) == 1:
            expected = single_prompt(template, first.class_name)
        else:
            expected = pair_prompt(template, i, first.class_name, subjects[1].class_name, is_live(first.class_name))
        if expected == prompt:
            return i
    raise ValueError(f"{where}: prompt '{prompt}' matches none of the "
                     f"{'live' if is_live(first.class_name) else 'object'} templates for {first.class_name}")


def _load(data_dir: str, list_name: str, bench: str, n_subjects: int) -> Benchmark:
    data = DreamBenchData(data_dir)
    entries = []
    seen = {}
    for index, item in enumerate(data.read_list(list_name)):
        where = f"{list_name} entry {index}"
        paths = item["image_paths"]
        if len(paths) != n_subjects:
            raise ValueError(f"{where}: {len(paths)} subjects, expected {n_subjects}")
        subjects = tuple(data.subject(p, where) for p in paths)
        t = _match_template(data, item["prompt"], subjects, where)
        key = "+".join(s.name for s in subjects)
        if (key, t) in seen:
            raise ValueError(f"{where}: duplicate of entry {seen[key, t]} ({key}, template {t})")
        seen[key, t] = index
        entries.append(Entry(entry_id=f"{key}-{t:02d}", index=index, prompt=item["prompt"], subjects=subjects,
                             prompt_type=prompt_type(t, is_live(subjects[0].class_name)), prompt_index=t))
    return Benchmark(bench, entries, data.data_dir, {"list": f"lists/{list_name}", "entries": str(len(entries))})


def load_dreambench(data_dir: str) -> Benchmark:
    """Single subject: 30 subjects x 25 prompts, one fixed reference per subject."""
    return _load(data_dir, "single_subject.json", "dreambench", 1)


def load_dreambench_multi(data_dir: str) -> Benchmark:
    """Multi subject: 30 fixed subject pairs x 25 prompts."""
    return _load(data_dir, "multi_subject.json", "dreambench-multi", 2)
