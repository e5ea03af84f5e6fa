"""Benchmark loaders and data location: DreamBench lists, classes and templates exact; faces layout; the
data-dir rules, the missing-folder message and the checksum-verified download."""
import collections
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from eval.data import (ENV_VAR, DataIntegrityError, DataNotFoundError, download_dreambench, load_manifest,
                       resolve_dreambench_dir, verify_folder)
from eval.loaders import load_benchmark
from eval.loaders.dreambench import parse_prompts_and_classes
from eval.loaders.faces import DEFAULT_PROMPTS, load_faces

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# DreamBooth's dataset/prompts_and_classes.txt, written out independently of the parser.
CLASSES = {
    "backpack": "backpack", "backpack_dog": "backpack", "bear_plushie": "stuffed animal", "berry_bowl": "bowl",
    "can": "can", "candle": "candle", "cat": "cat", "cat2": "cat", "clock": "clock", "colorful_sneaker": "sneaker",
    "dog": "dog", "dog2": "dog", "dog3": "dog", "dog5": "dog", "dog6": "dog", "dog7": "dog", "dog8": "dog",
    "duck_toy": "toy", "fancy_boot": "boot", "grey_sloth_plushie": "stuffed animal", "monster_toy": "toy",
    "pink_sunglasses": "glasses", "poop_emoji": "toy", "rc_car": "toy", "red_cartoon": "cartoon",
    "robot_toy": "toy", "shiny_sneaker": "sneaker", "teapot": "teapot", "vase": "vase",
    "wolf_plushie": "stuffed animal",
}


def test_templates_and_classes_exact(dreambench_dir):
    classes, objects, live = parse_prompts_and_classes(os.path.join(dreambench_dir, "prompts_and_classes.txt"))
    assert classes == CLASSES
    assert len(objects) == len(live) == 25
    assert objects[0] == live[0] == "a {0} {1} in the jungle"
    assert objects[19] == "a {0} {1} on top of a white rug"
    assert live[10] == "a {0} {1} wearing a red hat"
    assert live[19] == "a {0} {1} in a purple wizard outfit"
    assert objects[20:] == live[20:] == ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}",
                                         "a cube shaped {0} {1}"]


def test_dreambench_single_750(dreambench_dir):
    bench = load_benchmark("dreambench", dreambench_dir)
    assert len(bench.entries) == 750
    by_subject = collections.defaultdict(list)
    for e in bench.entries:
        by_subject[e.subjects[0].name].append(e)
    assert set(by_subject) == set(CLASSES)
    for name, entries in by_subject.items():
        assert sorted(e.prompt_index for e in entries) == list(range(25))
        assert len({e.subjects[0].reference for e in entries}) == 1  # one fixed reference per subject
        subject = entries[0].subjects[0]
        assert subject.class_name == CLASSES[name]
        assert subject.reference in subject.real_photos
        assert set(subject.real_photos) == {os.path.join(dreambench_dir, name, f)
                                            for f in os.listdir(os.path.join(dreambench_dir, name))}
    prompts = {e.entry_id: e.prompt for e in bench.entries}
    assert prompts["backpack-00"] == "a backpack in the jungle"
    assert prompts["bear_plushie-24"] == "a cube shaped stuffed animal"
    assert prompts["dog-10"] == "a dog wearing a red hat"
    assert prompts["teapot-10"] == "a teapot with a wheat field in the background"
    assert collections.Counter(e.prompt_type for e in bench.entries) == {
        "recontextualization": 21 * 20 + 9 * 10, "accessorization": 9 * 10, "property modification": 30 * 5}
    assert len(bench.subjects()) == 30 and sum(len(s.real_photos) for s in bench.subjects()) == 158


def test_dreambench_multi_750(dreambench_dir):
    bench = load_benchmark("dreambench-multi", dreambench_dir)
    assert len(bench.entries) == 750
    pairs = collections.Counter(tuple(s.name for s in e.subjects) for e in bench.entries)
    assert len(pairs) == 30 and set(pairs.values()) == {25}
    prompts = {e.entry_id: e.prompt for e in bench.entries}
    assert prompts["backpack_dog+bear_plushie-00"] == "a backpack and a stuffed animal in the jungle"
    assert prompts["backpack_dog+bear_plushie-20"] == "a red backpack and a red stuffed animal"
    assert prompts["cat+dog-10"] == "a cat wearing a red hat, next to it is a dog"
    assert prompts["cat+dog-24"] == "a cube shaped cat, next to it is a dog"
    assert prompts["dog6+teapot-05"] == "a dog and a teapot on top of a wooden floor"
    assert all(len(e.subjects) == 2 for e in bench.entries)


def test_mismatched_list_fails_loudly(dreambench_dir, tmp_path):
    for name in os.listdir(dreambench_dir):
        if name != "lists":
            os.symlink(os.path.join(dreambench_dir, name), tmp_path / name)
    (tmp_path / "lists").mkdir()
    os.symlink(os.path.join(dreambench_dir, "lists", "multi_subject.json"), tmp_path / "lists" / "multi_subject.json")
    entries = json.load(open(os.path.join(dreambench_dir, "lists", "single_subject.json")))
    entries[3]["prompt"] = "a backpack in space"
    (tmp_path / "lists" / "single_subject.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"single_subject.json entry 3: prompt 'a backpack in space' matches none"):
        load_benchmark("dreambench", str(tmp_path))


def test_subset_is_fixed_and_spread(dreambench_dir):
    bench = load_benchmark("dreambench", dreambench_dir)
    a, b = bench.subset(40), bench.subset(40)
    assert [e.entry_id for e in a.entries] == [e.entry_id for e in b.entries]
    assert len(a.entries) == 40 and [e.index for e in a.entries] == sorted(e.index for e in a.entries)
    assert len({e.subjects[0].name for e in a.entries}) >= 15
    assert len({e.prompt_type for e in a.entries}) == 3


def test_faces_layout(tmp_path):
    for person, n in (("ann", 2), ("bob", 3)):
        (tmp_path / person).mkdir()
        for i in range(n):
            (tmp_path / person / f"{i:02d}.jpg").write_bytes(b"")
    bench = load_faces(str(tmp_path))
    assert len(bench.entries) == 2 * len(DEFAULT_PROMPTS)
    first = bench.entries[0].subjects[0]
    assert first.reference.endswith("ann/00.jpg") and len(first.real_photos) == 2 and len(first.other_photos) == 1
    (tmp_path / "prompts.txt").write_text("style | a sketch of a person\n# comment\na person at the beach\n")
    bench = load_faces(str(tmp_path))
    assert [(e.prompt_type, e.prompt) for e in bench.entries[:2]] == [("style", "a sketch of a person"),
                                                                       ("prompt", "a person at the beach")]
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_faces(str(tmp_path / "nowhere"))


def test_missing_data_dir_message(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataNotFoundError, match="--data-dir"):
        resolve_dreambench_dir(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="missing prompts_and_classes.txt"):
        resolve_dreambench_dir(str(tmp_path / "empty"))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "also-absent"))
    with pytest.raises(DataNotFoundError, match=f"\\${ENV_VAR}.*--data-dir"):
        resolve_dreambench_dir()
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(DataNotFoundError, match="downloading is disabled.*--data-dir"):
        resolve_dreambench_dir(cache_dir=str(tmp_path / "cache"), download=False)


def test_cli_missing_data_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--bench", "dreambench", "--method", "copy-reference",
                           "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "DreamBench data folder not found" in proc.stderr and "--data-dir" in proc.stderr
    assert not (tmp_path / "run" / "rows.parquet").exists()


def test_cli_list_entries_names_a_broken_list(dreambench_dir, tmp_path):
    import shutil

    data = tmp_path / "dreambench"
    shutil.copytree(dreambench_dir, data)
    (data / "lists" / "single_subject.json").write_text("{not json")
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--bench", "dreambench", "--list-entries",
                           "--data-dir", str(data)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "single_subject.json is not valid JSON" in proc.stderr


def test_env_var_is_used(dreambench_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, dreambench_dir)
    assert resolve_dreambench_dir() == os.path.abspath(dreambench_dir)


def test_shared_copy_matches_pinned_checksums(dreambench_dir):
    manifest = load_manifest()
    assert len(manifest["files"]) == 163  # 158 photos, 2 text files, licence, 2 lists
    assert verify_folder(dreambench_dir, manifest) == {}


def _mini_source(tmp_path, dreambench_dir, tamper=False):
    """A local stand-in for the two upstream repositories (file:// URLs) and a manifest of 3 of their files."""
    full = load_manifest()
    picked = {rel: full["files"][rel] for rel in ("dog/00.jpg", "prompts_and_classes.txt",
                                                  "lists/single_subject.json")}
    archive = tmp_path / "dreambooth.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for rel, info in picked.items():
            if info["source"] == "dreambooth":
                data = open(os.path.join(dreambench_dir, rel), "rb").read()
                if tamper and rel.endswith(".jpg"):
                    data = data[:-1] + b"\x00"
                member = tarfile.TarInfo(f"dreambooth-pinned/{info['upstream']}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
        evil = tarfile.TarInfo("dreambooth-pinned/../../escape.txt")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    uno = tmp_path / "uno"
    (uno / "datasets").mkdir(parents=True)
    (uno / "datasets" / "dreambench_singleip.json").write_bytes(
        open(os.path.join(dreambench_dir, "lists", "single_subject.json"), "rb").read())
    return {"sources": {"dreambooth": dict(full["sources"]["dreambooth"], archive=archive.as_uri()),
                        "uno": dict(full["sources"]["uno"], raw=uno.as_uri() + "/")},
            "files": picked}


def test_download_verifies_checksums(dreambench_dir, tmp_path):
    manifest = _mini_source(tmp_path, dreambench_dir)
    dest = tmp_path / "cache" / "dreambench"
    assert download_dreambench(str(dest), manifest) == str(dest)
    for rel, info in manifest["files"].items():
        assert hashlib.sha256((dest / rel).read_bytes()).hexdigest() == info["sha256"]
    assert "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0" in (dest / "SOURCE.md").read_text()
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "cache" / "escape.txt").exists()


def test_tampered_download_is_rejected(dreambench_dir, tmp_path):
    manifest = _mini_source(tmp_path, dreambench_dir, tamper=True)
    dest = tmp_path / "cache" / "dreambench"
    with pytest.raises(DataIntegrityError, match=r"dog/00.jpg \(checksum mismatch\)"):
        download_dreambench(str(dest), manifest)
    assert not dest.exists() and os.listdir(tmp_path / "cache") == []
