"""Training on two processes (``accelerate launch`` with the shipped DDP config, on a CPU through gloo).

Two processes with batch b per process compute what one process with batch 2b computes: stage 1 to float
rounding, stage 2 within the spread of its Gumbel noise (drawn per process). One checkpoint, written by the main
process only; a run killed with SIGKILL resumes to the very weights of an uninterrupted run.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from anystory import AnyStorySDXLPipeline
from anystory.training.components import build_components
from anystory.training.config import load_config
from anystory.training.export import save_base_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
DDP = os.path.join(ROOT, "configs", "accelerate", "ddp.yaml")
STEPS1, STEPS2 = 12, 3
#: Documented tolerances (docs/training.md, "Training on many processes"): stage 1 is the same computation split in two;
#: stage 2's straight-through Gumbel noise is drawn per process, so its hard routing differs between the runs.
STAGE1_RTOL, STAGE2_RTOL = 1e-5, 0.05


def _args(work_dir, batch, stages="stage1,stage2"):
    return ["--config", SMOKE, "--stages", stages, "--set", f"work_dir={work_dir}", "--set",
            f"export_dir={work_dir}/export", "--set", "log_every=1",
            "--set", "save_every=2", "--set", "trackers=[]", "--set", f"stage1.steps={STEPS1}",
            "--set", f"stage2.steps={STEPS2}", "--set", f"stage1.batch_size={batch}",
            "--set", f"stage2.batch_size={batch}"]


def _launch(work_dir, stages="stage1,stage2"):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP, "--num_processes", "2",
           "--mixed_precision", "no", "-m", "anystory.training"] + _args(work_dir, 2, stages)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_tree(pid):
    """SIGKILL ``pid`` and every process it started."""
    import psutil  # accelerate's own dependency

    parent = psutil.Process(pid)
    for proc in parent.children(recursive=True) + [parent]:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def _rows(work_dir, stage):
    with open(os.path.join(work_dir, stage, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _weights(work_dir, stage="stage1"):
    return load_file(os.path.join(work_dir, stage, "anystory", "anystory.safetensors"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A work dir whose miniature stages are finished: the smoke model, untrained (stages 1-2 start from it)."""
    work = tmp_path_factory.mktemp("dist") / "base"
    cfg = load_config(SMOKE, {"work_dir": str(work)})
    torch.manual_seed(0)
    save_base_pipeline(AnyStorySDXLPipeline(**build_components(cfg)), str(work / "base" / "pipeline"))
    os.makedirs(work / "base" / "checkpoint")
    (work / "base" / "checkpoint" / "state.json").write_text(json.dumps({"step": 1, "done": True}))
    return work


@pytest.fixture(scope="module")
def runs(base):
    """The same training on 2 processes x batch 2 (accelerate launch) and on 1 process x batch 4 (in-process)."""
    from anystory.training.runner import run_stages

    two, one = base.parent / "two", base.parent / "one"
    shutil.copytree(base, two)
    shutil.copytree(base, one)
    proc = _launch(two, "stage1,stage2,export")
    torch.set_num_threads(1)
    assert run_stages(_args(one, 4), log=lambda *_: None) == 0
    return one, two, _finish(proc)


def test_two_processes_follow_one_process_with_twice_the_batch(runs):
    one, two, _ = runs
    a, b = _rows(one, "stage1"), _rows(two, "stage1")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS1 + 1))
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=STAGE1_RTOL), (x, y)
        assert y["lr"] == x["lr"]
    w1, w2 = _weights(one), _weights(two)
    assert max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1) < 1e-4
    a, b = _rows(one, "stage2"), _rows(two, "stage2")
    assert len(a) == len(b) == STEPS2
    for x, y in zip(a, b):
        for key in ("loss", "diffusion", "routing"):
            assert y[key] == pytest.approx(x[key], rel=STAGE2_RTOL), (key, x, y)


def test_one_checkpoint_written_by_the_main_process_only(runs):
    _, two, out = runs
    for stage in ("stage1", "stage2"):
        entries = sorted(os.listdir(two / stage))
        assert entries == ["anystory", "checkpoint", "log.jsonl"], entries  # no .tmp / .old left behind
        state = json.loads((two / stage / "checkpoint" / "state.json").read_text())
        assert state["done"] and state["step"] == (STEPS1 if stage == "stage1" else STEPS2)
    assert len(_rows(two, "stage1")) == STEPS1  # one writer: a second would have doubled every row
    summary = json.loads((two / "summary.json").read_text())
    assert summary["stage1"]["processes"] == summary["stage2"]["processes"] == 2
    assert out.count("[stage1] step 1/") == 1  # only the main process prints
    assert (two / "export" / "anystory.safetensors").is_file() and (two / "export" / "model_index.json").is_file()


def test_a_killed_two_process_run_resumes_exactly(runs, base):
    _, two, _ = runs
    killed = base.parent / "killed"
    shutil.copytree(base, killed)
    state_file = killed / "stage1" / "checkpoint" / "state.json"
    proc = _launch(killed, "stage1")
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            step = json.loads(state_file.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if 2 <= step < STEPS1 - 2:
            _kill_tree(proc.pid)  # the launcher and both workers (torchrun gives them their own sessions), mid-run
            break
        time.sleep(0.05)
    proc.communicate()
    assert proc.returncode != 0 and 2 <= step < STEPS1, f"the run was not killed mid-way (checkpoint step {step})"
    assert not json.loads(state_file.read_text())["done"]
    out = _finish(_launch(killed, "stage1"))
    assert "[stage1] resumed from" in out
    a, b = _weights(two), _weights(killed)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0
    resumed = _rows(killed, "stage1")
    assert resumed[-1]["loss"] == _rows(two, "stage1")[-1]["loss"]

