"""``python -m anystory.generate``: defaults in --help, every input checked before a model loads, a quiet run."""
import logging
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from anystory import generate, loading
from anystory.import_notices import drop_import_notices
from anystory.sdxl.miniature import miniature_available

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 0)", "(default: outputs/anystory.png)", "(default: 1.0)", "20 for the miniature"):
        assert shown in text, shown


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_default_pipeline", refuse)
    monkeypatch.setattr(loading, "load_sdxl_anystory", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--subject", "missing.png"], "--subject #1 image: file not found: missing.png"),
    (["--subject", STAR, "--subject", "gone.jpg"], "--subject #2 image: file not found"),
    (["--subject", STAR, "--mask", "-", "--mask", "x.png"], "2 masks for 1 subjects"),
    (["--subject", STAR, "--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--subject", STAR, "--guidance", "nan"], "--guidance must be finite"),
    (["--subject", STAR, "--scale", "nan"], "scale"),
    (["--subject", STAR, "--out", "result.txt"], "unknown image extension '.txt'"),
])
def test_bad_inputs_fail_before_any_model_loads(no_model, capsys, tmp_path, extra, message):
    argv = ["--prompt", "a star", "--out", str(tmp_path / "o.png")] + extra
    if "--out" in extra:
        argv = ["--prompt", "a star"] + extra
    assert generate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_mask_of_another_size_is_named(no_model, capsys, tmp_path):
    mask = tmp_path / "m.png"
    Image.new("L", (10, 10), 255).save(mask)
    assert generate.main(["--prompt", "a star", "--subject", STAR, "--mask", str(mask),
                          "--out", str(tmp_path / "o.png")]) == 2
    assert "does not match image size" in capsys.readouterr().err


@pytest.mark.parametrize("regions, message", [
    (["0,0,0.5"], "--subject #1: region box must be four numbers"),
    (["0, 0, 640, 480"], "--subject #1: region box (0.0, 0.0, 640.0, 480.0) looks like pixels"),
    (["0.5,0,0.5,1"], "is empty; it needs x0 < x1"),
    (["-", "nowhere.png"], "--subject #2 region: file not found: nowhere.png"),
    (["-", "-", "-"], "3 regions for 2 subjects"),
])
def test_bad_regions_fail_before_any_model_loads(no_model, capsys, tmp_path, regions, message):
    argv = ["--prompt", "a star", "--subject", STAR, "--subject", STAR, "--out", str(tmp_path / "o.png")]
    for r in regions:
        argv += ["--region", r]
    assert generate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_regions_pair_with_subjects_by_the_subject_rule(tmp_path):
    """A box of fractions, a mask file (read as Subject(region=...) reads it) and ``-`` (anywhere), in order."""
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 32, 32))  # the left half of a 64x32 output
    mask.save(tmp_path / "left.png")
    args = generate.parse_args(["--prompt", "p", "--subject", STAR, "--subject", STAR, "--subject", STAR,
                                "--region", "0, 0, 0.5, 1", "--region", str(tmp_path / "left.png"),
                                "--out", str(tmp_path / "o.png")])
    subjects = generate.check_inputs(args)
    assert [s.region if not isinstance(s.region, str) else "file" for s in subjects] == [(0.0, 0.0, 0.5, 1.0),
                                                                                         "file", None]
    from anystory.regions import routing_regions
    from anystory.subjects import prepare_subjects

    regions = routing_regions(prepare_subjects(subjects), 32, 64)
    assert regions.shape == (3, 32, 64)
    assert torch.equal(regions[0], regions[1]) and regions[0][:, :32].all() and not regions[0][:, 32:].any()
    assert regions[2].all()


def test_import_notice_filter_drops_only_its_text():
    drop_import_notices()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("torch.utils._pytree")
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning("%s is an Enum subclass and is now natively supported by torch.compile as ...", "X")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert records == ["something else"]


@pytest.mark.skipif(not miniature_available(), reason="the miniature is not installed")
def test_a_normal_run_prints_no_warning(tmp_path):
    out = tmp_path / "story.png"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["HF_HUB_OFFLINE"] = "1"  # a normal run: Python's default warning filters
    run = subprocess.run([sys.executable, "-m", "anystory.generate", "--prompt", "a red striped star on sand",
                          "--subject", STAR, "--steps", "2", "--out", str(out), "--save-routing"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.is_file() and (tmp_path / "story_routing.png").is_file()
    progress_bars = re.compile(r"(it/s\]|s/it\]|\|\s*\d+/\d+ \[)")  # tqdm lines: loading, denoising
    noisy = [ln for ln in run.stderr.splitlines() if ln.strip() and not progress_bars.search(ln)]
    assert noisy == [], noisy  # nothing else on stderr: no warning, no notice


def test_out_is_never_overwritten_unasked_nor_written_through_a_link(tmp_path, capsys):
    """Checked before a model loads: an existing --out needs --overwrite, a link is refused either way."""
    from anystory.output_files import save_image
    from PIL import Image

    existing = tmp_path / "mine.png"
    existing.write_bytes(b"precious")
    assert generate.main(["--prompt", "a star", "--subject", STAR, "--out", str(existing)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err and existing.read_bytes() == b"precious"
    target = tmp_path / "target.txt"
    target.write_text("keep me")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    for extra in ([], ["--overwrite"]):
        assert generate.main(["--prompt", "a star", "--subject", STAR, "--out", str(link)] + extra) == 2
        assert "is a symbolic link; refusing to write through it" in capsys.readouterr().err
    assert target.read_text() == "keep me"
    save_image(Image.new("RGB", (4, 4)), str(existing), overwrite=True)
    assert Image.open(existing).size == (4, 4) and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
