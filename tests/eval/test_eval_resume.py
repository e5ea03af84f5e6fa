"""Resumability: a scoring run killed with SIGKILL and resumed gives the uninterrupted run's table (no duplicate,
no missing row); the generation stage makes only missing images, with the same seeds, and records failures."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import eval_data as support
from eval.atomic import TMP_MARK
from eval.loaders.base import Benchmark, Entry, SubjectRef
from eval.methods import PipelineMethod
from eval.run import RunConfig, run_eval
from eval.score import KEY

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGES = 3 * 2 * 2  # identities x prompts x methods; parts of 2 images


def _parts(run_dir):
    folder = os.path.join(run_dir, "scores")
    return [p for p in os.listdir(folder) if p.startswith("part-") and TMP_MARK not in p] \
        if os.path.isdir(folder) else []


def _comparable(rows: pd.DataFrame) -> pd.DataFrame:
    return rows.drop(columns=["image_path", "run"]).sort_values(KEY).reset_index(drop=True)


def test_kill_during_scoring_then_resume(tmp_path):
    data = support.small_faces_folder(str(tmp_path / "faces"))
    killed = str(tmp_path / "killed")
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "helpers", "eval_data.py"), "child", killed, data],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not _parts(killed) and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, f"child ended before it could be killed: {child.stderr.read().decode()[-2000:]}"
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    done_before = len(_parts(killed))
    assert 1 <= done_before < IMAGES // 2, "the kill must land between the first and the last part"
    assert not os.path.exists(os.path.join(killed, "rows.parquet"))

    resumed = run_eval(support.child_config(killed, data, resume=True), metrics=support.child_metrics())
    reference = run_eval(support.child_config(str(tmp_path / "whole"), data), metrics=support.child_metrics())
    a, b = _comparable(resumed.rows), _comparable(reference.rows)
    assert len(a) == IMAGES and not a.duplicated(KEY).any()
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=0)
    assert (a["status"] == "ok").all()
    on_disk = pd.read_parquet(os.path.join(killed, "rows.parquet"))
    pd.testing.assert_frame_equal(_comparable(on_disk), a, check_exact=False, atol=1e-5, rtol=0)
    assert not any(TMP_MARK in name for _, _, files in os.walk(killed) for name in files)


class TinyPipeline:
    """AnyStory's tiny SDXL pipeline, failing on request (to test failure records)."""

    def __init__(self, fail_on=None):
        from anystory import AnyStorySDXLPipeline
        from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components

        self.pipe = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0))
        torch.manual_seed(0)
        self.pipe.init_anystory(**TINY_ANYSTORY_CONFIG)
        self.fail_on, self.calls = fail_on, []

    def set_progress_bar_config(self, **kw):
        self.pipe.set_progress_bar_config(**kw)

    def __call__(self, prompt, **kw):
        self.calls.append(prompt)
        if prompt == self.fail_on:
            raise RuntimeError("boom")
        return self.pipe(prompt, **kw)


def _tiny_bench(tmp_path):
    support.noise_image(5, (64, 64)).save(tmp_path / "ref.png")
    support.noise_image(6, (64, 64)).save(tmp_path / "other.png")
    subject = SubjectRef("noise", "thing", str(tmp_path / "ref.png"), (str(tmp_path / "other.png"),
                                                                       str(tmp_path / "ref.png")))
    entries = [Entry(f"noise-{i:02d}", i, prompt, (subject,), "recontextualization", i)
               for i, prompt in enumerate(["a thing on sand", "a thing in snow", "a red thing"])]
    return Benchmark("tiny", entries, str(tmp_path))


def test_generation_resume_and_failures(tmp_path):
    pytest.importorskip("anystory.sdxl.tiny_sdxl")
    bench = _tiny_bench(tmp_path)
    run_dir = str(tmp_path / "run")
    pipe = TinyPipeline(fail_on="a red thing")
    method = PipelineMethod("anystory-tiny-test", run_dir, lambda: pipe, {"num_inference_steps": 2})
    cfg = RunConfig(bench="tiny", methods=["anystory-tiny-test"], out=run_dir, images_per_prompt=1, seed=7,
                    progress=False)
    first = run_eval(cfg, metrics=support.metrics(clip=False, face=False), benchmark=bench, methods=[method])
    assert first.generation["anystory-tiny-test"]["made"] == 2
    assert set(first.generation["anystory-tiny-test"]["failed"]) == {"noise-02/0"}
    status = first.rows.set_index(["entry_id", "sample"])["status"]
    assert status.loc[("noise-02", 0)] == "missing (generation failed: RuntimeError: boom)"
    assert first.rows["seed"].tolist() == [7, 8, 9]  # seed + entry index: a subset draws the full run's noise

    kept = method.image_path(bench.entries[0], 0)
    redo = method.image_path(bench.entries[1], 0)
    kept_mtime, redo_pixels = os.stat(kept).st_mtime_ns, np.asarray(Image.open(redo)).copy()
    os.unlink(redo)
    pipe.calls.clear()
    pipe.fail_on = None
    resumed = run_eval(RunConfig(**dict(cfg.__dict__, resume=True)), metrics=support.metrics(clip=False, face=False),
                       benchmark=bench, methods=[method])
    assert sorted(pipe.calls) == ["a red thing", "a thing in snow"]  # only what was missing
    assert os.stat(kept).st_mtime_ns == kept_mtime
    assert np.array_equal(np.asarray(Image.open(redo)), redo_pixels)  # same seed, same image
    assert (resumed.rows["status"] == "ok").all() and len(resumed.rows) == 3
    assert resumed.generation["anystory-tiny-test"]["failed"] == {}
