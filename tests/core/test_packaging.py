"""pyproject.toml: a wheel built from the sources holds ``anystory`` and ``eval`` with their data, and the console
scripts it declares, installed from it, start and answer ``--help`` with the installed code (not the checkout's)."""
import configparser
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = {"anystory-generate": ("anystory.generate:main", "--prompt"),
           "anystory-train": ("anystory.training.runner:run_stages", "--config"),
           "anystory-eval": ("eval.run:main", "--bench")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools", minversion="77")  # the build backend; the test extra installs it
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("anystory", "eval"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, cwd=tmp)
    (path,) = list((tmp / "dist").glob("anystory-*.whl"))
    return path


def test_wheel_holds_both_packages_and_their_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("anystory/__init__.py", "anystory/sdxl/pipeline_sdxl.py", "anystory/flux/pipeline_flux.py",
                     "eval/run.py", "eval/dreambench_manifest.json"):
        assert expected in names, expected
    assert any(n.startswith("eval/loaders/") for n in names)
    assert not any(n.split("/")[0] in ("tests", "benchmarks", "docs") for n in names)


def test_wheel_declares_the_console_scripts(wheel):
    zf = zipfile.ZipFile(wheel)
    (entry,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(zf.read(entry).decode())
    assert dict(parser["console_scripts"]) == {name: target for name, (target, _) in SCRIPTS.items()}


def test_installed_console_scripts_answer_help(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                    str(target), str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    where = subprocess.run([sys.executable, "-c", "import anystory, eval; print(anystory.__file__, eval.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(target)) for path in where), where  # the wheel's copy, not the checkout
    runs = {name: subprocess.Popen([str(target / "bin" / name), "--help"], env=env, cwd=tmp_path, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for name in SCRIPTS}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        assert SCRIPTS[name][1] in out, (name, out[:500])
