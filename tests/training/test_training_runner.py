"""The training stages run from one runner module: no import cycle, each stage's script entry, loading errors."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
STAGE_MODULES = ("vae", "clip", "base", "stage1", "stage2", "export")


def _python(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_stage_modules_do_not_import_the_runner():
    """runner -> stages only: importing every stage leaves the runner (and __main__) unimported."""
    code = ("import sys\n"
            + "".join(f"import anystory.training.{m}\n" for m in STAGE_MODULES)
            + "bad = [m for m in ('anystory.training.runner', 'anystory.training.__main__') if m in sys.modules]\n"
            + "print('IMPORTED', bad)\n")
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "IMPORTED []" in done.stdout


def test_a_stage_runs_alone_through_the_runner(tmp_path):
    """``python -m anystory.training.stage2`` runs stage 2 only: it asks for its input, not for other stages."""
    done = _python("-m", "anystory.training.stage2", "--config", SMOKE, "--set", f"work_dir={tmp_path}")
    assert done.returncode != 0
    assert "run the 'base' stage first" in done.stderr
    assert not (tmp_path / "stage1").exists() and not (tmp_path / "vae").exists()


def test_an_absent_base_model_is_named_through_the_loading_module(tmp_path):
    from anystory.loading import ModelUnavailableError
    from anystory.training.runner import run_stages

    missing = str(tmp_path / "no-sdxl-here")
    with pytest.raises(ModelUnavailableError, match="Pass a local folder"):
        run_stages(["--config", SMOKE, "--stages", "stage1", "--set", f"work_dir={tmp_path / 'run'}",
                    "--set", f"base_model={missing}"], log=lambda *_: None)
