"""Prepare training data: a folder of images with captions -> shards for both training stages.

    python -m anystory.data.prepare photos/ data/flux --format tar              # masks given, else the matting model
    python -m anystory.data.prepare photos/ data/flux --masks matting --matting-model ZhengPeng7/BiRefNet

Input, one sample per key (the file name up to its first dot)::

    <key>.jpg | .png | .jpeg | .webp   the image
    <key>.txt  or  <key>.json          its caption (a json's "caption"; "generic_caption" and "subjects" kept)
    <key>.mask0.png, .mask1.png ...    optional: instance masks (nonzero = subject i)
    <key>.ref0.png ...                 optional: a separate reference photo of subject i (paired data)

Masks (``--masks``): ``given`` uses the mask files (a sample without them is an error naming it), ``matting``
runs the matting model (BiRefNet, the authors' choice) on every image, ``auto`` (default) runs it only where no
mask is given. The matting model separates foreground from background, not one subject from another: its
foreground is split into connected regions, the largest ``--max-subjects`` of at least ``--min-area`` of the
image become the subjects (two touching subjects stay one; give masks for those).

Output: ``<out>/stage1`` (every sample: the subject path, references cut from the image by the masks unless
``ref<i>`` is given) and ``<out>/stage2`` (samples with two or more subjects: the router), each in the layout of
:mod:`anystory.data.formats` with its ``index.json``, ready for ``data.stage1`` / ``data.stage2`` of a training
config (SDXL stages 1-2, FLUX stages flux_subject / flux_router).
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from ..cli_options import add_device, add_shard_options
from ..hub import BIREFNET
from ..subjects import MAX_SUBJECTS, Segmenter
from .formats import IMAGE_EXTS, DataFormatError, encode_record_files, split_name
from .shards import write_dataset

MASK_MODES = ("auto", "given", "matting")


def _groups(src: str) -> Dict[str, Dict[str, str]]:
    groups: Dict[str, Dict[str, str]] = {}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        key, ext = split_name(name)
        groups.setdefault(key, {})[ext.lower()] = path
    if not groups:
        raise DataFormatError(f"{src}: no files")
    return groups


def _caption(key: str, files: Dict[str, str]) -> dict:
    if "json" in files:
        with open(files["json"]) as f:
            meta = json.load(f)
        if not isinstance(meta, dict) or not str(meta.get("caption", "")).strip():
            raise DataFormatError(f"{key}: {files['json']} has no 'caption'")
        return meta
    if "txt" in files:
        with open(files["txt"], encoding="utf-8") as f:
            caption = f.read().strip()
        if caption:
            return {"caption": caption}
    raise DataFormatError(f"{key}: no caption (give {key}.txt or {key}.json with a 'caption')")


def _numbered(files: Dict[str, str], prefix: str) -> List[str]:
    found = {}
    for ext, path in files.items():
        stem = ext.split(".", 1)[0]
        if stem.startswith(prefix) and stem[len(prefix):].isdigit() and "." in ext:
            found[int(stem[len(prefix):])] = path
    return [found[i] for i in sorted(found)]


def instance_masks(foreground: np.ndarray, max_subjects: int, min_area: float) -> np.ndarray:
    """``[N, H, W]`` bool: the foreground's connected regions (8-connected) of at least ``min_area`` of the image,
    largest first, at most ``max_subjects``."""
    from scipy import ndimage

    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_area * foreground.size]
    return np.stack([labels == i for i in keep[:max_subjects]]) if keep else np.zeros((0, *foreground.shape), bool)


def _given_masks(key: str, paths: List[str], size: Tuple[int, int]) -> np.ndarray:
    masks = []
    for path in paths:
        m = np.asarray(Image.open(path).convert("L")) > 0
        if m.shape != size:
            raise DataFormatError(f"{key}: mask {os.path.basename(path)} is {m.shape[::-1]}, the image {size[::-1]}")
        masks.append(m)
    return np.stack(masks)


def prepared_samples(src: str, segmenter: Optional[Segmenter], masks: str = "auto", max_subjects: int = MAX_SUBJECTS,
                     min_area: float = 0.01) -> Iterator[Tuple[str, Dict[str, bytes], int]]:
    """``(key, files, subjects)`` of every sample of ``src`` in the training layout, in key order."""
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    for key, files in _groups(src).items():
        image_ext = next((e for e in IMAGE_EXTS if e in files), None)
        if image_ext is None:
            raise DataFormatError(f"{key}: no image ({', '.join('.' + e for e in IMAGE_EXTS)})")
        meta = _caption(key, files)
        image = Image.open(files[image_ext]).convert("RGB")
        pixels = np.asarray(image)
        given = _numbered(files, "mask")
        if given and masks != "matting":
            found = _given_masks(key, given, pixels.shape[:2])
        elif masks == "given":
            raise DataFormatError(f"{key}: no mask files ({key}.mask0.png ...) and --masks given")
        else:
            if segmenter is None:
                raise ValueError("a sample needs the matting model, and none is loaded")
            found = instance_masks(np.asarray(segmenter(image), bool), max_subjects, min_area)
        found = found[:max_subjects]
        for i in range(len(found)):  # later subjects occlude earlier ones, as the layout's reader does
            found[i] &= ~found[i + 1:].any(axis=0)
        if not len(found) or not all(m.any() for m in found):
            raise DataFormatError(f"{key}: no subject found (an empty mask); give masks for it or leave it out")
        refs = [Image.open(p) for p in _numbered(files, "ref")]
        names = [s.get("name", "") for s in meta.get("subjects", [])][:len(found)]
        yield key, encode_record_files(pixels, found, meta["caption"], meta.get("generic_caption", ""),
                                       names if all(names) and len(names) == len(found) else (),
                                       refs[:len(found)]), len(found)


def prepare(src: str, out: str, segmenter: Optional[Segmenter] = None, masks: str = "auto", fmt: str = "tar",
            per_shard: int = 1000, max_subjects: int = MAX_SUBJECTS, min_area: float = 0.01) -> dict:
    """Write ``<out>/stage1`` (every sample) and ``<out>/stage2`` (two or more subjects); returns the counts."""
    samples = list(prepared_samples(src, segmenter, masks, max_subjects, min_area))
    write_dataset(iter(samples), os.path.join(out, "stage1"), fmt, per_shard)
    several = [s for s in samples if s[2] >= 2]
    if several:
        write_dataset(iter(several), os.path.join(out, "stage2"), fmt, per_shard)
    counts = {"stage1": len(samples), "stage2": len(several)}
    with open(os.path.join(out, "prepare.json"), "w") as f:
        json.dump({"source": os.path.abspath(src), "masks": masks, **counts}, f, indent=1)
    return counts


def load_matting(model_id: str, device: str = "cpu") -> Segmenter:
    """BiRefNet by hub id or folder; absent is an error (data is never prepared with a stand-in)."""
    from ..matting import BiRefNetSegmenter, load_birefnet

    try:
        return BiRefNetSegmenter(load_birefnet(model_id, device), model_id=model_id)
    except Exception as e:
        raise SystemExit(f"error: the matting model {model_id!r} could not be loaded ({type(e).__name__}: {e}); "
                         f"give masks ({{key}}.mask0.png ...) with --masks given, or a local copy "
                         f"with --matting-model") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anystory.data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of images with captions (and optional masks)")
    p.add_argument("out", help="output folder: <out>/stage1, <out>/stage2")
    p.add_argument("--masks", choices=MASK_MODES, default="auto")
    p.add_argument("--matting-model", default=BIREFNET)
    add_device(p, "cpu")
    add_shard_options(p)
    p.add_argument("--max-subjects", type=int, default=MAX_SUBJECTS)
    p.add_argument("--min-area", type=float, default=0.01, help="smallest subject, as a share of the image")
    args = p.parse_args(argv)
    needs = args.masks == "matting" or (args.masks == "auto" and any(
        not _numbered(files, "mask") for files in _groups(args.src).values()))
    segmenter = load_matting(args.matting_model, args.device) if needs else None
    counts = prepare(args.src, args.out, segmenter, args.masks, args.format, args.per_shard, args.max_subjects,
                     args.min_area)
    print(f"wrote {counts['stage1']} samples to {args.out}/stage1 and {counts['stage2']} (2+ subjects) to "
          f"{args.out}/stage2 ({args.format})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
