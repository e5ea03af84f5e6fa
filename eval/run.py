"""``python -m eval.run``: score personalization methods on subject benchmarks into pandas tables.

    python -m eval.run --bench dreambench --method anystory-sdxl --anystory-weights DIR --out runs/sdxl
    python -m eval.run --bench dreambench --method folder:/path/to/images --method real-images --subset 50
    python -m eval.run --bench dreambench --method anystory-miniature --out runs/miniature --resume
    python -m eval.run --bench dreambench --method folder:/path/to/uno_outputs --layout uno --out runs/uno
    python -m eval.run --compare runs/sdxl runs/uno --out runs/compare
    accelerate launch --multi_gpu --num_processes 8 -m eval.run --bench dreambench --method anystory-flux \
        --device cuda --out runs/flux

Two stages, each resumable after a crash or ``kill -9`` (``--resume``): generation writes each image
atomically; scoring writes atomic parquet parts and assembles them into ``rows.parquet``/``rows.csv`` (one row
per image and subject), ``per_method``, ``per_subject`` and ``per_prompt_type`` tables (parquet + CSV),
``report.md`` and ``chart.png``. ``run_config.json`` records the benchmark, protocol, methods, seeds, models and
versions. A metric whose model cannot be loaded is reported as not computed, with the reason; the others still
run; when none can, the run fails in one line naming what to install or which file to put where, keeping the
images. ``--device`` and the hub (``eval.offline``: off or unreachable, never retried) are settled before any
model loads. Under ``accelerate launch`` each process generates its share and the main process scores once
(``eval.distributed``). See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence

import pandas as pd

from anystory.cli_options import DEVICES, add_device, add_generation, add_seed, add_weights
from anystory.errors import NoMetricError, RunError

from .atomic import remove_stale_temporaries, write_json, write_with
from .data import DataIntegrityError, DataNotFoundError
from .distributed import Processes
from .generate import run_generation
from .loaders import BENCHMARKS, PEOPLE_BENCHMARKS, Benchmark, load_benchmark
from .methods import LAYOUTS, Method, MethodError, PipelineMethod, image_seed, make_method, preset_call
from .metrics import METRIC_NAMES, OPT_IN_METRICS, Metric, MetricSettings, build_metrics, load_metrics, what_to_do
from .metrics.openclip_embedder import ACTIVATIONS
from .offline import settle_hub
from .protocols import DEFAULT_PROTOCOL, PROTOCOLS, get_protocol
from .report import bar_chart, write_report
from .score import absent_images, assemble, expected_units, read_parts, score_units
from .tables import COUNT_COLUMNS, build_tables, markdown

CONFIG = "run_config.json"
SIGNATURE = os.path.join("scores", "signature.json")
FAILURES = "generation_failures.json"


@dataclass
class RunConfig:
    bench: str
    methods: Sequence[str]
    out: str
    images_per_prompt: int = 4
    subset: Optional[int] = None
    data_dir: Optional[str] = None
    device: str = "cpu"
    resume: bool = False
    seed: int = 0
    stage: str = "all"
    chunk_size: int = 16
    metrics: MetricSettings = field(default_factory=MetricSettings)
    protocol: str = DEFAULT_PROTOCOL
    layout: str = "ours"
    anystory_weights: Optional[str] = None
    base_model: Optional[str] = None
    steps: Optional[int] = None
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    progress: bool = True


@dataclass
class EvalResult:
    run_dir: str
    rows: Optional[pd.DataFrame]
    tables: Dict[str, pd.DataFrame]
    unavailable: Dict[str, str]
    generation: dict
    missing: Dict[str, dict] = field(default_factory=dict)


def check_device(device: str) -> None:
    """``cuda`` needs a GPU torch can use, checked before any model loads (not after minutes of loading it)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        raise RunError(f"--device {device}: torch {torch.__version__} ({build}) finds no usable NVIDIA GPU or driver "
                       "here; run with --device cpu")


def default_metric_names(bench: str) -> List[str]:
    """Face-ID only on benches of people: elsewhere the detector "finds" faces on dogs and teapots. The opt-in
    metrics (colour) only when named."""
    return [n for n in METRIC_NAMES if n not in OPT_IN_METRICS and (n != "face_id" or bench in PEOPLE_BENCHMARKS)]


def _identity(cfg: RunConfig) -> dict:
    """What must not change between a run and its resumption."""
    m = cfg.metrics
    return {"bench": cfg.bench, "methods": list(cfg.methods), "images_per_prompt": cfg.images_per_prompt,
            "subset": cfg.subset, "seed": cfg.seed, "metric_names": sorted(m.names), "clip_model": m.clip_model,
            "clip_pretrained": m.clip_pretrained, "dino_model": m.dino_model, "face_backend": m.face_backend,
            "clip_activation": m.clip_activation, "protocol": cfg.protocol, "layout": cfg.layout,
            "generation": {"steps": cfg.steps, "guidance": cfg.guidance, "height": cfg.height, "width": cfg.width,
                           "anystory_weights": cfg.anystory_weights, "base_model": cfg.base_model,
                           "presets": {spec: preset_call(spec) for spec in cfg.methods if preset_call(spec)}}}


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "open_clip", "timm", "cv2", "diffusers", "transformers", "pandas", "numpy"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:
            out[name] = "absent"
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out["anystory_commit"] = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                                                text=True, timeout=10).stdout.strip() or "unknown"
    except Exception:
        out["anystory_commit"] = "unknown"
    return out


class RunLock:
    """One process per run folder (``flock``: released by the kernel even after ``kill -9``)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".lock")
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise RunError(f"another eval process is working in {os.path.dirname(self.path)}") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _prepare_run_dir(cfg: RunConfig, bench: Benchmark) -> dict:
    path = os.path.join(cfg.out, CONFIG)
    identity = _identity(cfg)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if not cfg.resume:
            raise RunError(f"{cfg.out} already holds a run; pass --resume to continue it, or choose another --out "
                           "(nothing was changed)")
        changed = {k: (saved.get("identity", {}).get(k), v) for k, v in identity.items()
                   if saved.get("identity", {}).get(k) != v}
        if changed:
            listed = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise RunError(f"cannot resume {cfg.out} with different settings ({listed}); use a new --out")
        return saved
    config = {"identity": identity, "bench": cfg.bench, "data_dir": bench.data_dir, "entries": len(bench.entries),
              "subset_note": bench.info.get("subset", ""), "images_per_prompt": cfg.images_per_prompt,
              "seed": cfg.seed, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(),
              "argv": sys.argv, "metric_settings": asdict(cfg.metrics), "device": cfg.device,
              "protocol": get_protocol(cfg.protocol).describe()}
    return config


def _model_labels(metrics: Sequence[Metric]) -> Dict[str, str]:
    """Short model names for the tables' ``clip_model`` / ``dino_model`` / ``face_model`` columns."""
    column = {"clip_i": "clip_model", "clip_t": "clip_model", "dino": "dino_model", "face_id": "face_model"}
    return {column[m.name]: m.describe().get("label", m.describe().get("model")) for m in metrics
            if m.name in column}


def _settings_labels(cfg: RunConfig, metrics: Sequence[Metric], entries: int, total: int) -> Dict[str, object]:
    """The columns every table carries: what was run, under which protocol and scale, scored by which models."""
    protocol = get_protocol(cfg.protocol)
    return {"run": os.path.normpath(cfg.out), "bench": cfg.bench, "protocol": protocol.name,
            "scale": protocol.scale_label, "subset": f"{entries} of {total}" if entries < total else "all",
            "images_per_prompt": cfg.images_per_prompt, **_model_labels(metrics)}


def _missing_report(methods: Sequence[Method], units) -> Dict[str, dict]:
    """Per method with absent images: how many, of how many, the first; a method with *none* is an error."""
    absent = absent_images(units)
    report = {}
    for method in methods:
        expected = [u for u in units if u.method is method and not method.not_applicable(u.entry, u.sample)]
        missing = absent[method.name]
        if not missing:
            continue
        first = method.expected_path(missing[0].entry, missing[0].sample)
        if len(missing) == len(expected):
            raise RunError(f"{method.name}: all {len(expected)} expected images are missing; expected layout "
                           f"{method.expected_layout()}; first missing: {first} (`--list-entries` prints every "
                           "entry id and list index)")
        report[method.name] = {"count": len(missing), "expected": len(expected), "first": first}
    return report


def _merge_generation(per_process: Sequence[dict]) -> dict:
    merged = {}
    for summary in per_process:
        for name, s in summary.items():
            m = merged.setdefault(name, {"made": 0, "failed": {}, "made_by_process": []})
            m["made"] += s["made"]
            m["failed"].update(s["failed"])
            m["made_by_process"].append(s["made"])
    return merged


def _signature(metrics: Sequence[Metric], unavailable: Dict[str, str]) -> dict:
    return {"computed": {m.name: {k: v for k, v in m.describe().items() if k in ("model", "weights")}
                         for m in metrics}, "not_computed": sorted(unavailable)}


def _check_signature(run_dir: str, signature: dict) -> None:
    path = os.path.join(run_dir, SIGNATURE)
    if read_parts(run_dir).empty:
        write_json(path, signature)
        return
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != signature:
            raise RunError(f"the scores in {run_dir}/scores were computed with other metrics/models "
                           f"({saved}) than now ({signature}); use a new --out, or delete {run_dir}/scores to "
                           "rescore")


def _load_failures(run_dir: str) -> Dict[str, str]:
    path = os.path.join(run_dir, FAILURES)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run_eval(cfg: RunConfig, *, metrics: Optional[Sequence[Metric]] = None, benchmark: Optional[Benchmark] = None,
             methods: Optional[Sequence[Method]] = None) -> EvalResult:
    """Run (or resume) an evaluation. ``metrics`` / ``benchmark`` / ``methods`` override what ``cfg`` would build
    (tests pass randomly initialised models of the real architectures this way; the CLI never does).

    Launched on several processes, every process generates its share and returns without rows; the main
    process alone records the run, scores and writes the tables."""
    cfg = _checked(cfg)
    protocol = get_protocol(cfg.protocol)
    check_device(cfg.device)
    hub_note = settle_hub()
    if hub_note and cfg.progress:
        print(f"note: {hub_note}", file=sys.stderr)
    full = benchmark or load_benchmark(cfg.bench, cfg.data_dir)
    bench = full.subset(cfg.subset) if cfg.subset else full
    procs = Processes(cfg.device)
    if procs.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    with RunLock(cfg.out) if procs.is_main else contextlib.nullcontext():
        config, problem = {}, None
        if procs.is_main:
            try:
                config = _prepare_run_dir(cfg, bench)
                remove_stale_temporaries(cfg.out)
            except RunError as e:
                problem = str(e)
        problem = procs.from_main(problem)  # every process stops, or none does
        if problem:
            raise RunError(problem)
        call = {"num_inference_steps": cfg.steps, "guidance_scale": cfg.guidance, "height": cfg.height,
                "width": cfg.width}
        methods = list(methods) if methods is not None else [
            make_method(spec, cfg.out, device=procs.device(cfg.device), anystory_weights=cfg.anystory_weights,
                        base_model=cfg.base_model, call_kwargs=call, layout=cfg.layout) for spec in cfg.methods]
        names = [m.name for m in methods]
        if len(set(names)) != len(names):
            raise RunError(f"two methods share a name: {names}")
        if procs.is_main:
            config["methods"] = [m.describe() for m in methods]
            write_json(os.path.join(cfg.out, CONFIG), config)

        generation = _generate(cfg, methods, bench, procs, config) if cfg.stage in ("all", "generate") else {}
        if cfg.stage == "generate" or not procs.is_main:
            return EvalResult(cfg.out, None, {}, {}, generation)

        def seed_of(method, entry, k):
            return image_seed(cfg.seed, entry, k, cfg.images_per_prompt) if isinstance(method, PipelineMethod) \
                else None

        units = expected_units(methods, bench.entries, cfg.images_per_prompt, seed_of)
        missing = _missing_report(methods, units)
        requested = build_metrics(cfg.metrics) if metrics is None else list(metrics)
        usable, unavailable = load_metrics(requested)
        if "copy_paste" in cfg.metrics.names and metrics is None and not any(
                m.name.startswith("copy_paste") for m in usable):
            unavailable["copy_paste"] = "needs at least one of dino, clip_i, face_id computed"
        if not usable and (metrics is None or requested):
            config.update(scoring={"metrics": {}, "unavailable": unavailable}, hub=hub_note)
            write_json(os.path.join(cfg.out, CONFIG), config)
            raise NoMetricError(_no_metric_line(cfg, requested, unavailable))
        _check_signature(cfg.out, _signature(usable, unavailable))
        labels = _settings_labels(cfg, usable, len(bench.entries), len(full.entries))
        config.update(scoring={"metrics": {m.name: m.describe() for m in usable}, "unavailable": unavailable},
                      model_labels=_model_labels(usable), table_settings=labels, missing_images=missing,
                      requested_model_labels=_model_labels(requested))
        write_json(os.path.join(cfg.out, CONFIG), config)

        score_units(units, usable, cfg.out, cfg.chunk_size, _load_failures(cfg.out), cfg.progress, protocol)
        rows = assemble(cfg.out, units)
        columns = [c for m in usable for c in m.columns]
        for name, value in labels.items():
            rows[name] = value
        tables = build_tables(rows, columns, labels)
        _write_table(cfg.out, "rows", rows)
        for name, table in tables.items():
            _write_table(cfg.out, name, table)
        tables["rows"] = rows
        write_report(cfg.out, config, tables, columns)
        return EvalResult(cfg.out, rows, tables, unavailable, generation, missing)


def _checked(cfg: RunConfig) -> RunConfig:
    """The settings no model is needed to check, and the bench's default metrics filled in."""
    if cfg.stage not in ("all", "generate", "score"):
        raise ValueError(f"stage must be all, generate or score (got {cfg.stage!r})")
    if cfg.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be >= 1 (got {cfg.images_per_prompt})")
    if cfg.layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{cfg.layout}'; choose one of {', '.join(LAYOUTS)}")
    if cfg.metrics.names is None:
        cfg = replace(cfg, metrics=replace(cfg.metrics, names=default_metric_names(cfg.bench)))
    return cfg


def _generate(cfg: RunConfig, methods, bench, procs, config: dict) -> dict:
    """Every process makes its share of the images; the main process records failures and who made what."""
    mine, error = {}, None
    try:
        mine = run_generation(methods, bench.entries, cfg.images_per_prompt, cfg.seed, cfg.progress and procs.is_main,
                              owns=lambda e, k: procs.owns(e.index, k, cfg.images_per_prompt))
    except Exception as e:  # reported on every process, so none waits forever for the others
        if procs.world == 1:
            raise
        error = f"process {procs.rank}: {type(e).__name__}: {e}"
    gathered = procs.gather((mine, error))
    errors = [err for _, err in gathered if err]
    if errors:
        raise MethodError("; ".join(errors))
    generation = _merge_generation([summary for summary, _ in gathered])
    if procs.is_main:
        failures = _load_failures(cfg.out)
        for method_name, summary in generation.items():
            for key in list(failures):
                if key.startswith(method_name + "/"):
                    del failures[key]
            failures.update({f"{method_name}/{k}": v for k, v in summary["failed"].items()})
        write_json(os.path.join(cfg.out, FAILURES), failures)
        config["generation"] = {"processes": procs.world, **{
            name: {"made_by_process": g["made_by_process"]} for name, g in generation.items()}}
        write_json(os.path.join(cfg.out, CONFIG), config)
    return generation


def _no_metric_line(cfg: RunConfig, requested: Sequence[Metric], unavailable: Dict[str, str]) -> str:
    """The images are kept and nothing is scored, so the same command with ``--resume`` scores them later."""
    todo = what_to_do(requested, unavailable) or "choose metrics with --metrics " + ",".join(METRIC_NAMES)
    return (f"no metric could be computed ({', '.join(cfg.metrics.names) or 'none requested'}): {todo}; then rerun with "
            f"--resume{'' if cfg.metrics.weights_dir else ' --weights-dir <weights-dir>'} (images kept in {cfg.out})")


def _write_table(run_dir: str, name: str, table: pd.DataFrame) -> None:
    write_with(os.path.join(run_dir, f"{name}.parquet"), lambda tmp: table.to_parquet(tmp, index=False))
    write_with(os.path.join(run_dir, f"{name}.csv"), lambda tmp: table.to_csv(tmp, index=False))


RUN_COLUMNS = ["run", "bench", "protocol", "scale", "subset", "images_per_prompt"]
MUST_AGREE = ("bench", "protocol", "metric models")


def _run_settings(run_dir: str) -> dict:
    """What a finished run was: read from its ``run_config.json`` (``unknown`` where an old run lacks it)."""
    path = os.path.join(run_dir, CONFIG)
    config = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    labels = config.get("table_settings", {})
    return {"run": os.path.normpath(run_dir), "bench": config.get("bench", "unknown"),
            **{k: labels.get(k, "unknown") for k in ("protocol", "scale", "subset")},
            "images_per_prompt": config.get("images_per_prompt"), "metric models": config.get("model_labels", {})}


def _differences(settings: Sequence[dict]) -> List[str]:
    out = []
    for key in MUST_AGREE:
        if key == "metric models":  # a model column both runs have must name the same model
            columns = sorted({c for s in settings for c in s[key]})
            for column in columns:
                values = {s["run"]: s[key][column] for s in settings if column in s[key]}
                if len(set(values.values())) > 1:
                    out.append(f"{column}: " + ", ".join(f"{run} = {v}" for run, v in values.items()))
        elif len({s[key] for s in settings}) > 1:
            out.append(f"{key}: " + ", ".join(f"{s['run']} = {s[key]}" for s in settings))
    return out


def compare_runs(run_dirs: Sequence[str], force: bool = False) -> pd.DataFrame:
    """Every run's per-method table in one, each row led by its run's path, bench, protocol, subset and images
    per prompt. Runs of different benches, protocols or metric models are refused (naming the difference)
    unless ``force``: their numbers do not measure the same thing."""
    frames, settings = [], []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "per_method.parquet")
        if not os.path.isfile(path):
            raise RunError(f"{run_dir} has no per_method.parquet (not a finished run; try --resume there)")
        run = _run_settings(run_dir)
        frame = pd.read_parquet(path).drop(columns=RUN_COLUMNS, errors="ignore")
        for i, column in enumerate(RUN_COLUMNS):
            frame.insert(i, column, run[column])
        frames.append(frame)
        settings.append(run)
    differences = _differences(settings)
    if differences and not force:
        raise RunError("these runs do not measure the same thing - " + "; ".join(differences)
                       + " (pass --force to compare them anyway)")
    table = pd.concat(frames, ignore_index=True)
    for column in table.columns:
        if column in COUNT_COLUMNS + ["faces_found", "no_face", "images_per_prompt"] or column.endswith("_n"):
            table[column] = table[column].astype("Int64")
    return table


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=BENCHMARKS, help="benchmark to run")
    p.add_argument("--method", action="append", default=[],
                   help="anystory-sdxl | anystory-flux | anystory-miniature | folder:PATH | real-images | copy-reference "
                        "(repeatable)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--subset", type=int, default=None, help="score a fixed sample of N entries")
    p.add_argument("--out", default=None, help="run folder (default runs/<bench>)")
    add_device(p, "cpu", DEVICES)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--stage", default="all", choices=["all", "generate", "score"])
    p.add_argument("--data-dir", default=None, help="benchmark data folder (DreamBench: see docs/evaluation.md)")
    p.add_argument("--weights-dir", default=None, help="local copies of metric weights (layout: docs/evaluation.md)")
    p.add_argument("--metrics", default=None, help="comma-separated subset of " + ", ".join(METRIC_NAMES)
                   + " (default: all but colour; face_id only on benches of people; colour needs no weights: "
                     "docs/evaluation.md)")
    p.add_argument("--protocol", default=DEFAULT_PROTOCOL, choices=list(PROTOCOLS),
                   help="dreambooth: all real photos, [0, 1]; single-reference: the input reference, x100")
    p.add_argument("--layout", default="ours", choices=list(LAYOUTS),
                   help="file naming of folder: methods: ours <entry_id>/<k>.png, uno <index>_<k>.png")
    p.add_argument("--clip-model", default=MetricSettings.clip_model, help="open_clip model (e.g. ViT-L-14)")
    p.add_argument("--clip-pretrained", default=MetricSettings.clip_pretrained, help="open_clip tag or file")
    p.add_argument("--clip-activation", default="auto", choices=ACTIVATIONS,
                   help="auto: QuickGELU for OpenAI weights; needed for a checkpoint file whose name has no tag")
    p.add_argument("--dino-model", default=MetricSettings.dino_model, help="timm name, or vits16 / vits8")
    p.add_argument("--face-backend", default="auto", choices=["auto", "arcface", "sface"])
    p.add_argument("--batch-size", type=int, default=16)
    add_seed(p)
    add_weights(p, backbones="SDXL / FLUX (anystory-sdxl / anystory-flux)")
    add_generation(p)
    p.add_argument("--list-entries", action="store_true", help="print the benchmark's entries (CSV) and exit")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="join finished runs into one table")
    p.add_argument("--force", action="store_true", help="--compare runs of different benches/protocols/models")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.compare:
        try:
            table = compare_runs(args.compare, force=args.force)
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        with pd.option_context("display.width", 200, "display.max_columns", 40):
            print(table.to_string(index=False))
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            _write_table(args.out, "compare", table)
            columns = [c for c in table.columns if c in METRIC_NAMES or c.endswith("_ref") or
                       c.startswith("copy_paste_")]
            chart = table.assign(method=table["run"] + "/" + table["method"])
            bar_chart(chart, columns, os.path.join(args.out, "compare.png"))
            with open(os.path.join(args.out, "compare.md"), "w", encoding="utf-8") as f:
                f.write(f"# Comparison\n\n{markdown(table)}\n\n![scores](compare.png)\n")
            print(f"written {args.out}/compare.{{parquet,csv,md,png}}")
        return 0
    if not args.bench:
        p.error("--bench is required (or --compare RUN ...)")
    if args.list_entries:
        try:
            bench = load_benchmark(args.bench, args.data_dir)
            bench = bench.subset(args.subset) if args.subset else bench
        except (DataNotFoundError, FileNotFoundError, DataIntegrityError, ValueError) as e:  # as the run path
            print(f"error: {e}", file=sys.stderr)
            return 1
        pd.DataFrame([{"index": e.index, "entry_id": e.entry_id, "prompt": e.prompt, "prompt_type": e.prompt_type,
                       "subjects": ";".join(s.name for s in e.subjects),
                       "references": ";".join(s.reference for s in e.subjects)} for e in bench.entries]
                     ).to_csv(sys.stdout, index=False)
        return 0
    if not args.method:
        p.error("give at least one --method")
    names = None if args.metrics is None else [n.strip() for n in args.metrics.split(",") if n.strip()]
    settings = MetricSettings(names=names, clip_model=args.clip_model, clip_pretrained=args.clip_pretrained,
                              dino_model=args.dino_model, face_backend=args.face_backend, device=args.device,
                              weights_dir=args.weights_dir, batch_size=args.batch_size,
                              clip_activation=args.clip_activation)
    cfg = RunConfig(bench=args.bench, methods=args.method, out=args.out or os.path.join("runs", args.bench),
                    images_per_prompt=args.images_per_prompt, subset=args.subset, data_dir=args.data_dir,
                    device=args.device, resume=args.resume, seed=args.seed, stage=args.stage,
                    chunk_size=args.batch_size, metrics=settings, anystory_weights=args.anystory_weights,
                    base_model=args.base_model, steps=args.steps, guidance=args.guidance, height=args.height,
                    width=args.width, protocol=args.protocol, layout=args.layout)
    try:
        result = run_eval(cfg)
    except (DataNotFoundError, DataIntegrityError, FileNotFoundError, MethodError, RunError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, reason in result.unavailable.items():
        print(f"not computed: {name} - {reason}", file=sys.stderr)
    for name, m in result.missing.items():
        print(f"warning: {name}: {m['count']} of {m['expected']} images missing (first: {m['first']}); they are "
              "counted, not scored", file=sys.stderr)
    if result.rows is None:
        made = {name: g["made"] for name, g in result.generation.items()}
        print(f"generation done in {result.run_dir}: made {made}")
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 40, "display.float_format", "{:.4f}".format):
        print(result.tables["per_method"].to_string(index=False))
    print(f"report: {os.path.join(result.run_dir, 'report.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
