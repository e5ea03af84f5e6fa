"""Are two rebuilds of a miniature the same model? Every tensor of two exports, compared bit for bit.

    python -m benchmarks.rebuild_equality runs/miniature/export /path/to/other/export

A rebuild is deterministic by design (seeded data, seeded initialisation, RNG states in every checkpoint), so two
runs of ``python -m anystory.training --config ...`` must write the same weights, whether or not they were stopped
and resumed. This reads every ``.safetensors`` file of both folders and compares names, dtypes, shapes and bytes;
every ``.json`` file by its parsed content (key order and indentation are not the model), every other file byte for
byte - all but ``training_summary.json``, which records wall-clock times. It prints one line per file and exits 1
when anything differs, naming the first differing tensors or keys.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

TIMINGS = {"training_summary.json"}  # the only file allowed to differ: it records how long each stage took


def _files(root: str) -> set:
    out = set()
    for folder, _, names in os.walk(root):
        out.update(os.path.relpath(os.path.join(folder, n), root) for n in names)
    return {p for p in out if os.path.basename(p) not in TIMINGS}


def _tensor_differences(a: dict, b: dict) -> list:
    problems = [f"only in one: {name}" for name in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8)):
            problems.append(f"{name}: values differ (max |a-b| {(x.double() - y.double()).abs().max().item():.3g})")
    return problems


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def _json_differences(a, b, where: str = "") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        problems = [f"only in one: {where}{k}" for k in sorted(set(a) ^ set(b))]
        for k in sorted(set(a) & set(b)):
            problems += _json_differences(a[k], b[k], f"{where}{k}.")
        return problems
    return [] if a == b and type(a) is type(b) else [f"{where.rstrip('.') or 'value'}: {a!r} vs {b!r}"]


def compare(first: str, second: str) -> dict:
    """``{relative path: (tensor count or None, [problems])}`` for every file of either export."""
    files_a, files_b = _files(first), _files(second)
    report = {p: (None, ["missing from the second export" if p in files_a else "missing from the first export"])
              for p in sorted(files_a ^ files_b)}
    for path in sorted(files_a & files_b):
        pa, pb = os.path.join(first, path), os.path.join(second, path)
        if path.endswith(".safetensors"):
            a, b = load_file(pa), load_file(pb)
            report[path] = (len(a), _tensor_differences(a, b))
        elif path.endswith(".json"):
            report[path] = (None, _json_differences(_read_json(pa), _read_json(pb)))
        else:
            with open(pa, "rb") as fa, open(pb, "rb") as fb:
                report[path] = (None, [] if fa.read() == fb.read() else ["bytes differ"])
    return report


def summary(report: dict) -> str:
    lines = []
    for path, (count, problems) in sorted(report.items()):
        what = f"{count} tensors" if count is not None else "file"
        lines.append(f"{path}: {what}, " + ("equal" if not problems else f"{len(problems)} differ: "
                                               + "; ".join(problems[:3])))
    tensors = sum(c for c, _ in report.values() if c is not None)
    bad = sum(1 for _, p in report.values() if p)
    lines.append(f"{len(report)} files ({tensors} tensors): " + ("all equal" if not bad else f"{bad} differ"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    for root in (args.first, args.second):
        if not os.path.isdir(root):
            parser.error(f"{root} is not a folder (give two export folders)")
    report = compare(args.first, args.second)
    print(summary(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({p: {"tensors": c, "problems": pr} for p, (c, pr) in report.items()}, f, indent=1)
    return 1 if any(p for _, p in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
