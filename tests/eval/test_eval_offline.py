"""The harness without a network or a GPU: the device is refused before any model loads, an unreachable hub is
never retried, a model that cannot load is loaded once, and a run that can compute no metric fails in one line
that names the files to put where. The hub is simulated (a probe answer and a session that records requests),
so these tests never touch the network."""
import os
import time

from huggingface_hub.utils._http import httpx2
import huggingface_hub.constants
import pytest

import anystory.hub
from eval.generate import run_generation
from eval.loaders import load_benchmark
from eval.methods import MethodError, PipelineMethod
from eval.metrics import DinoEmbedder, MetricSettings, build_metrics, load_metrics, what_to_do
from eval.offline import settle_hub
from eval.run import RunConfig, RunError, main, run_eval
from helpers import eval_data as support


class DeadHub:
    """huggingface_hub's client with no network under it: its request hook runs (it refuses every request in
    offline mode, as the real client's does), then the connection fails, and the attempt is counted."""

    def __init__(self):
        self.requests, self.sleeps = [], []

    def request(self, method, url, **kwargs):
        from huggingface_hub.utils._http import hf_request_event_hook

        hf_request_event_hook(httpx2.Request(method, url))
        self.requests.append(url)
        raise httpx2.ConnectError("[Errno -2] Name or service not known")

    def stream(self, method, url, **kwargs):
        return self.request(method, url, **kwargs)


class RecordedSleep:
    """The ``time`` module as huggingface_hub's retry loop sees it, with ``sleep`` recorded instead of slept."""

    def __init__(self, sleeps):
        self.sleeps = sleeps

    def sleep(self, seconds):
        self.sleeps.append(seconds)

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def dead_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset, an empty hub cache, no network; any retry would sleep, and is recorded instead."""
    from huggingface_hub.utils import _http

    hub = DeadHub()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(_http, "get_session", lambda: hub)
    monkeypatch.setattr(_http, "time", RecordedSleep(hub.sleeps))  # the hub client's own clock only
    monkeypatch.setitem(anystory.hub._probed, anystory.hub.hub_endpoint(), False)  # the one probe: no answer
    yield hub
    os.environ.pop("HF_HUB_OFFLINE", None)  # settle_hub switched it on; monkeypatch restores the rest


def test_without_the_check_the_dead_hub_is_retried(dead_hub):
    """The simulation is faithful: a metric loaded before settle_hub runs into huggingface_hub's retries."""
    dino = DinoEmbedder()
    with pytest.raises(Exception):
        dino.load()
    assert len(dead_hub.requests) > 1 and dead_hub.sleeps


def test_unreachable_hub_is_detected_once_and_never_retried(dead_hub, tmp_path):
    assert "unreachable" in settle_hub()
    assert huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    started = time.monotonic()
    usable, unavailable = load_metrics(build_metrics(MetricSettings(names=["clip_i", "clip_t", "dino"],
                                                                    weights_dir=str(tmp_path / "w"))))
    assert not usable and set(unavailable) == {"clip_i", "clip_t", "dino"}
    assert dead_hub.requests == [] and dead_hub.sleeps == []
    assert time.monotonic() - started < 20


def test_offline_run_with_no_metric_fails_in_one_line_naming_the_files(dead_hub, dreambench_dir, tmp_path, capsys):
    weights, out = str(tmp_path / "weights"), tmp_path / "run"
    started = time.monotonic()
    code = main(["--bench", "dreambench", "--method", "real-images", "--subset", "2", "--images-per-prompt", "1",
                 "--data-dir", dreambench_dir, "--out", str(out), "--weights-dir", weights])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    line = errors[0]
    assert line.startswith("error: no metric could be computed (clip_i, clip_t, dino, copy_paste)")
    assert f"{weights}/open_clip/ViT-B-32-openai.safetensors" in line
    assert "hf.co/timm/vit_base_patch32_clip_224.openai" in line
    assert f"{weights}/dino/vit_small_patch16_224.dino.safetensors" in line and "--resume" in line
    assert dead_hub.requests == [] and dead_hub.sleeps == [] and elapsed < 60
    assert (out / "run_config.json").is_file() and not (out / "rows.parquet").exists()
    assert not (out / "scores" / "signature.json").exists()  # nothing scored: --resume with weights scores it all


def test_a_missing_package_is_named_for_installing(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # "import timm" raises ImportError
    metrics = build_metrics(MetricSettings(names=["dino", "copy_paste"]))
    usable, unavailable = load_metrics(metrics)
    assert not usable and what_to_do(metrics, unavailable) == "pip install timm"


class CountingLoader:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1
        raise RuntimeError("Found no NVIDIA driver on your system")


def test_cuda_without_a_gpu_is_refused_before_any_model_loads(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    load = CountingLoader()
    cfg = RunConfig(bench="dreambench", methods=["anystory-miniature"], out=str(tmp_path / "run"),
                    data_dir=str(tmp_path / "no-data"), device="cuda", progress=False)
    with pytest.raises(RunError, match="--device cuda: .* no usable NVIDIA GPU.*--device cpu"):
        run_eval(cfg, methods=[PipelineMethod("anystory-miniature", cfg.out, load)])
    assert load.calls == 0 and not (tmp_path / "run").exists()  # refused before the data, the folder, the model
    code = main(["--bench", "dreambench", "--method", "anystory-miniature", "--device", "cuda",
                 "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("error: --device cuda")


def test_a_model_that_cannot_load_is_loaded_once(tmp_path):
    data = support.faces_folder(str(tmp_path / "faces"))
    bench = load_benchmark("faces", data)
    load = CountingLoader()
    method = PipelineMethod("anystory-miniature", str(tmp_path / "run"), load)
    with pytest.raises(MethodError, match="anystory-miniature could not be loaded .*NVIDIA driver"):
        run_generation([method], bench.entries, 1, 0, progress=False)
    assert load.calls == 1
