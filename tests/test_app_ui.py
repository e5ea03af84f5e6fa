"""app.py's wiring without a browser: the UI builds around a loaded model, the CLI fails clearly."""
import importlib
import sys

import pytest
import torch

import app
from anystory.app_logic import Environment, load_model
from anystory.matting import LazyBiRefNetSegmenter


@pytest.fixture(scope="module")
def demo():
    handle = load_model(Environment(), "tiny")
    return app.build_demo(handle, LazyBiRefNetSegmenter()), handle


def test_ui_has_a_slot_per_subject_and_the_outputs(demo):
    blocks, handle = demo
    config = blocks.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    for i in range(1, handle.max_subjects + 1):
        assert f"subject-{i}-image" in ids and f"subject-{i}-name" in ids
    assert f"subject-{handle.max_subjects + 1}-image" not in ids
    for elem in ("prompt", "generate", "output-gallery", "routing-gallery", "routing-legend", "downloads",
                 "model-status", "matting-status", "shots", "generate-storyboard", "import-script"):
        assert elem in ids, elem
    status = next(c for c in config["components"] if c["props"].get("elem_id") == "model-status")
    assert "UNTRAINED" in status["props"]["value"] and "Why:" in status["props"]["value"]


def test_cli_defaults_are_local_and_not_shared():
    args = app.parse_args([])
    assert args.share is False and args.host is None and args.model in ("auto", "flux", "sdxl", "miniature", "tiny")


def test_cli_reports_an_unavailable_model_and_exits(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app.main(["--model", "flux"]) == 1
    assert "FLUX: no CUDA GPU" in capsys.readouterr().err


def test_gpu_decoration_only_with_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails: the plain function is used
    plain = importlib.reload(app)
    f = lambda: 1  # noqa: E731
    assert plain.gpu(f) is f

    class FakeSpaces:
        @staticmethod
        def GPU(duration):
            return lambda fn: ("on-gpu", duration, fn)

    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces)
    spaced = importlib.reload(app)
    assert spaced.gpu(f) == ("on-gpu", 180, f)
    monkeypatch.setitem(sys.modules, "spaces", None)
    importlib.reload(app)
