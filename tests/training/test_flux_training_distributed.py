"""FLUX training on two processes (``accelerate launch`` with the shipped DDP config, on a CPU through gloo): two
processes with batch 1 each compute what one process with batch 2 computes, in the tiny base's stage and both
AnyStory stages (the FLUX router draws no noise, so all agree to float rounding), and write one file per stage."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from anystory.flux.weights_flux import read_released_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "flux_tiny.yaml")
DDP = os.path.join(ROOT, "configs", "accelerate", "ddp.yaml")
STEPS = 2
RTOL = 1e-5


def _args(work, batch):
    return ["--config", TINY, "--set", f"work_dir={work}", "--set", "trackers=[]", "--set", "log_every=1",
            "--set", f"flux_base.steps={STEPS}", "--set", f"flux_base.batch_size={batch}",
            "--set", "flux_base.heldout_batches=0", "--set", f"flux_subject.steps={STEPS}", "--set", f"flux_router.steps={STEPS}",
            "--set", f"flux_subject.batch_size={batch}", "--set", f"flux_router.batch_size={batch}",
            "--set", "flux_subject.heldout_batches=0", "--set", "flux_router.heldout_batches=0"]


def _rows(work, stage):
    with open(os.path.join(work, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from anystory.training.runner import run_stages

    base = tmp_path_factory.mktemp("flux_dist")
    one, two = base / "one", base / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP, "--num_processes", "2",
           "--mixed_precision", "no", "-m", "anystory.training"] + _args(two, 1)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    torch.set_num_threads(1)
    assert run_stages(_args(one, 2), log=lambda *_: None) == 0
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return one, two, out


def _weights(work, stage):
    if stage == "flux_base":
        return {"transformer": load_file(str(work / stage / "transformer.safetensors"))}
    return read_released_file(str(work / stage / "anystory" / "anystory_flux.bin"))


@pytest.mark.parametrize("stage", ["flux_base", "flux_subject", "flux_router"])
def test_two_processes_follow_one_process_with_twice_the_batch(runs, stage):
    one, two, _ = runs
    a, b = _rows(one, stage), _rows(two, stage)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    keys = ("loss", "diffusion") + (("routing", "miou") if stage == "flux_router" else ())
    for x, y in zip(a, b):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=RTOL), (key, x, y)
    w1, w2 = _weights(one, stage), _weights(two, stage)
    assert max((w1[g][k] - w2[g][k]).abs().max().item() for g in w1 for k in w1[g]) < 1e-5


def test_one_file_written_by_the_main_process(runs):
    _, two, out = runs
    for stage in ("flux_subject", "flux_router"):
        assert sorted(os.listdir(two / stage)) == ["anystory", "checkpoint", "log.jsonl"]
        assert os.listdir(two / stage / "anystory") == ["anystory_flux.bin"]
        assert len(_rows(two, stage)) == STEPS
    assert sorted(os.listdir(two / "flux_base")) == ["checkpoint", "log.jsonl", "transformer.safetensors"]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["flux_subject"]["processes"] == summary["flux_router"]["processes"] == 2
    assert out.count("[flux_subject] step 1/") == 1


def test_fsdp_on_two_processes_follows_one_process(tmp_path):
    """torch's FSDP2 (``fully_shard``: every trained tensor sharded across the two gloo processes) computes what
    one unsharded process computes with the whole batch (accelerate's FSDP plugin refuses a CPU, so the worker
    shards with torch directly)."""
    from helpers.flux_fsdp_worker import train
    from anystory.weights import load_tensors

    two = tmp_path / "two.safetensors"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             os.path.join(ROOT, "tests", "helpers", "flux_fsdp_worker.py"), "flux_router", "2", str(two)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    losses = train("flux_router", 2, str(tmp_path / "one.safetensors"), sharded=False)  # meanwhile, one process
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    report = json.loads((tmp_path / "two.safetensors.json").read_text())
    assert report["processes"] == 2 and report["shards"] == ["DTensor"]
    assert report["losses"] == pytest.approx(losses, rel=RTOL)
    a, b = load_tensors(str(tmp_path / "one.safetensors"), "one"), load_tensors(str(two), "two")
    assert sorted(a) == sorted(b) and len(a) > 50
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
