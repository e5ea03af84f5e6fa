"""``python -m anystory.generate --background``: it reaches the pipeline and changes the picture; bad values and
``--flux`` are refused by flag name before any model loads."""
import os

import numpy as np
import pytest
from PIL import Image

from anystory import generate, loading
from helpers.background import miniature_with_background

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the inputs were checked")

    for name in ("load_default_pipeline", "load_sdxl_anystory"):
        monkeypatch.setattr(loading, name, refuse)
    monkeypatch.setattr(generate, "load_flux", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--flux", "--background", STAR], "--background: the background reference is SDXL-only"),
    (["--background", "nowhere.png"], "--background: file not found: nowhere.png"),
    (["--background", STAR, "--background-start", "-1"], "--background-start must be"),
    (["--background", STAR, "--background-start", "nan"], "--background-start must be finite"),
    (["--background-start", "0.5"], "--background-start needs --background"),
])
def test_bad_background_fails_before_any_model_loads(no_model, capsys, tmp_path, extra, message):
    argv = ["--prompt", "a star", "--subject", STAR, "--out", str(tmp_path / "o.png")] + extra
    assert generate.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_transparent_background_is_named(no_model, capsys, tmp_path):
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    argv = ["--prompt", "a star", "--background", str(tmp_path / "clear.png"), "--out", str(tmp_path / "o.png")]
    assert generate.main(argv) == 2
    assert "--background: the image is fully transparent" in capsys.readouterr().err


@pytest.fixture(scope="module")
def miniature():
    return miniature_with_background()


def test_background_reaches_the_pipeline_and_changes_the_output(miniature, monkeypatch, tmp_path):
    import torch
    from anystory.data.synthetic import SyntheticWorld, WorldConfig

    torch.set_num_threads(1)
    monkeypatch.setattr(loading, "load_default_pipeline", lambda device="cpu": miniature)
    world = SyntheticWorld(7, WorldConfig(image_size=64, reference_size=64))
    world.background_reference("night", 0).save(tmp_path / "night.png")
    base = ["--prompt", "a red striped star", "--subject", STAR, "--steps", "2"]
    outputs = {}
    for name, extra in (("none", []), ("night", ["--background", str(tmp_path / "night.png")]),
                        ("night0", ["--background", str(tmp_path / "night.png"), "--background-start", "0"])):
        assert generate.main(base + extra + ["--out", str(tmp_path / f"out_{name}.png")]) == 0
        outputs[name] = np.asarray(Image.open(tmp_path / f"out_{name}.png"), dtype=np.int16)
    assert np.abs(outputs["night"] - outputs["none"]).mean() > 1.0
    assert not np.array_equal(outputs["night"], outputs["night0"])  # the strength reaches the call too
