"""The docs' screenshots come from ``python -m benchmarks.app_screenshots`` (the real app in Chromium): the docs page
embeds every one it makes and names the command, the files exist and stay small, the command starts and says how
to use it, shrinking keeps a picture a picture, and an app that fails to start is reported with its exit code."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from benchmarks import app_screenshots as shots

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = os.path.join(ROOT, "docs", "assets", "screenshots")
#: The issue's bound on the docs' screenshots, all together.
MAX_TOTAL_BYTES = 1.5 * 2**20


def test_the_demo_page_embeds_every_screenshot_and_names_the_command():
    with open(os.path.join(ROOT, "docs", "demo.md"), encoding="utf-8") as f:
        page = f.read()
    assert "python -m benchmarks.app_screenshots --out docs/assets/screenshots" in page
    embedded = re.findall(r"!\[[^\]]*\]\(assets/screenshots/([\w.]+)\)", page)
    assert sorted(embedded) == sorted(shots.SHOTS)
    total = 0
    for name in shots.SHOTS:
        with Image.open(os.path.join(FOLDER, name)) as im:
            assert im.format == "PNG" and im.width >= 400 and im.height >= 150, (name, im.size)
        total += os.path.getsize(os.path.join(FOLDER, name))
    assert total < MAX_TOTAL_BYTES, total


def test_the_region_shot_waits_for_subject_1s_colour():
    from anystory.visualize import PALETTE

    assert shots.REGION_COLOUR == PALETTE[0]


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as done:
        shots.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--model", "--chromium", "--start-timeout"):
        assert option in text


def test_shrink_keeps_the_picture_in_fewer_colours(tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.full((120, 200, 3), 255, np.uint8)
    pixels[20:100, 20:180] = rng.integers(0, 256, (80, 160, 3), dtype=np.uint8) // 64 * 64  # 64 colours
    pixels[50:60, :] = (230, 25, 75)
    path = str(tmp_path / "shot.png")
    Image.fromarray(pixels).save(path)
    size = shots.shrink(path, colours=128)
    with Image.open(path) as im:
        assert im.mode == "P" and len(im.getcolors()) <= 128 and size == os.path.getsize(path)
        back = np.asarray(im.convert("RGB"))
    assert (back[55, 5] == (230, 25, 75)).all() and (back[5, 5] == 255).all()
    assert np.abs(back.astype(int) - pixels).mean() < 2  # 65 colours fit 128: nothing visible changes


def test_an_app_that_does_not_start_is_reported_with_its_exit_code(tmp_path):
    log = str(tmp_path / "app.log")
    with pytest.raises(RuntimeError, match="app.py exited with 2"):
        with shots.serve_app("no-such-model", log, timeout_s=300):
            pass
    assert "invalid choice" in open(log).read()
