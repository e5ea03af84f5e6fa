"""The demo's hostile-input suite: small requests that once cost gigabytes, minutes or a generic "Error" now get a
message naming the field, in bounded memory and time (issue 28; docs/demo-hardening.md)."""
import io
import json
import os
import tracemalloc
import types
import zipfile

import pytest
from PIL import Image

from anystory.app import storyboard_tab
from anystory.app.editor_limits import MAX_LAYERS, EditorValueError, LimitedEditor
from anystory.app.inputs import InputError
from anystory.app.storyboard import (MAX_BUNDLE_ENTRIES, MAX_SCRIPT_DEPTH, ScriptError, import_script, parse_script)
from helpers.hostile import alias_bomb

GOOD = {"characters": [{"alias": "cat", "description": "a cat"}], "shots": [{"prompt": "{cat} sleeps"}]}


def _peak_mb(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_yaml_aliases_are_refused_before_anything_is_built():
    errors = []

    def parse():
        with pytest.raises(ScriptError, match=r"aliases \(\*name\) are not allowed") as info:
            parse_script(alias_bomb(7), "yaml")
        errors.append(info)

    assert len(alias_bomb(7)) < 1000 and _peak_mb(parse) < 5 and errors


@pytest.mark.parametrize("fmt, text", [
    ("json", "[" * 20000 + "]" * 20000),
    ("yaml", "[" * 20000 + "]" * 20000),
    ("yaml", "".join(" " * k + "a:\n" for k in range(40))),
])
def test_nesting_is_bounded_with_a_message(fmt, text):
    with pytest.raises(ScriptError, match=f"nested too deeply .*{MAX_SCRIPT_DEPTH} levels"):
        parse_script(text, fmt)


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(settings={"seed": 2**70}), "settings.seed must be an integer between -1 and 2147483647"),
    (lambda d: d.update(settings={"steps": 10**6}), "settings.steps must be an integer between 1 and 100"),
    (lambda d: d.update(settings={"guidance": float("nan")}), "settings.guidance must be finite"),
    (lambda d: d["shots"][0].update(seed=-5), "shot 1 seed must be an integer between -1"),
    (lambda d: d.update(title="t" * 300), "the title is too long: 300 characters"),
    (lambda d: d["characters"][0].update(description={"a": 1}), "character 'cat' description must be text"),
    (lambda d: d["characters"][0].update(alias="c" * 300), "character 1 alias is too long"),
    (lambda d: d["characters"][0].update(reference=[1, 2]), "character 'cat' reference must be a file name"),
])
def test_imported_numbers_and_texts_obey_the_forms_ranges(change, words):
    data = json.loads(json.dumps(GOOD))
    change(data)
    with pytest.raises(ScriptError, match=words.replace("(", r"\(").replace("*", r"\*")):
        parse_script(json.dumps(data), "json")


def test_a_script_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "story.yaml"
    path.write_bytes("title: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ScriptError, match="story.yaml is not UTF-8 text"):
        import_script(str(path), str(tmp_path / "out"))


def _zip(path, entries):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            if isinstance(data, zipfile.ZipInfo):
                z.writestr(data, name)
            else:
                z.writestr(name, data)
    return str(path)


def test_bundles_are_bounded_in_entries_and_kinds_and_a_broken_one_is_named(tmp_path):
    script = json.dumps(GOOD)
    many = _zip(tmp_path / "many.zip", [("script.json", script)] + [(f"f{k}.txt", "x") for k in range(MAX_BUNDLE_ENTRIES)])
    with pytest.raises(ScriptError, match=f"{MAX_BUNDLE_ENTRIES + 1} files"):
        import_script(many, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "f0.txt")
    link = zipfile.ZipInfo("references/cat.png")
    link.external_attr = (0o120777 << 16)
    linked = _zip(tmp_path / "link.zip", [("script.json", script), ("/etc/passwd", link)])
    with pytest.raises(ScriptError, match="contains a link"):
        import_script(linked, str(tmp_path / "b"))
    good = _zip(tmp_path / "good.zip", [("script.json", script)])
    broken = tmp_path / "broken.zip"
    blob = bytearray(open(good, "rb").read())
    blob[40:60] = b"\0" * 20  # inside the compressed script
    broken.write_bytes(bytes(blob))
    with pytest.raises(ScriptError, match="broken.zip is (damaged|not a valid)"):
        import_script(str(broken), str(tmp_path / "c"))
    with pytest.raises(ScriptError, match="not a valid .zip"):
        (tmp_path / "text.zip").write_text("hello")
        import_script(str(tmp_path / "text.zip"), str(tmp_path / "d"))


def _big_png(tmp_path, w=8000, h=8000) -> str:
    """An 8000x8000 PNG of a few hundred KB: cheap to send, 1.5 GB once Gradio decodes it."""
    path = tmp_path / "big.png"
    Image.new("1", (w, h)).save(path)
    return str(path)


def _editor():
    return LimitedEditor(label="Paint over the subject", type="pil", sources=[], layers=False, transforms=[])


def test_an_editor_value_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path):
    from gradio.components.image_editor import EditorData
    from gradio.data_classes import FileData

    big = _big_png(tmp_path)
    editor = _editor()
    for value in (EditorData(background=FileData(path=big)), EditorData(layers=[FileData(path=big)])):
        def run():
            with pytest.raises(EditorValueError, match=r"Paint over the subject \((background|layer 1)\): the image "
                                                       r"is 8000x8000 pixels; the limit is 4096x4096"):
                editor.preprocess(value)
        assert _peak_mb(run) < 20
    small = tmp_path / "small.png"
    Image.new("RGBA", (32, 32)).save(small)
    out = editor.preprocess(EditorData(background=FileData(path=str(small)), layers=[FileData(path=str(small))]))
    assert out["background"].size == (32, 32) and len(out["layers"]) == 1


def _blob(kind, index, data, id_="x"):
    return types.SimpleNamespace(data={"type": kind, "index": index, "id": id_}, files=[("blob", data)])


def test_the_editor_blob_endpoint_is_bounded(tmp_path):
    editor = _editor()
    png = io.BytesIO()
    Image.new("RGBA", (16, 16)).save(png, format="PNG")
    with pytest.raises(EditorValueError, match=f"layer 100000000; at most {MAX_LAYERS} layers"):
        editor.accept_blobs(_blob("layer", "100000000", png.getvalue()))
    with pytest.raises(EditorValueError, match="8000x8000"):
        editor.accept_blobs(_blob("background", None, open(_big_png(tmp_path), "rb").read()))
    with pytest.raises(EditorValueError, match="unknown part"):
        editor.accept_blobs(_blob("script", None, png.getvalue()))
    assert not editor.blob_storage
    editor.accept_blobs(_blob("layer", "0", png.getvalue()))
    assert len(editor.blob_storage["x"].layers) == 1
    assert getattr(editor.accept_blobs, "_is_server_fn", False)  # still reachable from the page


@pytest.mark.parametrize("settings, words", [
    ({"steps": "abc"}, "Steps must be an integer"),
    ({"steps": float("nan")}, "Steps must be finite"),
    ({"seed": float("nan")}, "Story seed must be finite"),
    ({"seed": 2**70}, "Story seed must be an integer between -1"),
])
def test_the_storyboard_forms_numbers_are_named(settings, words):
    with pytest.raises(InputError, match=words):
        storyboard_tab.script_from_ui(["cat", "a cat", None] + ["", "", None] * 5, [["{cat} sleeps", "", ""]], "t",
                                      settings)


STAR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets", "examples",
                    "red_striped_star.png")


def test_work_is_bounded_by_a_budget_with_a_message(handle, monkeypatch):
    from anystory.app import generation, jobs, storyboard_run
    from anystory.app.storyboard import script_from_dict
    from anystory.subjects import AlphaOrWholeImageSegmenter

    big = generation.Request("a star", [], steps=100, num_images=4)
    assert generation.check_request(handle, big).kwargs["num_inference_steps"] == 100  # 400: within the budget
    monkeypatch.setenv(jobs.MAX_WORK_ENV, "300")
    with pytest.raises(InputError, match=r"Work budget: this request needs 400 denoising steps \(100 steps x 4 images\); "
                                         "one request may use at most 300"):
        generation.check_request(handle, big)
    monkeypatch.delenv(jobs.MAX_WORK_ENV)
    story = script_from_dict({"characters": [{"alias": "cat", "reference": STAR}],
                              "shots": [{"prompt": "{cat} on sand"}] * 64})
    segmenter = AlphaOrWholeImageSegmenter()
    with pytest.raises(InputError, match=r"6400 denoising steps \(100 steps x 64 shots\); one request may use at most "
                                         f"{jobs.DEFAULT_MAX_WORK}"):
        storyboard_run.check_story(handle, segmenter, story, steps=100)


def test_a_job_whose_browser_left_stops_within_one_step(handle):
    """Gradio closes the generator of a client that went away; the model's worker thread then stops at its next
    step instead of running to the end while the next visitor waits."""
    import threading

    from anystory.app import generate_tab
    from anystory.app.inputs import SubjectSlot
    from anystory.app.progress import Status, follow
    from anystory.subjects import AlphaOrWholeImageSegmenter

    seen, ended, outcome = [], threading.Event(), {}

    def work(tracker):
        def progress(k, n):
            seen.append(k)
            tracker.step(k, n)
        try:
            outcome["result"] = generate_tab.run_generation(handle, AlphaOrWholeImageSegmenter(), [SubjectSlot(STAR)],
                                                            "a star", steps=60, progress=progress)
        except BaseException as e:
            outcome["error"] = e
            raise
        finally:
            ended.set()

    reader = follow(work)
    for item in reader:
        if isinstance(item, Status) and item.stage == "denoising" and item.step >= 2:
            break
    at_close = max(seen)
    reader.close()  # what Gradio's reset of a disconnected client's iterator does
    assert ended.wait(60)
    assert type(outcome.get("error")).__name__ == "Cancelled" and "result" not in outcome
    assert max(seen) <= at_close + 1 < 60


def test_a_session_holds_at_most_one_job_in_the_queue(handle):
    import asyncio

    import app
    from anystory.app.jobs import BUSY_MESSAGE, SessionJobs, one_job_per_session
    from anystory.matting import LazyBiRefNetSegmenter

    demo = app.build_demo(handle, LazyBiRefNetSegmenter())
    demo.queue(default_concurrency_limit=1, max_size=32)
    queue = demo._queue
    admitted = []

    async def original(body, request, username):
        admitted.append(body.session_hash)
        return True, "id", "success"

    queue.push = original
    one_job_per_session(demo, demo.anystory_heavy, demo.anystory_jobs)
    index = {f.fn.__name__: i for i, f in demo.fns.items() if hasattr(f.fn, "__name__")}
    generate, storyboard, preview = index["on_generate"], index["on_storyboard"], index["on_image_mask"]
    queue.event_queue_per_concurrency_id["x"] = types.SimpleNamespace(
        queue=[types.SimpleNamespace(session_hash="a", fn=demo.fns[generate])])  # a's job waits in the queue

    def push(fn_index, session):
        return asyncio.run(queue.push(types.SimpleNamespace(fn_index=fn_index, session_hash=session), None, None))

    assert push(storyboard, "a") == (False, BUSY_MESSAGE, "error")
    assert push(generate, "a")[0] is False
    assert push(preview, "a")[0] and push(generate, "b")[0]  # light events, and other sessions, pass
    queue.event_queue_per_concurrency_id.pop("x")
    running = demo.anystory_jobs.start(types.SimpleNamespace(session_hash="b"))  # b's job runs
    assert push(storyboard, "b")[0] is False and push(generate, "a")[0]
    demo.anystory_jobs.finish(types.SimpleNamespace(session_hash="b"), running)
    assert push(generate, "b")[0]
    assert admitted == ["a", "b", "a", "b"]
    jobs = SessionJobs()
    flags = [jobs.start(types.SimpleNamespace(session_hash="a")) for _ in range(2)]
    other = jobs.start(types.SimpleNamespace(session_hash="b"))
    assert jobs.cancel(types.SimpleNamespace(session_hash="a")) == 2 and all(f.is_set() for f in flags)
    assert not other.is_set()


@pytest.fixture(scope="module")
def page(handle):
    import app
    from anystory.matting import LazyBiRefNetSegmenter

    return app.build_demo(handle, LazyBiRefNetSegmenter()), handle


def _handler(demo, name):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def _told(monkeypatch):
    import app

    told = []
    monkeypatch.setattr(app.gr, "Warning", lambda message, title=None, duration=None: told.append(message))
    return told


@pytest.mark.parametrize("count, seed, steps, name, words", [
    (float("nan"), 1, 2, "star", "Subjects must be finite"),
    (1, float("nan"), 2, "star", "Seed must be an integer"),
    (1, float("inf"), 2, "star", "Seed must be an integer"),
    (1, 1, "abc", "star", "Steps must be an integer"),
    (1, 1, 2, "n" * 300, "Subject 1 name is too long: 300 characters; the limit is 64"),
])
def test_generate_names_the_field_of_every_bad_value(page, monkeypatch, count, seed, steps, name, words):
    demo, handle = page
    told = _told(monkeypatch)
    slot = [STAR, None, None, name, 1.0, 1.0, "", None]
    list(_handler(demo, "on_generate")(None, count, "a star", "", seed, steps, 3.0, None, None, 1, None, None,
                                       *(slot * handle.max_subjects)))
    assert len(told) == 1 and words in told[0], told


def test_the_forms_numbers_reach_the_app_as_sent(page):
    demo, _ = page
    numbers = [b for b in demo.blocks.values() if type(b).__name__ in ("Number", "Slider")]
    assert numbers and all(b.preprocess("abc") == "abc" for b in numbers)


def test_storyboard_names_a_bad_story_seed(page, monkeypatch):
    demo, _ = page
    told = _told(monkeypatch)
    chars = ["star", "a red star", STAR] + ["", "", None] * 5
    list(_handler(demo, "on_storyboard")(None, "t", [["{star} on sand", "", ""]], "lucky", 2, None, None, *chars))
    assert len(told) == 1 and "Story seed must be a" in told[0], told


def test_an_import_says_which_fields_the_page_cannot_use(page, tmp_path):
    demo, _ = page
    script = dict(GOOD, settings={"guidance": 4.0, "seed": 3}, shots=[{"prompt": "{cat} sleeps", "seed": 5,
                                                                       "negative_prompt": "blur"}])
    path = tmp_path / "story.json"
    path.write_text(json.dumps(script))
    out = _handler(demo, "on_import")(None, str(path))
    assert "will not use: settings.guidance, shot 1 seed, shot 1 negative_prompt." in out[-1]
    assert out[-5] == 3  # the story seed is a field: kept (then steps, background, its strength, the note)
