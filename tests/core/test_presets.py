"""Per-model presets (``anystory/presets.py``): the CLI, the app, eval and the pipelines' call defaults read the
same table, so a model runs with the same steps and guidance wherever it is called."""
import inspect
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from anystory import generate, loading
from anystory.app.generation import Request, check_request
from anystory.app.models import ModelHandle
from anystory.flux.pipeline_flux import AnyStoryFluxPipeline
from anystory.presets import PRESETS, preset
from anystory.sdxl.pipeline_sdxl import AnyStorySDXLPipeline
from eval.methods import make_method

KINDS = ("flux", "sdxl", "miniature")


class RecordingPipe:
    """Stands for a loaded pipeline: records the call and returns one image."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(images=[Image.fromarray(np.zeros((8, 8, 3), np.uint8))], routing_maps=None)


def cli_call(kind: str, monkeypatch, tmp_path) -> dict:
    pipe = RecordingPipe()
    monkeypatch.setattr(generate, "load_flux", lambda args: pipe)
    monkeypatch.setattr(loading, "load_sdxl_anystory", lambda *a, **k: pipe)
    monkeypatch.setattr(loading, "load_default_pipeline", lambda *a, **k: pipe)
    flags = {"flux": ["--flux"], "sdxl": ["--anystory-weights", str(tmp_path)], "miniature": []}[kind]
    assert generate.main(["--prompt", "a star", "--out", str(tmp_path / f"{kind}.png"), "--device", "cpu"]
                         + flags) == 0
    return pipe.calls[0]


def app_call(kind: str) -> dict:
    return check_request(ModelHandle(kind, object(), "cpu", "test"), Request("a star", [])).kwargs


def eval_call(kind: str, tmp_path) -> dict:
    return make_method(f"anystory-{kind}", str(tmp_path), anystory_weights=str(tmp_path)).call_kwargs


@pytest.mark.parametrize("kind", KINDS)
def test_cli_app_and_eval_call_a_model_with_its_preset(kind, monkeypatch, tmp_path):
    """With the table's entry changed to values nobody else writes, all three follow it: none keeps its own."""
    monkeypatch.setitem(PRESETS, kind, replace(PRESETS[kind], steps=17 + KINDS.index(kind), guidance=1.25))
    expected = {"num_inference_steps": 17 + KINDS.index(kind), "guidance_scale": 1.25}
    for name, call in (("cli", cli_call(kind, monkeypatch, tmp_path)), ("app", app_call(kind)),
                       ("eval", eval_call(kind, tmp_path))):
        assert {k: call[k] for k in expected} == expected, name


def test_what_is_given_overrides_the_preset(monkeypatch, tmp_path):
    assert make_method("anystory-miniature", str(tmp_path), call_kwargs={"num_inference_steps": 3,
                       "guidance_scale": None}).call_kwargs == {"num_inference_steps": 3,
                                                                "guidance_scale": PRESETS["miniature"].guidance}
    assert check_request(ModelHandle("sdxl", object(), "cpu", "test"),
                         Request("a star", [], steps=7, guidance=1.5)).kwargs["num_inference_steps"] == 7


def test_the_pipelines_call_defaults_are_their_presets():
    def defaults(cls):
        return {k: v.default for k, v in inspect.signature(cls.__call__).parameters.items()}

    sdxl, flux = defaults(AnyStorySDXLPipeline), defaults(AnyStoryFluxPipeline)
    assert (sdxl["num_inference_steps"], sdxl["guidance_scale"]) == (PRESETS["sdxl"].steps, PRESETS["sdxl"].guidance)
    assert (flux["num_inference_steps"], flux["guidance_scale"], flux["height"], flux["width"]) == (
        PRESETS["flux"].steps, PRESETS["flux"].guidance, PRESETS["flux"].size, PRESETS["flux"].size)


def test_the_app_sizes_its_sliders_from_the_preset():
    for kind in ("flux", "sdxl"):
        d, p = ModelHandle(kind, object(), "cpu", "test").defaults, PRESETS[kind]
        assert (d.size, d.min_size, d.max_size, d.size_step) == (p.size, p.min_size, p.max_size, p.size_step)
    assert app_call("flux")["height"] == PRESETS["flux"].size


def test_an_unknown_kind_is_named():
    with pytest.raises(KeyError, match="no preset for model kind 'sd3'"):
        preset("sd3")
