"""app.py's wiring without a browser: the UI builds around a loaded model, the CLI fails clearly."""
import importlib
import os
import sys

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
from anystory.errors import InvalidInputError
from anystory.matting import LazyBiRefNetSegmenter


@pytest.fixture(scope="module")
def demo(handle):
    return app.build_demo(handle, LazyBiRefNetSegmenter()), handle


STAR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets", "examples",
                    "red_striped_star.png")


def test_ui_has_a_slot_per_subject_and_the_outputs(demo):
    blocks, handle = demo
    config = blocks.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    for i in range(1, handle.max_subjects + 1):
        assert f"subject-{i}-image" in ids and f"subject-{i}-name" in ids
    assert f"subject-{handle.max_subjects + 1}-image" not in ids
    for elem in ("prompt", "generate", "output-gallery", "routing-gallery", "routing-legend", "downloads",
                 "model-status", "matting-status", "shots", "generate-storyboard", "import-script"):
        assert elem in ids, elem
    status = next(c for c in config["components"] if c["props"].get("elem_id") == "model-status")
    assert "UNTRAINED" in status["props"]["value"] and "Why:" in status["props"]["value"]


def test_cli_defaults_are_local_and_not_shared():
    args = app.parse_args([])
    assert args.share is False and args.host is None and args.model in ("auto", "flux", "sdxl", "miniature", "tiny")


def test_cli_reports_an_unavailable_model_and_exits(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app.main(["--model", "flux"]) == 1
    assert "FLUX: no CUDA GPU" in capsys.readouterr().err


def test_gpu_decoration_only_with_spaces(monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # import fails: the plain function is used
    plain = importlib.reload(app)
    f = lambda: 1  # noqa: E731
    assert plain.gpu(f) is f

    class FakeSpaces:
        @staticmethod
        def GPU(duration):
            return lambda fn: ("on-gpu", duration, fn)

    monkeypatch.setitem(sys.modules, "spaces", FakeSpaces)
    spaced = importlib.reload(app)
    assert spaced.gpu(f) == ("on-gpu", 180, f)
    monkeypatch.setitem(sys.modules, "spaces", None)
    importlib.reload(app)


def test_uploads_reach_the_app_checks_undecoded(tmp_path):
    """Gradio's own gr.Image decodes an upload before any app code runs; a renamed text file raised there."""
    import gradio as gr
    from gradio.data_classes import ImageData

    from anystory.app.upload_image import UploadImage, editor_background

    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture")
    payload = ImageData(path=str(fake), orig_name="holiday.png")
    with pytest.raises(Exception):
        gr.Image(type="filepath", image_mode="RGB").preprocess(payload)
    upload = UploadImage(label="x", image_mode="RGB")
    assert upload.preprocess(payload) == str(fake) and upload.get_block_name() == "image"
    assert upload.preprocess(None) is None
    stored = tmp_path / "upload.png"  # on disk an upload has no name of the visitor's; messages still use theirs
    stored.write_text("not a picture")
    from anystory.app.inputs import InputError, load_image_file

    with pytest.raises(InputError, match="cannot read holiday.png as an image"):
        load_image_file(upload.preprocess(ImageData(path=str(stored), orig_name="holiday.png")), "Subject 1 image")
    assert editor_background(str(fake)) is None  # the mask editor stays empty; Generate names the problem
    good = tmp_path / "good.png"
    Image.new("RGB", (6, 4)).save(good)
    assert editor_background(str(good))["background"].size == (6, 4)
    import anystory.app.upload_image as module

    assert not os.path.exists(module.__file__[:-3] + ".pyi")  # no subclass: Gradio writes no stub beside it


def test_matting_status_is_read_at_each_page_load(demo):
    blocks, _ = demo
    status = next(b for b in blocks.blocks.values() if getattr(b, "elem_id", None) == "matting-status")
    assert callable(status.value) or getattr(status, "load_event_to_attach", None) is not None


def test_every_slider_says_what_it_does(demo):
    sliders = [c["props"] for c in demo[0].get_config_file()["components"] if c["type"] == "slider"]
    assert len(sliders) >= 2 * demo[1].max_subjects + 5
    for props in sliders:
        assert props.get("info") and len(props["info"]) > 20, props.get("label")


def test_each_slot_shows_the_mask_it_will_use_and_an_editor_to_replace_it(demo):
    ids = {c["props"].get("elem_id"): c for c in demo[0].get_config_file()["components"]}
    for i in range(1, demo[1].max_subjects + 1):
        assert ids[f"subject-{i}-mask-preview"]["type"] == "image"
        assert ids[f"subject-{i}-draw"]["type"] == "imageeditor"
        assert f"subject-{i}-mask-note" in ids
    assert ids["run-progress"]["type"] == "html"
    for gallery in ("output-gallery", "routing-gallery", "story-frames"):
        assert ids[gallery]["props"]["object_fit"] == "contain", gallery


def test_examples_cover_one_to_four_subjects_each_with_a_seed_and_real_files():
    assert sorted({row[0] for row in app.EXAMPLES}) == [1, 2, 3, 4]
    for subjects, mask, *images, prompt, seed in app.EXAMPLES + app.PHOTO_EXAMPLES:
        assert isinstance(seed, int) and seed >= 0 and prompt
        given = [p for p in images if p]
        assert len(given) == subjects and images[:subjects] == given  # filled slots first, none skipped
        assert all(os.path.isfile(p) for p in given + ([mask] if mask else []))


def test_synthetic_examples_name_backdrops_of_the_world_and_photo_examples_say_what_they_need(demo):
    from anystory.data.synthetic import BACKGROUNDS

    assert all(any(f"on {b}" in row[6] for b in BACKGROUNDS) for row in app.EXAMPLES)
    blocks, handle = demo
    labels = {c["props"].get("elem_id"): c["props"].get("label") for c in blocks.get_config_file()["components"]}
    assert "synthetic world" in labels["examples"] and "up to 3 subjects" in labels["examples"]
    assert handle.kind not in ("sdxl", "flux") and "need SDXL or FLUX weights" in labels["photo-examples"]
    assert "need SDXL or FLUX weights" in app._photo_examples_label("miniature")
    assert "need" not in app._photo_examples_label("sdxl") and "need" not in app._photo_examples_label("flux")


def test_the_example_story_ships_with_its_references():
    from anystory.app.storyboard import import_script

    script, missing = import_script(app.EXAMPLE_STORY, "/unused")
    assert missing == [] and len(script.shots) >= 3
    assert all(c.reference and os.path.isfile(c.reference) for c in script.characters)


def test_app_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        app.parse_args(["--help"])
    assert "(default: ZhengPeng7/BiRefNet)" in " ".join(capsys.readouterr().out.split())


def _handler(blocks, name):
    return next(f.fn for f in blocks.fns.values() if getattr(f.fn, "__name__", "") == name)


@pytest.mark.parametrize("raised, title, words", [
    (KeyError("latents"), "Internal error", "This is a bug in AnyStory, not a problem with your input (KeyError"),
    (ValueError("operands could not be broadcast"), "Internal error", "a bug in AnyStory"),
    (InvalidInputError("subject 1: mask is empty"), "Cannot generate", "subject 1: mask is empty"),
])
def test_generate_tells_a_bug_from_bad_input_and_keeps_the_outputs(demo, monkeypatch, raised, title, words):
    """Only input errors are the user's; anything else is reported as a bug (and logged). Either way every output
    is skipped, so the earlier results stay on the page."""
    import gradio as gr

    blocks, handle = demo
    told = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, title=None, duration=None: told.append((title, message)))

    def fails(*args, **kwargs):
        raise raised

    monkeypatch.setattr(app.generate_tab, "run_generation", fails)
    slot = [STAR, None, None, "star", 1.0, 1.0, "", None]
    out = list(_handler(blocks, "on_generate")(None, 1, "a star", "", 1, 2, 3.0, 64, 64, 1, None, None,
                                               *(slot * handle.max_subjects)))
    assert out[-1][:6] == [gr.skip()] * 6 and "earlier results are kept" in out[-1][6]
    assert len(told) == 1 and told[0][0] == title and words in told[0][1]
    assert "latents" not in told[0][1] and "broadcast" not in told[0][1]  # internals stay in the server log


def test_storyboard_tells_a_bug_from_bad_input(demo, monkeypatch):
    import gradio as gr

    blocks, handle = demo
    told = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, title=None, duration=None: told.append((title, message)))

    def fails(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'images'")
        yield  # a generator, as the real one

    monkeypatch.setattr(app.storyboard_run, "storyboard_frames", fails)
    chars = ["star", "a red star", STAR] + ["", "", None] * 5
    out = list(_handler(blocks, "on_storyboard")(None, "t", [["{star} on sand", "", ""]], 1, 2, None, None, *chars))
    assert out[-1][:2] == [gr.skip()] * 2 and out[-1][3] == gr.skip()
    assert told == [("Internal error", told[0][1])] and "AttributeError" in told[0][1]
    assert "Internal error" in out[-1][2] and "AttributeError" in out[-1][2]  # the status line says it too


def test_every_storyboard_script_error_is_in_the_status_line_as_well_as_the_toast(demo, monkeypatch, tmp_path):
    """Generate, export and import: the toast can be closed, the status line keeps the message."""
    blocks, _ = demo
    told = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, title=None, duration=None: told.append(message))
    chars = ["star", "a red star", STAR] + ["", "", None] * 5
    bad_rows = [["{moon} on sand", "", ""]]  # an alias no character has
    out = list(_handler(blocks, "on_storyboard")(None, "t", bad_rows, 1, 2, None, None, *chars))
    assert len(told) == 1 and told[0] in out[-1][2] and "moon" in out[-1][2]
    files, status = _handler(blocks, "on_export")(None, "t", bad_rows, 1, 2, None, None, *chars)
    assert len(told) == 2 and told[1] in status
    bad_yaml = tmp_path / "story.yaml"
    bad_yaml.write_text("title: t\nshots: [{prompt: '{moon} on sand'}]\n")
    imported = _handler(blocks, "on_import")(None, str(bad_yaml))
    assert len(told) == 3 and told[2] in imported[-1] and imported[-1].startswith("**Import failed:**")
    files, status = _handler(blocks, "on_export")(None, "t", [["{star} on sand", "", ""]], 1, 2, None, None, *chars)
    assert status == "" and len(files) == 3  # a good export clears the earlier message


def test_add_and_remove_shot_keep_the_typed_rows_and_the_three_columns(demo):
    from anystory.app.storyboard_tab import SHOT_COLUMNS, add_shot, remove_shot

    rows = [["{star} on sand", "star", ""], ["{star} in snow", None, "star: 0, 0, 0.5, 1"]]
    added = add_shot(rows)
    assert added == [["{star} on sand", "star", ""], ["{star} in snow", "", "star: 0, 0, 0.5, 1"], ["", "", ""]]
    assert remove_shot(added) == added[:2] and remove_shot(remove_shot(added)) == added[:1]
    assert remove_shot([["only", "", ""]]) == [["", "", ""]]  # one row always stays to type in
    table = next(b for b in blocks_of(demo) if getattr(b, "elem_id", None) == "shots")
    assert table.col_count == (len(SHOT_COLUMNS), "fixed")  # no column can be added or deleted


def blocks_of(demo):
    return demo[0].blocks.values()


def test_each_slot_has_a_region_canvas_of_the_output_shape_above_its_region_field(demo):
    from anystory.app.region_canvas import canvas_size

    blocks, handle = demo
    size = handle.defaults.size
    editors = {b.elem_id: b for b in blocks.blocks.values() if getattr(b, "elem_id", None)}
    for i in range(1, handle.max_subjects + 1):
        canvas, field = editors[f"subject-{i}-region-canvas"], editors[f"subject-{i}-region"]
        assert type(canvas).__name__ == "ImageEditor" and type(field).__name__ == "Textbox"
        assert canvas.value["background"] is not None and canvas.value["layers"] == []
    n = handle.max_subjects
    reshape = _handler(blocks, "_reshape")
    wide = reshape(2 * size, size, *[""] * n, *[None] * n)
    assert len(wide) == n and all(v["background"].size == canvas_size(2, 1) for v in wide)
    boxed = reshape(2 * size, size, "0, 0, 0.5, 1", *[""] * (n - 1), *wide)  # a typed box goes along
    first = np.asarray(boxed[0]["background"]).astype(int)
    assert (first[:, 0] < 225).any(axis=1).all() and (first[:, -1] >= 225).all()  # its left edge, not the right
    assert (np.asarray(boxed[1]["background"]) == np.asarray(wide[1]["background"])).all()
    on_text = _handler(blocks, "on_text")  # slot 1's: a typed box is shown; a half-typed one leaves the canvas
    assert (np.asarray(on_text(2 * size, size, "0, 0, 0.5, 1", wide[0])["background"]) == first).all()
    assert on_text(2 * size, size, "0, 0, 0.5", wide[0]) == gr.skip()
