"""The harness end to end on real photos: DreamBench through ``folder:``, faces, multi-subject regions, bad input,
the offline CLI (absent weights reported), and ``--compare``. CLIP and DINO here are randomly initialised models
of the real architectures, so the scores check plumbing and identities, not quality."""
import json
import math
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from helpers import eval_data as support
from eval.loaders import load_benchmark
from helpers import DREAMBENCH
from eval.run import RunConfig, RunError, compare_runs, run_eval

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMBEDDING_REF_COLUMNS = ["clip_i_ref", "dino_ref"]


@pytest.fixture(scope="module")
def dreambench_run(tmp_path_factory):
    if not os.path.isdir(DREAMBENCH):
        pytest.skip(f"DreamBench data not found at {DREAMBENCH}")
    tmp = tmp_path_factory.mktemp("eval_run")
    bench = load_benchmark("dreambench", DREAMBENCH).subset(3)
    folder = support.reference_folder(bench, str(tmp / "method"))
    broken, gone = bench.entries[1].entry_id, bench.entries[2].entry_id
    with open(os.path.join(folder, broken, "0.jpg"), "wb") as f:
        f.write(b"not a jpeg")
    os.unlink(os.path.join(folder, gone, "0.jpg"))
    cfg = RunConfig(bench="dreambench", methods=[f"folder:{folder}"], out=str(tmp / "run"), images_per_prompt=1,
                    subset=3, data_dir=DREAMBENCH, chunk_size=8, progress=False)
    from eval.methods import FolderMethod

    result = run_eval(cfg, metrics=support.metrics(), methods=[FolderMethod(folder, name="copy-by-folder")])
    return result, bench, broken, gone, cfg


def test_end_to_end_tables(dreambench_run):
    result, bench, broken, gone, cfg = dreambench_run
    rows = result.rows
    assert len(rows) == 3 and list(rows["entry_id"]) == [e.entry_id for e in bench.entries]
    for column in ["method", "entry_id", "sample", "subject", "prompt", "prompt_type", "status", "region_source",
                   "clip_i", "clip_i_ref", "clip_t", "dino", "dino_ref", "face_id", "face_id_ref", "face_found",
                   "copy_paste_dino", "copy_paste_clip_i", "clip_model", "dino_model", "face_model"]:
        assert column in rows.columns, column
    assert set(rows["clip_model"]) == {"ViT-B-32 RANDOM-INIT"} and set(rows["face_model"]) == {"SFace"}
    per_method = result.tables["per_method"]
    assert list(per_method["method"]) == ["copy-by-folder"]
    assert per_method.loc[0, ["images", "scored", "missing", "unreadable"]].tolist() == [3, 1, 1, 1]
    assert len(result.tables["per_subject"]) == 3
    assert set(result.tables["per_prompt_type"]["prompt_type"]) <= {"recontextualization", "accessorization",
                                                                    "property modification"}
    for name in ("rows", "per_method", "per_subject", "per_prompt_type"):
        on_disk = pd.read_parquet(os.path.join(result.run_dir, f"{name}.parquet"))
        assert len(on_disk) == len(result.tables[name])
        assert os.path.isfile(os.path.join(result.run_dir, f"{name}.csv"))
    report = open(os.path.join(result.run_dir, "report.md")).read()
    assert "WARNING" in report and "RANDOM INIT" in report and "Copy-paste score" in report
    assert os.path.getsize(os.path.join(result.run_dir, "chart.png")) > 1000
    config = json.load(open(os.path.join(result.run_dir, "run_config.json")))
    assert config["versions"]["torch"] and config["scoring"]["metrics"]["dino"]["weights"].startswith("RANDOM")


def test_image_against_itself_scores_one(dreambench_run):
    result, *_ = dreambench_run
    ok = result.rows[result.rows["status"] == "ok"]
    assert len(ok) == 1
    for column in EMBEDDING_REF_COLUMNS:
        assert ok[column].iloc[0] == pytest.approx(1.0, abs=1e-5), column


def test_bad_images_are_marked_and_the_run_goes_on(dreambench_run):
    result, bench, broken, gone, _ = dreambench_run
    rows = result.rows.set_index("entry_id")
    assert rows.loc[broken, "status"].startswith("unreadable: ")
    assert rows.loc[gone, "status"] == "missing"
    for entry_id in (broken, gone):
        assert math.isnan(float(rows.loc[entry_id, "dino"])) and rows.loc[entry_id, "face_found"] is None


def test_existing_run_is_never_overwritten(dreambench_run):
    result, bench, _, _, cfg = dreambench_run
    before = open(os.path.join(result.run_dir, "rows.csv")).read()
    with pytest.raises(RunError, match="--resume"):
        run_eval(cfg, metrics=support.metrics())
    changed = RunConfig(**dict(cfg.__dict__, resume=True, images_per_prompt=2))
    with pytest.raises(RunError, match="images_per_prompt: was 1, now 2"):
        run_eval(changed, metrics=support.metrics())
    assert open(os.path.join(result.run_dir, "rows.csv")).read() == before


def test_faces_benchmark_face_id(tmp_path):
    data = support.faces_folder(str(tmp_path / "faces"))
    bench = load_benchmark("faces", data)
    folder = support.reference_folder(bench, str(tmp_path / "method"))
    cfg = RunConfig(bench="faces", methods=[f"folder:{folder}", "real-images"], out=str(tmp_path / "run"),
                    images_per_prompt=1, progress=False)
    result = run_eval(cfg, metrics=support.metrics(clip=False, dino=False), benchmark=bench)
    rows = result.rows
    assert len(rows) == 2 * 2 * 2 and rows["face_found"].all()
    copies = rows[rows["method"] == "folder:method"]
    assert copies["face_id_ref"].tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    real = rows[rows["method"] == "real-images"]  # the identity's other photo: same person, not the same image
    assert (real["face_id_ref"] > 0.5).all() and (real["face_id_ref"] < 0.999).all()
    assert (real["copy_paste_face_id"].isna()).all()  # two photos per identity: no "other" photo to compare
    assert "faces_found" in result.tables["per_method"].columns


def test_multi_subject_regions(dreambench_dir, tmp_path):
    cfg = RunConfig(bench="dreambench-multi", methods=["copy-reference"], out=str(tmp_path / "run"),
                    images_per_prompt=1, subset=1, data_dir=dreambench_dir, progress=False)
    result = run_eval(cfg, metrics=support.metrics(clip=False, face=False))
    rows = result.rows
    assert list(rows["subject_slot"]) == [0, 1] and rows["entry_id"].nunique() == 1
    assert set(rows["region_source"]) == {"composite layout"}
    assert rows["dino_ref"].tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    assert result.tables["per_method"].loc[0, "rows"] == 2


def test_cli_offline_reports_absent_weights(dreambench_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--bench", "dreambench", "--method", "copy-reference",
                           "--subset", "1", "--images-per-prompt", "1", "--data-dir", dreambench_dir,
                           "--out", str(run), "--face-backend", "sface",
                           "--metrics", "clip_i,clip_t,dino,face_id,copy_paste"],  # face-ID only when asked here
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("clip_i", "clip_t", "dino"):
        assert f"not computed: {name} - " in proc.stderr
    report = open(run / "report.md").read()
    assert "**clip_i: not computed**" in report and "**face_id**: SFace" in report
    per_method = pd.read_csv(run / "per_method.csv")
    assert "face_id" in per_method.columns and "clip_i" not in per_method.columns and "dino" not in per_method.columns
    assert per_method.loc[0, "face_model"] == "SFace"

    other = tmp_path / "other"
    shutil.copytree(run, other)
    table = compare_runs([str(run), str(other)])
    assert list(table["run"]) == [str(run), str(other)] and list(table["method"]) == ["copy-reference"] * 2
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--compare", str(run), str(other), "--out",
                           str(tmp_path / "cmp")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "cmp" / "compare.md").read_text().count("copy-reference") == 2
