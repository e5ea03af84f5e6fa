"""``faces``: a folder of people's photos, for identity preservation (face-ID).

Layout::

    FACES_DIR/
      prompts.txt          optional; one prompt per line, optionally "type | prompt"; '#' starts a comment
      <identity>/01.jpg    the first photo in sorted order is the reference given to the method;
      <identity>/02.jpg    all photos of the identity are its comparison set (as DreamBench's real photos)

Without ``prompts.txt`` the default prompts below are used. Every identity gets every prompt.
"""
from __future__ import annotations

import os
from typing import List, Tuple

from .base import Benchmark, Entry, SubjectRef

ENV_VAR = "ANYSTORY_FACES_DIR"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
DEFAULT_PROMPTS: Tuple[Tuple[str, str], ...] = (
    ("recontextualization", "a photo of a person in the snow"),
    ("recontextualization", "a photo of a person on the beach"),
    ("recontextualization", "a photo of a person in a busy city street at night"),
    ("recontextualization", "a photo of a person in a forest"),
    ("accessorization", "a photo of a person wearing a red hat"),
    ("accessorization", "a photo of a person wearing sunglasses"),
    ("accessorization", "a photo of a person in a chef outfit"),
    ("style", "an oil painting of a person"),
    ("style", "a pencil sketch of a person"),
    ("style", "a person as a cartoon character"),
)


def read_prompts(path: str) -> List[Tuple[str, str]]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            kind, sep, prompt = line.partition("|")
            prompts.append((kind.strip(), prompt.strip()) if sep else ("prompt", line))
            if not prompts[-1][1]:
                raise ValueError(f"{path}:{n}: empty prompt")
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def load_faces(data_dir: str) -> Benchmark:
    data_dir = os.path.abspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"faces folder not found: {data_dir}. Pass --data-dir (or set {ENV_VAR}) to a "
                                "folder of <identity>/NN.jpg photos (see eval/loaders/faces.py)")
    prompt_file = os.path.join(data_dir, "prompts.txt")
    prompts = read_prompts(prompt_file) if os.path.isfile(prompt_file) else list(DEFAULT_PROMPTS)
    identities = []
    for name in sorted(os.listdir(data_dir)):
        folder = os.path.join(data_dir, name)
        if not os.path.isdir(folder) or name.startswith("."):
            continue
        photos = tuple(sorted(os.path.join(folder, p) for p in os.listdir(folder)
                              if p.lower().endswith(IMAGE_EXTENSIONS)))
        if photos:
            identities.append(SubjectRef(name, "person", photos[0], photos))
    if not identities:
        raise FileNotFoundError(f"{data_dir} holds no <identity>/<photo> folders (see eval/loaders/faces.py)")
    entries = []
    for subject in identities:
        for i, (kind, prompt) in enumerate(prompts):
            entries.append(Entry(f"{subject.name}-{i:02d}", len(entries), prompt, (subject,), kind, i))
    return Benchmark("faces", entries, data_dir, {"identities": str(len(identities)), "prompts": str(len(prompts))})
