"""Write training data as shards: a sample folder packed into WebDataset tars or parquet, or the synthetic world.

    python -m anystory.data.shards pack my_folder shards/ --format tar --per-shard 1000
    python -m anystory.data.shards synthetic --config configs/miniature.yaml --stage stage1 shards/stage1 --format tar

The layout is :mod:`anystory.data.formats`'. ``pack`` keeps the folder's key order and writes ``index.json``
(every sample's key and subject count; for tars each member's byte range). ``synthetic`` writes, for every
subject count the stage trains with, the very samples the in-memory world gives the trainer, in its order, so
a config pointing ``data.<stage>`` at them trains on identical batches (``tests/training/test_training_data.py``).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from typing import Dict, Iterable, Iterator, Tuple

from ..cli_options import add_config, add_shard_options
from .formats import INDEX, Dataset, encode_record_files

Files = Dict[str, bytes]
FORMATS = ("tar", "parquet", "folder")


def folder_samples(root: str) -> Iterator[Tuple[str, Files, int]]:
    """(key, files, subject count) of every sample of a folder, in key order; each one is decoded once to check it."""
    data = Dataset.open(root)
    for i, entry in enumerate(data.entries):
        data.record(i)  # a bad sample fails here, named, before any shard is written
        yield entry["key"], data._files(entry), int(entry["subjects"])


def write_dataset(samples: Iterable[Tuple[str, Files, int]], out: str, fmt: str = "tar", per_shard: int = 1000) -> dict:
    """Write ``(key, files, subjects)`` samples to ``out`` as shards + ``index.json`` (or a plain folder)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    os.makedirs(out, exist_ok=True)
    shards, batch = [], []

    def flush():
        if batch:
            name = f"{len(shards):05d}.{fmt}"
            writer = _write_tar if fmt == "tar" else _write_parquet
            shards.append({"name": name, "samples": writer(os.path.join(out, name), batch)})
            batch.clear()

    count = 0
    for key, files, subjects in samples:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        count += 1
        if fmt == "folder":
            for ext, data in files.items():
                with open(os.path.join(out, f"{key}.{ext}"), "wb") as f:
                    f.write(data)
            continue
        batch.append((key, files, subjects))
        if len(batch) >= per_shard:
            flush()
    flush()
    if fmt == "folder":
        return {"format": "folder", "samples": count}
    index = {"format": fmt, "shards": shards}
    tmp = os.path.join(out, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f)
    os.replace(tmp, os.path.join(out, INDEX))
    return index


def _write_tar(path: str, samples) -> list:
    entries = []
    with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files, subjects in samples:
            members = {}
            for ext in sorted(files):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(files[ext]), 0o644, 0
                header = len(info.tobuf(tar.format, tar.encoding, tar.errors))
                members[ext] = [tar.offset + header, info.size]  # where the member's bytes start
                tar.addfile(info, io.BytesIO(files[ext]))
            entries.append({"key": key, "subjects": subjects, "members": members})
    os.replace(path + ".tmp", path)
    return entries


def _write_parquet(path: str, samples) -> list:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def numbered(files: Files, prefix: str, count: int) -> list:
        out = []
        for i in range(count):
            hit = [v for k, v in files.items() if k.split(".", 1)[0] == f"{prefix}{i}"]
            out.append(hit[0] if hit else b"")
        return out

    rows = {"key": [], "image": [], "json": [], "masks": [], "refs": [], "refmasks": []}
    entries = []
    for row, (key, files, subjects) in enumerate(samples):
        image = [files[e] for e in ("png", "jpg", "jpeg", "webp") if e in files]
        rows["key"].append(key)
        rows["image"].append(image[0] if image else b"")
        rows["json"].append(files["json"].decode("utf-8") if "json" in files
                            else json.dumps({"caption": files.get("txt", b"").decode("utf-8").strip()}))
        rows["masks"].append(numbered(files, "mask", subjects))
        has_refs = any(k.startswith("ref") and not k.startswith("refmask") for k in files)
        rows["refs"].append(numbered(files, "ref", subjects) if has_refs else [])
        rows["refmasks"].append(numbered(files, "refmask", subjects) if has_refs else [])
        entries.append({"key": key, "subjects": subjects, "row": row})
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("json", pa.string()),
                        ("masks", pa.list_(pa.binary())), ("refs", pa.list_(pa.binary())),
                        ("refmasks", pa.list_(pa.binary()))])
    pq.write_table(pa.table(rows, schema=schema), path + ".tmp", row_group_size=64)
    os.replace(path + ".tmp", path)
    return entries


def synthetic_samples(cfg: dict, stage: str, samples_per_count: int) -> Iterator[Tuple[str, Files, int]]:
    """The world's samples for ``stage``: for each subject count it trains with, positions 0..n-1 in order."""
    from ..training.data import SyntheticSource, world_for

    source = SyntheticSource(world_for(cfg))
    counts = [n + 1 for n, w in enumerate(cfg[stage]["subjects"]) if w > 0]
    for count in counts:
        for position in range(samples_per_count):
            sample = source.sample(stage, position, count)
            scene = sample.scene
            files = encode_record_files(scene.image, scene.masks, scene.caption, scene.generic_caption,
                                        [p.identity.name for p in scene.placements],
                                        [r.image for r in sample.references])
            yield f"n{count}-{position:08d}", files, count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anystory.data.shards", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="a sample folder -> shards")
    pack.add_argument("src")
    pack.add_argument("out")
    syn = sub.add_parser("synthetic", help="the synthetic world's training samples of one stage -> shards")
    syn.add_argument("out")
    add_config(syn)
    syn.add_argument("--stage", choices=("stage1", "stage2"), required=True)
    syn.add_argument("--samples-per-count", type=int, default=None,
                     help="default: steps x batch x processes x accumulation of the stage (one pass, no wrap-around)")
    syn.add_argument("--processes", type=int, default=1)
    for q in (pack, syn):
        add_shard_options(q)
    args = p.parse_args(argv)
    if args.command == "pack":
        samples = folder_samples(args.src)
    else:
        from ..training.config import load_config

        cfg = load_config(args.config)
        scfg = cfg[args.stage]
        n = args.samples_per_count or (int(scfg["steps"]) * int(scfg["batch_size"]) * args.processes
                                       * int(scfg.get("gradient_accumulation", 1)))
        samples = synthetic_samples(cfg, args.stage, n)
    index = write_dataset(samples, args.out, args.format, args.per_shard)
    total = index.get("samples") or sum(len(s["samples"]) for s in index["shards"])
    print(f"wrote {total} samples to {args.out} ({args.format})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
