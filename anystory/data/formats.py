"""Training data on disk: one sample layout, read from a folder, WebDataset tar shards or parquet shards.

A sample is a target image with a caption and the instance mask of every subject in it, plus (paired data,
stage 1) a reference photo of each subject. Files of one sample share a key (the file name up to its first
dot), the WebDataset convention, so a folder and a tar shard hold the same names::

    <key>.png | .jpg | .jpeg | .webp   target image (RGB)
    <key>.json                        {"caption": "...", "generic_caption": "..." (optional),
                                       "subjects": [{"name": "..."}, ...] (optional)}
    <key>.mask0.png, .mask1.png ...   instance masks of the target, its size; nonzero = subject i (1-4 subjects)
    <key>.ref0.png | .jpg ...         optional: a separate reference photo of subject i (paired data, stage 1)
    <key>.refmask0.png ...            optional: its mask; without it the reference's alpha channel (else the
                                      whole photo) marks the subject, the pipeline's own rule

Without ``ref<i>`` (multi-subject data, stage 2) subject i's reference is cut from the target by its mask.
Overlapping masks are made disjoint (a later subject occludes an earlier one), as the router's ground truth
needs one class per pixel.

Parquet shards hold one row per sample: ``key`` (string), ``image`` (bytes), ``json`` (string), ``masks``
(list of PNG bytes), ``refs`` and ``refmasks`` (lists of bytes; empty bytes = absent). Shards of either kind
sit next to an ``index.json`` (written by :mod:`anystory.data.shards`) that lists every sample's key and
subject count, and for tar shards each member's byte range, so a reader fetches one sample with range reads:
shards stream from object storage through fsspec (``s3://``, ``gs://``, ``https://`` ...) as from a disk.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..errors import DataFormatError
from ..subjects import MAX_SUBJECTS, Subject

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
INDEX = "index.json"


@dataclass
class Record:
    """One training sample, decoded: what a training step needs and nothing format-specific."""

    key: str
    image: np.ndarray  # [H, W, 3] uint8
    masks: np.ndarray  # [N, H, W] bool, disjoint
    caption: str
    generic_caption: str
    references: List[Subject] = field(default_factory=list)  # one per subject, ready for prepare_subjects

    def routing_target(self) -> np.ndarray:
        """``[N+1, H, W]`` one-hot: subjects in order, background last (the router's ground truth)."""
        background = ~self.masks.any(axis=0)
        return np.concatenate([self.masks, background[None]]).astype(np.float32)


# ---- decoding ----------------------------------------------------------------------------------------------------
def split_name(name: str):
    """``"dir/abc.mask0.png"`` -> ``("abc", "mask0.png")`` (key up to the first dot of the base name)."""
    base = posixpath.basename(name)
    if "." not in base:
        return base, ""
    key, ext = base.split(".", 1)
    return key, ext.lower()


def _open(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as e:
        raise DataFormatError(f"{what}: not a readable image ({e})") from e


def _mask(data: bytes, what: str) -> np.ndarray:
    image = _open(data, what)
    arr = np.asarray(image.getchannel("A") if image.mode in ("RGBA", "LA") else image.convert("L"))
    return arr > 127


def _indexed(files: Dict[str, bytes], prefix: str, exts: Sequence[str]) -> Dict[int, bytes]:
    out = {}
    for ext, data in files.items():
        stem, _, suffix = ext.partition(".")
        if stem.startswith(prefix) and stem[len(prefix):].isdigit() and suffix in exts:
            out[int(stem[len(prefix):])] = data
    return out


def _numbered(found: Dict[int, bytes], what: str, key: str) -> List[bytes]:
    if sorted(found) != list(range(len(found))):
        raise DataFormatError(f"sample {key!r}: {what} files must be numbered 0..n-1, found {sorted(found)}")
    return [found[i] for i in range(len(found))]


def decode_sample(key: str, files: Dict[str, bytes], resolution: Optional[int] = None) -> Record:
    """Decode the files of one sample (extension -> bytes) into a :class:`Record`.

    ``resolution``: centre-crop the target (and its masks) to a square and resize it to this size; references
    are cut from the full-resolution image first. ``None`` keeps the image as it is.
    """
    images = [ext for ext in IMAGE_EXTS if ext in files]
    if len(images) != 1:
        raise DataFormatError(f"sample {key!r}: needs exactly one target image ({'/'.join(IMAGE_EXTS)}), "
                              f"found {images or 'none'}")
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError as e:
            raise DataFormatError(f"sample {key!r}: {key}.json is not JSON ({e})") from e
    elif "txt" in files:
        meta = {"caption": files["txt"].decode("utf-8").strip()}
    else:
        raise DataFormatError(f"sample {key!r}: no caption ({key}.json or {key}.txt)")
    caption = meta.get("caption")
    if not isinstance(caption, str):
        raise DataFormatError(f"sample {key!r}: 'caption' must be a string")
    target = _open(files[images[0]], f"sample {key!r} target image").convert("RGB")
    mask_bytes = _numbered(_indexed(files, "mask", ("png",)), "mask", key)
    if not 1 <= len(mask_bytes) <= MAX_SUBJECTS:
        raise DataFormatError(f"sample {key!r}: {len(mask_bytes)} instance masks; 1 to {MAX_SUBJECTS} are supported")
    decoded = [_mask(m, f"sample {key!r} mask{i}") for i, m in enumerate(mask_bytes)]
    for i, m in enumerate(decoded):
        if m.shape != (target.height, target.width):
            raise DataFormatError(f"sample {key!r}: mask{i} is {m.shape[1]}x{m.shape[0]}, the image "
                                  f"{target.width}x{target.height}; masks must have the image's size")
    masks = np.stack(decoded)
    for i in range(len(masks)):  # a later subject occludes an earlier one: one class per pixel
        masks[i] &= ~masks[i + 1:].any(axis=0)
    empty = [i for i, m in enumerate(masks) if not m.any()]
    if empty:
        raise DataFormatError(f"sample {key!r}: mask(s) {empty} are empty (after later masks occlude them)")
    names = [s.get("name", "") for s in meta.get("subjects", [])] + [""] * len(masks)
    refs = _indexed(files, "ref", IMAGE_EXTS)
    ref_masks = _indexed(files, "refmask", ("png",))
    if refs and sorted(refs) != list(range(len(masks))):
        raise DataFormatError(f"sample {key!r}: reference photos {sorted(refs)} do not match the "
                              f"{len(masks)} subjects (ref0..ref{len(masks) - 1})")
    references = []
    for i in range(len(masks)):
        if refs:
            photo = _open(refs[i], f"sample {key!r} ref{i}")
            mask = _mask_image(_mask(ref_masks[i], f"sample {key!r} refmask{i}")) if i in ref_masks else None
            references.append(Subject(photo, mask=mask, name=names[i]))
        else:
            references.append(Subject(target, mask=_mask_image(masks[i]), name=names[i]))
    image, masks = _fit(np.asarray(target), masks, resolution)
    return Record(key, image, masks, caption, meta.get("generic_caption") or caption, references)


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255, "L")


def _fit(image: np.ndarray, masks: np.ndarray, resolution: Optional[int]):
    h, w = image.shape[:2]
    if resolution is None or (h == w == resolution):
        return image, masks
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    size = (resolution, resolution)
    crop = Image.fromarray(image[top:top + side, left:left + side]).resize(size, Image.BICUBIC)
    resized = [np.asarray(Image.fromarray(m[top:top + side, left:left + side]).resize(size, Image.NEAREST))
               for m in masks]
    return np.asarray(crop), np.stack(resized).astype(bool)


def encode_record_files(image: np.ndarray, masks: np.ndarray, caption: str, generic_caption: str = "",
                        names: Sequence[str] = (), references: Sequence[Image.Image] = ()) -> Dict[str, bytes]:
    """The layout's files (extension -> bytes) for one sample; PNG throughout, so nothing is lost."""
    def png(img: Image.Image) -> bytes:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    meta = {"caption": caption}
    if generic_caption:
        meta["generic_caption"] = generic_caption
    if names:
        meta["subjects"] = [{"name": n} for n in names]
    files = {"png": png(Image.fromarray(np.asarray(image, np.uint8))),
             "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
    for i, m in enumerate(masks):
        files[f"mask{i}.png"] = png(Image.fromarray(np.asarray(m, bool).astype(np.uint8) * 255))
    for i, ref in enumerate(references):
        files[f"ref{i}.png"] = png(ref)
    return files


# ---- datasets ----------------------------------------------------------------------------------------------------
def _fs_open(url: str):
    if "://" in url and not url.startswith("file://"):
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url[len("file://"):] if url.startswith("file://") else url, "rb")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name if "://" in root else os.path.join(root, name)


class Dataset:
    """Samples addressed by position within their subject count (a training batch shares one count).

    ``Dataset.open(path)`` reads a folder in the layout, or shards with their ``index.json`` (a local path or
    any fsspec URL). ``by_count[n]`` lists the sample keys with ``n`` subjects, in key order.
    """

    def __init__(self, root: str, entries: List[dict], kind: str, resolution: Optional[int] = None):
        self.root, self.entries, self.kind, self.resolution = root, entries, kind, resolution
        self.by_count: Dict[int, List[int]] = {}
        for i, e in enumerate(entries):
            self.by_count.setdefault(int(e["subjects"]), []).append(i)
        self._cache: "OrderedDict[str, object]" = OrderedDict()

    @classmethod
    def open(cls, path: str, resolution: Optional[int] = None) -> "Dataset":
        local = "://" not in path or path.startswith("file://")
        if local and os.path.isdir(path) and not os.path.isfile(os.path.join(path, INDEX)):
            return cls(path, _scan_folder(path), "folder", resolution)
        try:
            with _fs_open(_join(path, INDEX)) as f:
                index = json.load(f)
        except FileNotFoundError as e:
            raise DataFormatError(f"{path}: neither a sample folder nor shards with {INDEX} "
                                  f"(python -m anystory.data.shards pack writes them)") from e
        entries = [dict(e, shard=s["name"]) for s in index["shards"] for e in s["samples"]]
        return cls(path, entries, index["format"], resolution)

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> Dict[int, int]:
        return {n: len(v) for n, v in sorted(self.by_count.items())}

    def record(self, i: int) -> Record:
        entry = self.entries[i]
        return decode_sample(entry["key"], self._files(entry), self.resolution)

    def record_with(self, count: int, position: int) -> Record:
        """Sample ``position`` (modulo their number) among those with ``count`` subjects."""
        bucket = self.by_count.get(count)
        if not bucket:
            raise DataFormatError(f"{self.root}: no sample has {count} subject(s) (counts: {self.counts()}); "
                                  f"give {count} subjects a weight of 0 in the stage's 'subjects'")
        return self.record(bucket[position % len(bucket)])

    # one reader per kind
    def _files(self, entry: dict) -> Dict[str, bytes]:
        if self.kind == "folder":
            out = {}
            for ext in entry["files"]:
                with open(os.path.join(self.root, f"{entry['key']}.{ext}"), "rb") as f:
                    out[ext] = f.read()
            return out
        if self.kind == "tar":
            with _fs_open(_join(self.root, entry["shard"])) as f:
                out = {}
                for ext, (offset, size) in entry["members"].items():
                    f.seek(offset)
                    out[ext] = f.read(size)
                return out
        if self.kind == "parquet":
            row = self._parquet_row(entry["shard"], int(entry["row"]))
            files = {"png" if row["image"][:8] == b"\x89PNG\r\n\x1a\n" else "jpg": row["image"],
                     "json": row["json"].encode("utf-8")}
            files.update({f"mask{i}.png": m for i, m in enumerate(row["masks"])})
            files.update({f"ref{i}.png": r for i, r in enumerate(row["refs"] or []) if r})
            files.update({f"refmask{i}.png": r for i, r in enumerate(row["refmasks"] or []) if r})
            return files
        raise DataFormatError(f"{self.root}: unknown shard format {self.kind!r} in {INDEX}")

    def _parquet_row(self, shard: str, row: int) -> dict:
        import pyarrow.parquet as pq

        file = self._cached(("file", shard), lambda: pq.ParquetFile(_fs_open(_join(self.root, shard))))
        start = 0
        for g in range(file.num_row_groups):  # read (and keep) only the row group that holds the row
            n = file.metadata.row_group(g).num_rows
            if row < start + n:
                table = self._cached(("group", shard, g), lambda: file.read_row_group(g).to_pylist())
                return table[row - start]
            start += n
        raise DataFormatError(f"{self.root}/{shard}: row {row} out of range")

    def _cached(self, key, make, keep: int = 4):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = make()
        while len(self._cache) > keep:
            self._cache.popitem(last=False)
        return value


def _scan_folder(root: str) -> List[dict]:
    groups: Dict[str, List[str]] = {}
    for name in sorted(os.listdir(root)):
        if name.startswith(".") or not os.path.isfile(os.path.join(root, name)) or name == INDEX:
            continue
        key, ext = split_name(name)
        groups.setdefault(key, []).append(ext)
    entries = []
    for key, exts in sorted(groups.items()):
        subjects = sum(1 for e in exts if e.startswith("mask") and e.endswith(".png"))
        entries.append({"key": key, "subjects": subjects, "files": exts})
    if not entries:
        raise DataFormatError(f"{root}: no samples (see anystory/data/formats.py for the layout)")
    return entries
