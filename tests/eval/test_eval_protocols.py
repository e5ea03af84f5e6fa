"""Numbers that can stand next to published tables: QuickGELU for OpenAI CLIP weights, scoring protocols and scale,
dispersion, --compare guards, wrong folder layouts, face-ID defaults, the oracle, published rows, UNO's layout.

Scores here come from a deterministic pixel embedder (and a tiny open_clip model built in code), so the tests check
definitions and plumbing, not model quality."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import eval_data as support
from eval.loaders import load_benchmark
from eval.metrics import CopyPasteMetric, EmbeddingMetric, MetricSettings, MetricUnavailable, OpenClipEmbedder, \
    build_metrics
from eval.published import beside_ours
from eval.run import NoMetricError, RunConfig, RunError, compare_runs, default_metric_names, main, run_eval
from eval.tables import bootstrap_ci

TINY_CLIP = "TinyTest-ViT"


def _pixel_metrics():
    dino = EmbeddingMetric("dino", support.pixel_embedder())
    return [dino, CopyPasteMetric(dino)]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    return support.small_faces_folder(str(tmp_path_factory.mktemp("faces") / "data"))


def _run(faces, out, **kw):
    cfg = RunConfig(bench="faces", methods=kw.pop("methods", ["copy-reference", "real-images"]), out=str(out),
                    images_per_prompt=kw.pop("images_per_prompt", 1), data_dir=faces, progress=False, **kw)
    return run_eval(cfg, metrics=_pixel_metrics())


@pytest.fixture(scope="module")
def two_protocols(faces, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("protocols")
    return _run(faces, tmp / "dreambooth"), _run(faces, tmp / "single", protocol="single-reference")


# 1. QuickGELU ---------------------------------------------------------------------------------------------------

def _activations(model):
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("QuickGELU", "GELU")}


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    """A tiny open_clip architecture registered in code, its random weights saved as if they were OpenAI's."""
    import open_clip

    tmp = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    (tmp / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp / f"{TINY_CLIP}.json"))
    torch.manual_seed(0)
    weights = tmp / "weights" / "open_clip" / f"{TINY_CLIP}-openai.bin"
    weights.parent.mkdir(parents=True)
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights)
    return weights


def test_openai_weights_from_a_file_run_with_quickgelu(tiny_clip_file, tmp_path):
    by_dir = OpenClipEmbedder(TINY_CLIP, "openai", weights_dir=str(tiny_clip_file.parent.parent))
    assert by_dir.source == str(tiny_clip_file)
    by_dir.load()
    assert _activations(by_dir.model) == {"QuickGELU"}
    assert by_dir.describe()["label"] == f"{TINY_CLIP}-quickgelu openai"
    by_file = OpenClipEmbedder(TINY_CLIP, str(tiny_clip_file))  # --clip-pretrained FILE: the name carries the tag
    by_file.load()
    assert _activations(by_file.model) == {"QuickGELU"} and by_file.describe()["label"].endswith("-quickgelu openai")
    image = support.noise_image(1, (32, 32))
    assert np.allclose(by_dir.embed_images([image]), by_file.embed_images([image]), atol=1e-6)

    anonymous = tmp_path / "weights.bin"
    shutil.copyfile(tiny_clip_file, anonymous)
    with pytest.raises(MetricUnavailable, match="--clip-activation quickgelu\\|gelu"):
        OpenClipEmbedder(TINY_CLIP, str(anonymous)).load()
    told = OpenClipEmbedder(TINY_CLIP, str(anonymous), activation="gelu")
    told.load()
    assert _activations(told.model) == {"GELU"} and told.describe()["label"] == f"{TINY_CLIP} weights.bin"
    assert not np.allclose(told.embed_images([image]), by_file.embed_images([image]), atol=1e-6)


def test_openai_tags_name_the_quickgelu_architecture():
    for model in ("ViT-B-32", "ViT-L-14"):
        e = OpenClipEmbedder(model, "openai")
        assert e.quick_gelu and e.describe()["label"] == f"{model}-quickgelu openai"
        assert e.describe()["activation"] == "QuickGELU"
    laion = OpenClipEmbedder("ViT-B-32", "laion2b_s34b_b79k")
    assert not laion.quick_gelu and laion.describe()["label"] == "ViT-B-32 laion2b_s34b_b79k"
    with pytest.raises(ValueError, match="contradicts"):
        OpenClipEmbedder("ViT-B-32-quickgelu", "openai", activation="gelu")


# 2. protocols ---------------------------------------------------------------------------------------------------

def test_single_reference_compares_with_the_reference_x100(two_protocols):
    dreambooth, single = two_protocols
    a, b = (r.rows.set_index(["method", "entry_id", "sample"]) for r in two_protocols)
    assert b["dino"].tolist() == pytest.approx((100 * a["dino_ref"]).tolist(), abs=1e-4)
    assert b["dino_ref"].tolist() == pytest.approx((100 * a["dino_ref"]).tolist(), abs=1e-4)
    assert b["copy_paste_dino"].tolist() == pytest.approx((100 * a["copy_paste_dino"]).tolist(), abs=1e-4)
    copies = b.loc["copy-reference"]
    assert copies["dino"].tolist() == pytest.approx([100.0] * len(copies), abs=1e-4)
    # dreambooth averages over every real photo: a copied reference scores below 1 there
    assert (a.loc["copy-reference", "dino"] < 0.999).all()
    for result, name, scale in ((dreambooth, "dreambooth", "[0, 1]"), (single, "single-reference", "x100")):
        for table in ("rows", "per_method", "per_subject", "per_prompt_type"):
            t = result.tables[table]
            assert set(t["protocol"]) == {name} and set(t["scale"]) == {scale}, table
            assert set(t["dino_model"]) == {"pixels"} and set(t["bench"]) == {"faces"}, table
        report = open(os.path.join(result.run_dir, "report.md")).read()
        assert f"- protocol: {name} " in report and f"- scale: {scale}" in report and "- dino_model: pixels" in report


def test_cli_protocol_with_a_real_face_model(tmp_path):
    data = support.faces_folder(str(tmp_path / "faces"))  # real faces, scored by SFace (shipped, offline)
    out = tmp_path / "run"
    assert main(["--bench", "faces", "--data-dir", data, "--method", "copy-reference", "--images-per-prompt", "1",
                 "--protocol", "single-reference", "--metrics", "face_id", "--face-backend", "sface",
                 "--out", str(out)]) == 0
    rows = pd.read_parquet(out / "rows.parquet")
    assert rows["face_id"].tolist() == pytest.approx([100.0] * 4, abs=1e-3)  # the reference itself, x100
    assert set(rows["protocol"]) == {"single-reference"} and set(rows["face_model"]) == {"SFace"}


def test_dino_vit_s8_is_selectable():
    dino = build_metrics(MetricSettings(names=["dino"], dino_model="vits8"))[0]
    assert dino.embedder.model_name == "vit_small_patch8_224.dino"
    assert build_metrics(MetricSettings(names=["dino"]))[0].embedder.model_name == "vit_small_patch16_224.dino"


def test_protocol_change_is_refused_on_resume(faces, two_protocols):
    dreambooth, _ = two_protocols
    cfg = RunConfig(bench="faces", methods=["copy-reference", "real-images"], out=dreambooth.run_dir,
                    images_per_prompt=1, data_dir=faces, progress=False, resume=True, protocol="single-reference")
    with pytest.raises(RunError, match="protocol: was 'dreambooth', now 'single-reference'"):
        run_eval(cfg, metrics=_pixel_metrics())


# 3. compare -----------------------------------------------------------------------------------------------------

def test_compare_refuses_runs_that_differ(two_protocols, tmp_path):
    dreambooth, single = two_protocols
    with pytest.raises(RunError, match="protocol: .*dreambooth.*single-reference.*--force"):
        compare_runs([dreambooth.run_dir, single.run_dir])
    assert main(["--compare", dreambooth.run_dir, single.run_dir]) == 1
    assert main(["--compare", dreambooth.run_dir, single.run_dir, "--force", "--out", str(tmp_path / "cmp")]) == 0
    assert "| single-reference | x100 |" in (tmp_path / "cmp" / "compare.md").read_text()
    table = compare_runs([dreambooth.run_dir, single.run_dir], force=True)
    assert list(table.columns[:6]) == ["run", "bench", "protocol", "scale", "subset", "images_per_prompt"]
    assert list(table["run"]) == [dreambooth.run_dir] * 2 + [single.run_dir] * 2
    assert set(table["bench"]) == {"faces"} and set(table["subset"]) == {"all"}
    for column in ("images", "scored", "missing", "dino_n", "images_per_prompt"):
        assert str(table[column].dtype) == "Int64", column

    other_bench = tmp_path / "other_bench"
    shutil.copytree(dreambooth.run_dir, other_bench)
    config = json.loads((other_bench / "run_config.json").read_text())
    config["bench"] = "dreambench"
    (other_bench / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="bench: .*faces.*dreambench"):
        compare_runs([dreambooth.run_dir, str(other_bench)])
    other_model = tmp_path / "other_model"
    shutil.copytree(dreambooth.run_dir, other_model)
    config = json.loads((other_model / "run_config.json").read_text())
    config["model_labels"]["dino_model"] = "vit_small_patch8_224.dino"
    (other_model / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(RunError, match="dino_model: .*pixels.*vit_small_patch8_224.dino"):
        compare_runs([dreambooth.run_dir, str(other_model)])
    assert len(compare_runs([dreambooth.run_dir, str(tmp_path / "other_model")], force=True)) == 4


# 4. wrong layouts -----------------------------------------------------------------------------------------------

def test_every_image_missing_is_an_error_naming_the_layout(faces, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["--bench", "faces", "--data-dir", faces, "--method", f"folder:{empty}", "--images-per-prompt", "1",
                 "--out", str(tmp_path / "run"), "--metrics", "dino"])
    err = capsys.readouterr().err
    assert code == 1
    assert "all 6 expected images are missing" in err and f"{empty}/<entry_id>/<k>.png" in err
    assert f"first missing: {empty}/id0-00/0.png" in err
    (empty / "0_0.png").write_bytes(b"not empty")  # UNO's naming, read with our layout
    assert main(["--bench", "faces", "--data-dir", faces, "--method", f"folder:{empty}", "--images-per-prompt", "1",
                 "--out", str(tmp_path / "run2"), "--metrics", "dino"]) == 1
    assert "pass --layout uno" in capsys.readouterr().err


def test_partly_missing_is_counted_and_case_and_empty_files_handled(faces, tmp_path):
    bench = load_benchmark("faces", faces)
    folder = support.reference_folder(bench, str(tmp_path / "method"))  # <entry_id>/0.jpg
    first, second, third = (os.path.join(folder, e.entry_id) for e in bench.entries[:3])
    os.unlink(os.path.join(first, "0.jpg"))
    os.rename(os.path.join(second, "0.jpg"), os.path.join(second, "0.JPG"))
    open(os.path.join(third, "0.png"), "wb").close()  # zero bytes: must not hide the valid 0.jpg
    result = _run(faces, tmp_path / "run", methods=[f"folder:{folder}"])
    name = f"folder:{os.path.basename(folder)}"
    assert result.missing == {name: {"count": 1, "expected": 6, "first": os.path.join(first, "0.png")}}
    rows = result.rows.set_index("entry_id")
    assert rows.loc[bench.entries[1].entry_id, "image_path"].endswith("0.JPG")
    assert rows.loc[bench.entries[2].entry_id, "image_path"].endswith("0.jpg")
    assert (rows["status"] == "ok").sum() == 5
    assert "1 of 6 images missing" in open(os.path.join(result.run_dir, "report.md")).read()


# 5. dispersion --------------------------------------------------------------------------------------------------

def test_tables_give_std_n_and_a_bootstrap_interval(two_protocols):
    result = two_protocols[0]
    per_method = result.tables["per_method"].set_index("method")
    rows = result.rows
    for method, group in rows.groupby("method"):
        values = group["dino"].to_numpy(dtype=float)
        assert per_method.loc[method, "dino"] == pytest.approx(values.mean())
        assert per_method.loc[method, "dino_std"] == pytest.approx(values.std(ddof=1))
        assert per_method.loc[method, "dino_n"] == len(values)
        low, high = per_method.loc[method, ["dino_ci_low", "dino_ci_high"]]
        assert (low, high) == pytest.approx(bootstrap_ci(values, group["entry_id"].to_numpy()))
        assert low <= values.mean() <= high and low < high
    for name in ("per_subject", "per_prompt_type"):
        table = result.tables[name]
        assert table["dino_n"].sum() == len(rows) and "dino_ci_low" not in table.columns


def test_bootstrap_resamples_whole_entries():
    assert bootstrap_ci(np.full(8, 0.5), np.arange(8)) == pytest.approx((0.5, 0.5))
    values, clusters = np.array([0.0, 0.0, 1.0, 1.0, np.nan]), np.array(["a", "a", "b", "b", "c"])
    low, high = bootstrap_ci(values, clusters)
    assert (low, high) == (0.0, 1.0)  # two clusters: each resample's mean is 0, 0.5 or 1
    assert np.isnan(bootstrap_ci(np.array([np.nan]), np.array(["a"]))).all()


# 6. face-ID defaults, the oracle --------------------------------------------------------------------------------

def test_face_id_by_default_only_on_benches_of_people():
    assert "face_id" in default_metric_names("faces")
    assert "face_id" not in default_metric_names("dreambench")
    assert "face_id" not in default_metric_names("dreambench-multi")


def test_dreambench_run_leaves_face_id_out_unless_asked(dreambench_dir, tmp_path):
    def run(name, names):
        cfg = RunConfig(bench="dreambench", methods=["copy-reference"], out=str(tmp_path / name), images_per_prompt=1,
                        subset=1, data_dir=dreambench_dir, progress=False,
                        metrics=MetricSettings(names=names, face_backend="sface"))
        return run_eval(cfg)

    with contextlib.suppress(NoMetricError):  # offline without CLIP / DINO weights nothing else can be scored
        run("default", None)
    with open(tmp_path / "default" / "run_config.json") as f:
        assert json.load(f)["identity"]["metric_names"] == ["clip_i", "clip_t", "copy_paste", "dino"]
    asked = run("asked", ["face_id"])
    assert "face_id" in asked.rows.columns and asked.rows["face_found"].notna().all()  # detection ran


def test_oracle_never_pairs_a_photo_with_itself(tmp_path):
    data = support.small_faces_folder(str(tmp_path / "data"), identities=2, photos=3)
    for extra in ("01.png", "02.png"):
        os.unlink(os.path.join(data, "id1", extra))  # id1 keeps a single photo
    result = _run(data, tmp_path / "run", methods=["real-images"])
    rows = result.rows.set_index("subject")
    lone = rows.loc["id1"]
    assert lone["status"].str.startswith("n/a: id1: a single real photo").all() and lone["dino"].isna().all()
    assert result.missing == {} and result.tables["per_method"].loc[0, "not_applicable"] == 2
    paired = rows.loc["id0"]
    reference = os.path.join(data, "id0", "00.png")
    assert (paired["status"] == "ok").all() and (paired["image_path"] != reference).all()
    assert (paired["dino_ref"] < 0.9999).all()


# 7. published numbers -------------------------------------------------------------------------------------------

def test_published_numbers_beside_ours():
    ours = pd.DataFrame({"method": ["anystory"], "dino": [0.7], "clip_i": [0.8], "clip_t": [0.3]})
    single = beside_ours("dreambench", ours, "dreambooth", "[0, 1]").set_index("method")
    assert single.loc["anystory", "source"] == "measured here"
    assert single.loc["real images (oracle)", ["dino", "clip_i"]].tolist() == [0.774, 0.885]
    assert single.loc["UNO", ["dino", "clip_i", "clip_t"]].tolist() == [0.760, 0.835, 0.304]
    assert single.loc["MS-Diffusion", ["dino", "clip_i", "clip_t"]].tolist() == [0.671, 0.792, 0.321]
    assert single.loc["UNO", "source"].startswith("published: UNO (Wu et al. 2025, arXiv 2504.02160), Table 1")
    assert single.loc["UNO", "protocol"] == "dreambooth (theirs)"
    multi = beside_ours("dreambench-multi", ours, "dreambooth", "[0, 1]").set_index("method")
    assert multi.loc["UNO", ["dino", "clip_i", "clip_t"]].tolist() == [0.542, 0.733, 0.322]
    assert "Table 2" in multi.loc["UNO", "source"]
    assert beside_ours("faces", ours, "dreambooth", "[0, 1]").empty


def test_report_shows_published_rows_on_dreambench(dreambench_dir, tmp_path):
    bench = load_benchmark("dreambench", dreambench_dir).subset(2)
    folder = support.reference_folder(bench, str(tmp_path / "method"))
    cfg = RunConfig(bench="dreambench", methods=[f"folder:{folder}"], out=str(tmp_path / "run"),
                    images_per_prompt=1, subset=2, data_dir=dreambench_dir, progress=False)
    result = run_eval(cfg, metrics=_pixel_metrics())
    report = open(os.path.join(result.run_dir, "report.md")).read()
    section = report.split("## Beside published numbers", 1)[1]
    assert "| folder:method | measured here | dreambooth |" in section
    assert "| UNO | published: UNO" in section and "0.774" in section and "| MS-Diffusion |" in section
    assert set(result.tables["per_method"]["subset"]) == {"2 of 750"}


# 8. other methods' layouts --------------------------------------------------------------------------------------

def test_uno_layout_scores_like_ours(faces, tmp_path, capsys):
    bench = load_benchmark("faces", faces)
    ours = support.reference_folder(bench, str(tmp_path / "ours"), images_per_prompt=2)
    flat = tmp_path / "uno"
    flat.mkdir()
    for entry in bench.entries:
        for k in range(2):
            shutil.copyfile(os.path.join(ours, entry.entry_id, f"{k}.jpg"), flat / f"{entry.index}_{k}.png")
    a = _run(faces, tmp_path / "a", methods=[f"folder:{ours}"], images_per_prompt=2)
    b = _run(faces, tmp_path / "b", methods=[f"folder:{flat}"], images_per_prompt=2, layout="uno")
    assert (b.rows["status"] == "ok").all()
    assert b.rows["dino"].tolist() == pytest.approx(a.rows["dino"].tolist(), abs=1e-6)

    assert main(["--bench", "faces", "--data-dir", faces, "--list-entries"]) == 0
    listed = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(listed.columns[:2]) == ["index", "entry_id"]
    assert listed["index"].tolist() == [e.index for e in bench.entries]
