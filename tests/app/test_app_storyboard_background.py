"""Storyboard backgrounds: a story-level and a shot-level background parse, survive export (text and bundle), a
shot's own wins, reach each shot's pipeline call, and a bad one is named by its shot."""
import json
import os
import shutil

import pytest
from PIL import Image

from anystory.app import generation
from anystory.app.inputs import InputError
from anystory.app.models import ModelHandle
from anystory.presets import Preset
from anystory.app.storyboard import (ScriptError, dump_script, export_bundle, import_bundle, import_script,
                                     parse_script, plan_shots)
from anystory.app.storyboard_run import check_story, story_subjects
from anystory.app.storyboard_tab import unused_fields
from anystory.subjects import AlphaOrWholeImageSegmenter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")

SCRIPT = {
    "settings": {"seed": 7, "background": "beach.png", "background_start": 0.5},
    "characters": [{"alias": "star", "description": "a red star", "reference": "star.png"}],
    "shots": [{"prompt": "{star} on sand"},
              {"prompt": "{star} at night", "background": "night.png", "background_start": 2.0},
              {"prompt": "{star} in the dark", "background": "night.png"}],
}


@pytest.fixture
def story_dir(tmp_path):
    shutil.copy(STAR, tmp_path / "star.png")
    Image.new("RGB", (32, 32), (230, 210, 160)).save(tmp_path / "beach.png")
    Image.new("RGB", (32, 32), (10, 10, 40)).save(tmp_path / "night.png")
    (tmp_path / "script.json").write_text(json.dumps(SCRIPT))
    return tmp_path


def test_story_and_shot_backgrounds_parse_and_a_shot_overrides(story_dir):
    script, missing = import_script(str(story_dir / "script.json"), str(story_dir))
    assert missing == []
    subjects = story_subjects(script, AlphaOrWholeImageSegmenter())
    plans = plan_shots(script, subjects, 7)
    assert [os.path.basename(p.background) for p in plans] == ["beach.png", "night.png", "night.png"]
    assert [p.background_start for p in plans] == [0.5, 2.0, 0.5]  # a shot's own strength, else the story's
    assert plans[0].background_field == "Shot 1 background (settings.background)"
    assert plans[1].background_field == "Shot 2 background"
    assert "settings.background" not in unused_fields(script)  # the Storyboard tab has a field for the story's
    assert "shot 2 background" in unused_fields(script)  # a shot's own: scripts only


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_backgrounds_round_trip_in_the_script_text(fmt):
    script = parse_script(json.dumps(SCRIPT), "json")
    again = parse_script(dump_script(script, fmt), fmt)
    assert again.settings == script.settings and again.settings["background"] == "beach.png"
    assert [(s.background, s.background_start) for s in again.shots] == [(None, None), ("night.png", 2.0),
                                                                         ("night.png", None)]


def test_backgrounds_travel_in_a_bundle(story_dir, tmp_path_factory):
    script, _ = import_script(str(story_dir / "script.json"), str(story_dir))
    bundle = export_bundle(script, str(tmp_path_factory.mktemp("out") / "story.zip"))
    back, missing = import_bundle(bundle, str(tmp_path_factory.mktemp("in")))
    assert missing == []
    assert Image.open(back.settings["background"]).getpixel((0, 0)) == (230, 210, 160)
    assert Image.open(back.shots[1].background).getpixel((0, 0)) == (10, 10, 40)
    assert back.shots[0].background is None and back.settings["background_start"] == 0.5


@pytest.mark.parametrize("change, message", [
    ({"settings": {"background_start": -1}}, "settings background_start must be"),
    ({"shots": [{"prompt": "x", "background_start": "lots"}]}, "shot 1 background_start"),
    ({"shots": [{"prompt": "x", "background": 7}]}, "shot 1 background must be a file name"),
])
def test_bad_background_fields_are_named(change, message):
    with pytest.raises(ScriptError, match=message):
        parse_script(json.dumps(dict(SCRIPT, **change)), "json")


def test_a_missing_background_file_is_named_by_its_shot(story_dir):
    os.remove(story_dir / "night.png")
    with pytest.raises(ScriptError, match="shot 2 background: file not found: night.png"):
        import_script(str(story_dir / "script.json"), str(story_dir))


def test_each_shot_reaches_the_pipeline_with_its_background_or_is_refused_by_shot(story_dir, handle, monkeypatch):
    """The tiny model has no background weights: the first shot using one is named; a backdrop-capable stand-in
    (the tiny pipeline with a marker) gets each shot's own image and strength."""
    script, _ = import_script(str(story_dir / "script.json"), str(story_dir))
    seg = AlphaOrWholeImageSegmenter()
    with pytest.raises(InputError, match="^Shot 1 background \\(settings.background\\): the loaded weights have no"):
        check_story(handle, seg, script, steps=1)
    flux = ModelHandle("flux", object(), "cpu", "test", defaults=Preset(3, 3.5, 32, 32, 64, 16))
    with pytest.raises(InputError, match="^Shot 1 background \\(settings.background\\): the background reference is "
                                         "SDXL-only"):
        check_story(flux, seg, script, steps=1)
    monkeypatch.setattr(handle.pipe, "anystory", type("A", (), {"background": object()})(), raising=False)
    checked = [c for _, c in check_story(handle, seg, script, steps=1)]
    assert [Image.Image.getpixel(c.kwargs["background"], (0, 0)) for c in checked] == [(230, 210, 160),
                                                                                        (10, 10, 40), (10, 10, 40)]
    assert [c.kwargs["background_start"] for c in checked] == [0.5, 2.0, 0.5]


def test_the_storyboard_tab_imports_exports_and_runs_the_story_background(story_dir, handle, monkeypatch, tmp_path):
    import app
    from anystory.matting import LazyBiRefNetSegmenter

    blocks = app.build_demo(handle, LazyBiRefNetSegmenter(), out_root=str(tmp_path / "out"))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in blocks.fns.values()}
    imported = fns["on_import"](None, str(story_dir / "script.json"))
    background, strength, note = imported[-3:]
    assert os.path.basename(background) == "beach.png" and strength == 0.5
    assert "settings.background" not in note and "shot 2 background" in note
    chars = ["star", "a red star", str(story_dir / "star.png")] + ["", "", None] * 5
    rows = [["{star} on sand", "", ""]]
    files, status = fns["on_export"](None, "t", rows, 1, 2, background, 1.5, *chars)
    exported = parse_script(open(next(f for f in files if f.endswith(".yaml"))).read(), "yaml")
    assert status == "" and exported.settings["background_start"] == 1.5
    assert os.path.basename(exported.settings["background"]) == "beach.png"
    seen = []
    monkeypatch.setattr(app.storyboard_run, "storyboard_frames",
                        lambda handle, seg, script, *a, **k: seen.append(script.settings) or iter(()))
    list(fns["on_storyboard"](None, "t", rows, 1, 2, background, 1.5, *chars))
    assert seen and seen[0]["background"] == background and seen[0]["background_start"] == 1.5
