"""Options several commands share are declared once (``anystory/cli_options.py``) and mean the same everywhere."""
import ast
import os

import pytest

from anystory import cli_options, generate
from anystory.presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: Flags that mean one thing in every command that has them; declared only in cli_options.
SHARED = ("--device", "--vram", "--anystory-weights", "--base-model", "--guidance", "--width", "--seed", "--threads",
          "--config", "--shape", "--classifier", "--format", "--per-shard")


def _sources():
    for top, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "shared", "site", "runs")]
        yield from (os.path.join(top, f) for f in files if f.endswith(".py"))


def _declared(path):
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant)):
            yield node.args[0].value, node.lineno


def test_shared_options_are_declared_only_in_cli_options():
    found = {flag for flag, _ in _declared(cli_options.__file__)}
    assert set(SHARED) <= found
    elsewhere = [f"{os.path.relpath(path, ROOT)}:{line} {flag}" for path in _sources()
                 if os.path.abspath(path) != os.path.abspath(cli_options.__file__)
                 for flag, line in _declared(path) if flag in SHARED]
    assert elsewhere == []


def test_the_scan_sees_declarations():
    assert "--prompt" in {flag for flag, _ in _declared(generate.__file__)}


def test_the_commands_parse_the_shared_groups_alike():
    from anystory.training.trajectory import main as trajectory_main
    from eval.run import _parser

    cli = generate.parse_args(["--prompt", "p", "--vram", "24", "--steps", "3", "--seed", "5"])
    run = _parser().parse_args(["--bench", "dreambench", "--steps", "3", "--seed", "5", "--device", "cpu"])
    assert (cli.vram, cli.steps, cli.seed, run.steps, run.seed) == ("24", 3, 5, 3, 5)
    assert cli.guidance is None and run.guidance is None  # the model's preset decides
    with pytest.raises(SystemExit):
        generate.parse_args(["--prompt", "p", "--vram", "12"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["--bench", "dreambench", "--device", "tpu"])
    with pytest.raises(SystemExit):  # --model is required: the miniature group's required form
        trajectory_main([])


def test_the_miniature_studies_sample_with_the_miniature_preset():
    import argparse

    p = argparse.ArgumentParser()
    cli_options.add_miniature_sampling(p)
    args = p.parse_args([])
    assert (args.steps, args.guidance, args.threads, args.model) == (
        PRESETS["miniature"].steps, PRESETS["miniature"].guidance, 1, None)


def test_help_names_every_models_preset(capsys):
    with pytest.raises(SystemExit):
        generate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for kind, name in (("flux", "FLUX"), ("sdxl", "SDXL"), ("miniature", "the miniature")):
        assert f"{PRESETS[kind].steps} for {name}" in text
