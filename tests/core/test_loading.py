"""One loading module: the app, the CLI, eval and training load through ``anystory.loading``; every hub id is
written once (``anystory.hub``); one check says whether the hub is off."""
import argparse
import ast
import os

import pytest

import anystory.hub as hub
from anystory import loading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HUB_IDS = {hub.SDXL_BASE, hub.SDXL_IMAGE_ENCODER[0], hub.FLUX_BASE, hub.FLUX_REDUX, hub.FLUX_ANYSTORY_REPO,
           hub.FLUX_ANYSTORY_FILE, hub.BIREFNET}


def _sources():
    for top in ("anystory", "eval"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)
    yield os.path.join(ROOT, "app.py")


def test_every_hub_id_is_a_string_literal_in_one_module_only():
    found = {}
    for path in _sources():
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Constant) and node.value in HUB_IDS:
                found.setdefault(node.value, set()).add(os.path.relpath(path, ROOT))
    assert set(found) == HUB_IDS
    elsewhere = {k: v for k, v in found.items() if v != {os.path.join("anystory", "hub.py")}}
    assert not elsewhere, f"hub ids written outside anystory/hub.py: {elsewhere}"


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_one_offline_check_reads_both_variables(monkeypatch, var):
    from anystory import matting
    from anystory.app import environment

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not hub.hub_offline()
    monkeypatch.setenv(var, "1")
    assert hub.hub_offline()
    assert matting.hub_offline is hub.hub_offline and environment.hub_offline is hub.hub_offline
    assert not matting.hub_reachable()  # no probe when the user switched the hub off


class Reached(Exception):
    pass


def _record(calls):
    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        raise Reached(f"{args} {kwargs}")
    return fake


def test_the_app_the_cli_and_eval_load_flux_through_the_loading_module(monkeypatch):
    from anystory import generate
    from anystory.app import environment, models
    from eval import methods

    calls = []
    monkeypatch.setattr(loading, "load_flux_release", _record(calls))
    monkeypatch.delenv("ANYSTORY_FLUX_WEIGHTS", raising=False)
    with pytest.raises(Reached):
        models.LOADERS["flux"](environment.Environment(cuda=True, gpu_memory_gib=80.0))
    args = argparse.Namespace(vram="auto", device="cpu", quantization=None, offload=None, flux_weights="w.bin")
    with pytest.raises(Reached):
        generate.load_flux(args)
    with pytest.raises(methods.MethodError, match="Reached"):
        methods._load_flux("w2.bin", "flux-folder", "cpu")
    assert [c[0][:1] for c in calls] == [(None,), ("w.bin",), ("w2.bin",)]
    assert calls[2][1]["flux"] == "flux-folder"


def test_the_app_and_eval_load_sdxl_through_the_loading_module(monkeypatch, tmp_path):
    from anystory.app import environment, models
    from eval import methods

    calls = []
    monkeypatch.setattr(loading, "load_sdxl_anystory", _record(calls))
    with pytest.raises(Reached):
        models.LOADERS["sdxl"](environment.Environment(sdxl_weights="weights", sdxl_base="base"))
    with pytest.raises(Reached):
        methods._load_sdxl("weights2", None, "cpu")
    assert [c[0][:2] for c in calls] == [("weights", "base"), ("weights2", None)]


def test_absent_weights_are_named_before_the_base_model_loads(tmp_path):
    with pytest.raises(loading.ModelUnavailableError, match="AnyStory weights not found"):
        loading.load_sdxl_anystory(str(tmp_path / "none"), base_model=str(tmp_path / "no-base"))


def test_an_absent_base_model_says_what_to_do(tmp_path):
    with pytest.raises(loading.ModelUnavailableError, match="could not be loaded from .*Pass a local folder"):
        loading.load_sdxl_base(str(tmp_path / "no-base"), (str(tmp_path / "no-encoder"), None))
