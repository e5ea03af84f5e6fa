"""The colour metric (no weights): the Bhattacharyya coefficient of RGB histograms, opt-in, and the README's offline
quickstart, which scores with it, run as written (its DreamBench path resolved from the repository root)."""
import math
import os
import re
import shlex

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from eval.metrics import METRIC_NAMES, MetricSettings, build_metrics, load_metrics
from eval.metrics.colour import ColourHistogramEmbedder, colour_histogram
from eval.run import default_metric_names, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _solid(*colours, size=(64, 32)):
    """Vertical stripes of equal width, one per colour."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    for k, colour in enumerate(colours):
        pixels[:, k * size[0] // len(colours): (k + 1) * size[0] // len(colours)] = colour
    return Image.fromarray(pixels)


def test_the_coefficient_of_colour_distributions():
    red, blue, white = (220, 20, 60), (20, 60, 220), (255, 255, 255)
    embed = ColourHistogramEmbedder().embed_images
    a, b, half, mirrored, big = embed([_solid(red), _solid(blue), _solid(red, white), _solid(white, red),
                                       _solid(red, white, size=(1024, 768))])
    assert np.linalg.norm(a) == pytest.approx(1.0) and float(a @ a) == pytest.approx(1.0)
    assert float(a @ b) == 0.0  # no colour in common
    assert float(a @ half) == pytest.approx(math.sqrt(0.5), abs=1e-6)  # sum sqrt(p q) = sqrt(1 * 0.5)
    assert float(half @ mirrored) == pytest.approx(1.0, abs=1e-6)  # where the colours are does not count
    assert float(half @ big) == pytest.approx(1.0, abs=0.01)  # nor the picture's size (edges blend when binned)
    hist = colour_histogram(_solid(red, blue, white, white))
    assert hist.sum() == pytest.approx(1.0) and sorted(hist[hist > 0]) == pytest.approx([0.25, 0.25, 0.5])


def test_colour_is_opt_in_and_needs_nothing_to_load():
    assert "colour" in METRIC_NAMES
    for bench in ("dreambench", "dreambench-multi", "faces"):
        assert "colour" not in default_metric_names(bench)
    usable, unavailable = load_metrics(build_metrics(MetricSettings(names=["colour"])))
    assert [m.name for m in usable] == ["colour"] and unavailable == {}
    assert usable[0].columns == ["colour", "colour_ref"] and usable[0].describe()["weights"] == "none"


def _readme_quickstart() -> list:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("### Evaluation, offline"):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_the_readme_quickstart_runs_offline_and_prints_numbers(dreambench_dir, tmp_path, capsys, monkeypatch):
    """The command as the README gives it (only --out moved to a temporary folder), in this process with the hub
    off: it generates with the miniature, scores with colour, exits 0 and prints the table."""
    argv = _readme_quickstart()
    assert argv[:3] == ["python", "-m", "eval.run"]
    args = argv[3:]
    assert args[args.index("--data-dir") + 1] == "../shared/data/dreambench"
    args[args.index("--out") + 1] = str(tmp_path / "run")
    monkeypatch.chdir(ROOT)  # the README's relative data path, from the repository root
    assert os.path.samefile(os.path.join(ROOT, "..", "shared", "data", "dreambench"), dreambench_dir)
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0, out
    table = pd.read_csv(tmp_path / "run" / "per_method.csv")
    assert list(table["method"]) == ["anystory-miniature", "real-images"]
    assert ((table["colour"] > 0) & (table["colour"] <= 1)).all() and (table["colour_n"] == 2).all()
    assert "anystory-miniature" in out and "report:" in out
