"""The demo in a real browser: Debian's headless Chromium driven by Playwright against ``python app.py``.

Runs the miniature when it is installed (the tiny untrained pipeline otherwise, which exercises the same UI and
code path). Skips when Chromium is absent; `.ci/run` installs it. Screenshots land in tests/outputs/. One server
for the module; every test opens its own fresh page, so none depends on another's state.
"""
import io
import os
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

import app as demo_app
from anystory.app.environment import miniature_status
from anystory.subjects import AlphaOrWholeImageSegmenter
from anystory.app.colours import MIN_DISTANCE, distances
from anystory.app.visualize import PALETTE, dominant_color
from benchmarks.app_screenshots import serve_app

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "outputs")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")
#: Records every visible text the progress line shows (a MutationObserver), so a test sees stages that pass quickly.
WATCH_PROGRESS = """() => { window.__progress = [];
  new MutationObserver(() => {
    const el = document.querySelector('#run-progress');
    if (!el) return;
    const text = [...el.querySelectorAll('*')].filter(e => e.offsetParent !== null && e.children.length === 0)
                     .map(e => e.textContent.trim()).filter(t => t).join(' | ');
    if (text && window.__progress[window.__progress.length - 1] !== text) window.__progress.push(text);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
CAT = os.path.join(ROOT, "assets", "examples", "cat.png")

pytestmark = pytest.mark.skipif(not os.path.isfile(CHROMIUM), reason=f"Chromium not found at {CHROMIUM}")
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def app():
    """``app.py`` on 127.0.0.1 as the docs' screenshot command starts it (benchmarks/app_screenshots.py)."""
    model = "miniature" if miniature_status().available else "tiny"
    os.makedirs(OUT, exist_ok=True)
    with serve_app(model, os.path.join(OUT, "app_browser_server.log")) as url:  # a failed start names its log
        yield url, model


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(app, browser):
    """A fresh page per test."""
    pg = browser.new_page(viewport={"width": 1400, "height": 1600})
    pg.goto(app[0])
    pg.wait_for_selector("#generate", timeout=60_000)
    yield pg
    pg.close()


def test_bad_input_shows_a_message(page):
    page.click("#generate")
    sync_api.expect(page.get_by_text("No subject image: upload at least one reference image.")).to_be_visible(timeout=30_000)


def test_upload_two_subjects_generate_and_see_the_routing_overlay(page, app):
    model = app[1]
    sync_api.expect(page.locator("#model-status")).to_contain_text(model if model == "miniature" else "UNTRAINED")
    page.locator("#subject-1-image input[type=file]").set_input_files(STAR)
    page.locator("#subject-2-image input[type=file]").set_input_files(CAT)
    page.locator("#subject-1-name textarea, #subject-1-name input").first.fill("star")
    page.locator("#subject-2-name textarea, #subject-2-name input").first.fill("cat")
    page.locator("#prompt textarea").fill("a red striped star and a cat on sand")
    sync_api.expect(page.locator("#subject-2-image img").first).to_be_visible(timeout=30_000)
    page.click("#generate")

    output = page.locator("#output-gallery img").first
    overlay = page.locator("#routing-gallery img").first
    sync_api.expect(output).to_be_visible(timeout=240_000)
    sync_api.expect(overlay).to_be_visible(timeout=30_000)
    for img in (output, overlay):  # really decoded, not a broken link
        _loaded(img)
        assert img.evaluate("el => el.naturalWidth") > 0
    assert page.locator("#routing-gallery img").count() >= 2  # the overlay and the map alone
    sync_api.expect(page.locator("#routing-legend")).to_contain_text("star")
    sync_api.expect(page.locator("#routing-legend")).to_contain_text("cat")
    sync_api.expect(page.locator("#run-info")).to_contain_text("Seed")
    sync_api.expect(page.locator("#run-info")).to_contain_text("2 subject(s)")
    sync_api.expect(page.locator("#downloads")).to_contain_text("_routing")
    page.wait_for_timeout(500)
    page.screenshot(path=os.path.join(OUT, "app_browser.png"), full_page=True)

    # a bad second run names the problem and leaves the first run's results in place
    page.locator("#prompt textarea").fill(" ".join(["a very long prompt"] * 30))
    page.click("#generate")
    sync_api.expect(page.get_by_text("Prompt is too long")).to_be_visible(timeout=30_000)
    sync_api.expect(output).to_be_visible()
    sync_api.expect(overlay).to_be_visible()
    sync_api.expect(page.locator("#output-gallery").get_by_text("Error", exact=True)).to_have_count(0)


def _import_example_bundle(page, tmp_path):
    """On the Storyboard tab, import the example story as an exported .zip bundle (references inside)."""
    from anystory.app.storyboard import export_bundle, import_script

    script, missing = import_script(os.path.join(ROOT, "assets", "examples", "storyboard.yaml"), "/unused")
    assert missing == []
    bundle = export_bundle(script, str(tmp_path / "story.zip"))
    page.get_by_role("tab", name="Storyboard").click()
    page.locator("#import-script input[type=file]").set_input_files(bundle)
    sync_api.expect(page.locator("#story-status")).to_contain_text("2 characters, 3 shots", timeout=30_000)


def _generate_one(page, image=STAR, prompt="a red striped star on sand"):
    """One generation on the Generate tab of this page; returns the first output image's locator."""
    page.locator("#subject-1-image input[type=file]").set_input_files(image)
    page.locator("#prompt textarea").fill(prompt)
    page.click("#generate")
    output = page.locator("#output-gallery img").first
    sync_api.expect(output).to_be_visible(timeout=240_000)
    return output


def test_storyboard_import_bundle_and_generate_three_frames(page, tmp_path):
    _import_example_bundle(page, tmp_path)
    page.click("#generate-storyboard")
    sync_api.expect(page.locator("#story-status")).to_contain_text("3 of 3 frames, seed 7", timeout=240_000)
    assert page.locator("#story-frames img").count() == 3
    page.screenshot(path=os.path.join(OUT, "app_browser_storyboard.png"), full_page=True)


def test_add_and_remove_subject_slots(page):
    third = page.locator("#subject-3-image")
    sync_api.expect(third).to_be_hidden()
    page.click("#add-subject")
    sync_api.expect(third).to_be_visible(timeout=10_000)
    page.click("#remove-subject")
    sync_api.expect(third).to_be_hidden(timeout=10_000)


def test_a_file_that_is_no_image_gets_a_message_and_earlier_results_stay(page, tmp_path):
    """A text file renamed .png, on both tabs: the app's message, no Error badge, the previous outputs kept."""
    fake = tmp_path / "holiday.png"
    fake.write_text("this is a text file, not a picture")
    output = _generate_one(page)  # a result to keep
    before = output.get_attribute("src")

    page.locator("#subject-1-image input[type=file]").set_input_files(str(fake))
    page.locator("#prompt textarea").fill("a red striped star on sand")
    page.wait_for_timeout(1000)  # the upload's change event settles
    page.click("#generate")
    message = page.get_by_text("cannot read holiday.png as an image").first
    sync_api.expect(message).to_be_visible(timeout=30_000)
    sync_api.expect(output).to_be_visible()
    assert output.get_attribute("src") == before
    for gallery in ("#output-gallery", "#routing-gallery"):
        sync_api.expect(page.locator(gallery).get_by_text("Error", exact=True)).to_have_count(0)
    page.screenshot(path=os.path.join(OUT, "app_browser_bad_file.png"), full_page=True)

    _import_example_bundle(page, tmp_path)
    frames = page.locator("#story-frames img").count()
    page.locator("#char-1-ref input[type=file]").set_input_files(str(fake))
    page.wait_for_timeout(1000)
    page.click("#generate-storyboard")
    toast = page.get_by_text("image: cannot read holiday.png as an image").filter(visible=True)  # not slot 1's note
    sync_api.expect(toast.first).to_be_visible(timeout=30_000)
    assert page.locator("#story-frames img").count() == frames
    sync_api.expect(page.locator("#story-frames").get_by_text("Error", exact=True)).to_have_count(0)


def test_matting_status_stays_true_after_a_reload(page):
    """After a generation tried BiRefNet (absent: the hub is off), a reloaded page still says what was found."""
    status = page.locator("#matting-status")
    _generate_one(page, CAT, "a cat on sand")  # a photo without alpha: the matting is tried
    sync_api.expect(status).to_contain_text("unavailable", timeout=30_000)
    page.reload()
    page.wait_for_selector("#generate", timeout=60_000)
    sync_api.expect(page.locator("#matting-status")).to_contain_text("unavailable", timeout=30_000)
    sync_api.expect(page.locator("#matting-status")).to_contain_text("alpha channel")


def _loaded(img):
    """Wait until a gallery image has loaded: they are lazy (``img.decode()`` of one off screen never settles)."""
    img.scroll_into_view_if_needed()
    sync_api.expect(img).to_have_js_property("complete", True, timeout=30_000)


def _example(page, subjects: int):
    """Click the first example row with ``subjects`` subjects; returns that row of app.EXAMPLES."""
    rows = [r for r in demo_app.EXAMPLES if r[0] <= 4]
    k = next(i for i, r in enumerate(rows) if r[0] == subjects)
    page.locator("#examples tbody tr").nth(k).click()
    return rows[k]


def test_mask_editor_opens_with_the_brush_and_every_mask_is_previewed(page):
    page.locator("#subject-1-image input[type=file]").set_input_files(STAR)
    note = page.locator("#subject-1-mask-note")
    sync_api.expect(note).to_contain_text("Mask: automatic (alpha)", timeout=30_000)  # shown before generating
    sync_api.expect(page.locator("#subject-1-mask-preview img")).to_be_visible()
    # the section starts folded (one screen for a newcomer); a new image opens it, then reaches the editor
    canvas = page.locator("#subject-1-draw canvas").first
    sync_api.expect(canvas).to_be_visible(timeout=10_000)
    brush = page.locator("#subject-1-draw button[aria-label=Brush]")
    sync_api.expect(brush).to_have_class(re.compile("highlight"), timeout=10_000)  # selected, nobody clicked it
    page.wait_for_timeout(500)
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 30, y - 30)  # strokes straight away, as a new user draws
    page.mouse.down()
    for k in range(20):
        page.mouse.move(x - 30 + 3 * k, y - 30 + 3 * k)
    page.mouse.up()
    sync_api.expect(note).to_contain_text("Mask: drawn mask", timeout=30_000)
    page.screenshot(path=os.path.join(OUT, "app_browser_mask.png"), full_page=True)


def test_four_subjects_sharp_outputs_per_subject_overlays_contrasting_legend_and_staged_progress(page, app):
    _, _, *images, prompt, seed = _example(page, 4)
    sync_api.expect(page.locator("#subject-4-image img").first).to_be_visible(timeout=30_000)  # the slot was shown
    for i in range(1, 5):  # the automatic masks, before anything is generated
        sync_api.expect(page.locator(f"#subject-{i}-mask-note")).to_contain_text("Mask: automatic", timeout=30_000)
    page.evaluate(WATCH_PROGRESS)
    page.click("#generate")
    sync_api.expect(page.locator("#run-progress")).to_contain_text("done", timeout=240_000)
    seen = page.evaluate("window.__progress")
    assert seen[0].startswith("starting"), seen  # fast stages (matting an alpha channel) may pass between frames
    assert any(re.search(r"step \d+/\d+ · about [\d.]+ s left", t) for t in seen), seen
    assert not any(re.search(r"\d+\.\d+/\d+\.\d+s", t) for t in seen), seen  # no timer averaged over other runs

    output = page.locator("#output-gallery img").first
    sync_api.expect(output).to_be_visible(timeout=30_000)
    _loaded(output)
    natural = output.evaluate("el => [el.naturalWidth, el.naturalHeight]")
    assert natural[0] == natural[1] and natural[0] >= 384  # enlarged for the page, square kept square
    assert output.evaluate("el => getComputedStyle(el).objectFit") == "contain"  # never cropped into the box
    label = re.search(r"(\d+)x(\d+) \(shown (\d+)x, nearest-neighbour\)", page.locator("#output-gallery").inner_text())
    assert label and int(label[1]) * int(label[3]) == natural[0], label  # labelled with the real size
    sync_api.expect(page.locator("#routing-gallery img")).to_have_count(1 + 4 + 1)  # all, each subject, the map
    for i in range(1, 5):
        sync_api.expect(page.locator("#routing-gallery")).to_contain_text(f"only subject {i}")
    legend = page.locator("#routing-legend")
    sync_api.expect(legend.locator("img")).to_have_count(4)  # each subject's thumbnail beside its colour
    html = legend.inner_html()
    keys = [tuple(int(v) for v in m) for m in re.findall(r"border:3px solid rgb\((\d+),(\d+),(\d+)\)", html)]
    assert len(keys) == 4 and len(set(keys)) == 4 and all(k in PALETTE for k in keys)
    for path, key in zip(images, keys):
        with Image.open(path) as im:
            own = dominant_color(im, AlphaOrWholeImageSegmenter()(im))
        assert distances([own], [key])[0, 0] >= MIN_DISTANCE, (path, own, key)  # CIEDE2000
    assert (distances(keys, keys) + np.eye(4) * 1e9).min() >= MIN_DISTANCE, keys
    page.screenshot(path=os.path.join(OUT, "app_browser_four_subjects.png"), full_page=True)

    # a second run: its line starts afresh and never shows a timer carried over from the first run
    page.evaluate("window.__progress = []")
    page.click("#generate")
    page.wait_for_function("window.__progress.some(t => t.startsWith('starting'))", timeout=60_000)
    page.wait_for_function("window.__progress.some(t => t.startsWith('done'))", timeout=240_000)
    assert not any(re.search(r"\d+\.\d+/\d+\.\d+s", t) for t in page.evaluate("window.__progress"))
    sync_api.expect(page.locator("#run-info")).to_contain_text(f"Seed {seed}")  # the example's fixed seed


def test_examples_set_the_subject_count_and_a_fixed_seed(page):
    for subjects in (1, 3, 2):
        *_, seed = _example(page, subjects)
        for i in range(1, 5):
            slot = page.locator(f"#subject-{i}-image")
            if i <= subjects:
                sync_api.expect(slot).to_be_visible(timeout=60_000)
            else:
                sync_api.expect(slot).to_be_hidden(timeout=60_000)
    page.locator("#settings").get_by_text("Settings").first.click()
    sync_api.expect(page.locator("#seed input")).to_have_value(str(seed))
    sync_api.expect(page.get_by_text(demo_app.SLIDER_HELP["guidance"])).to_be_visible()  # slider help, one line
    sync_api.expect(page.get_by_text(demo_app.SLIDER_HELP["scale"]).first).to_be_visible()


def test_subject_limit_says_so(page):
    for n in (3, 4):
        page.click("#add-subject")
        sync_api.expect(page.locator(f"#subject-{n}-image")).to_be_visible(timeout=30_000)
    sync_api.expect(page.locator("#add-subject")).to_contain_text("Limit: 4 subjects")
    page.click("#add-subject")
    sync_api.expect(page.get_by_text("Subject limit reached: this model takes at most 4 subjects").first).to_be_visible(
        timeout=30_000)
    page.screenshot(path=os.path.join(OUT, "app_browser_subject_limit.png"), full_page=False)


def test_one_click_story_example_renders_captioned_frames(page):
    page.get_by_role("tab", name="Storyboard").click()
    page.click("#story-example")
    sync_api.expect(page.locator("#story-status")).to_contain_text("2 characters, 3 shots", timeout=30_000)
    sync_api.expect(page.locator("#story-status")).not_to_contain_text("Upload the reference")  # they ship with it
    page.evaluate(WATCH_PROGRESS.replace("#run-progress", "#story-progress"))
    page.click("#generate-storyboard")
    sync_api.expect(page.locator("#story-status")).to_contain_text("3 of 3 frames", timeout=240_000)
    sync_api.expect(page.locator("#story-frames img")).to_have_count(3)
    sync_api.expect(page.locator("#story-progress")).to_contain_text("done", timeout=30_000)
    seen = page.evaluate("window.__progress")
    assert any(re.search(r"step \d+/\d+ \(frame [123]/3\) · ", t) for t in seen), seen  # the stage, per frame
    for k, shot in enumerate(["on sand", "alone on grass", "in the snow"]):
        caption = page.locator("#story-frames .caption-label").nth(k)
        sync_api.expect(caption).to_be_visible()
        sync_api.expect(caption).to_contain_text(f"Shot {k + 1}")
        sync_api.expect(caption).to_contain_text(shot)
    page.screenshot(path=os.path.join(OUT, "app_browser_story_example.png"), full_page=True)


def _settled_box(page, locator, timeout_ms: int = 15_000) -> dict:
    """The locator's bounding box once it has stopped moving (the same for 500 ms): the folded section opens with an
    animation and the page lays out again as images arrive, so a box read too early puts a stroke elsewhere on a
    slow machine."""
    last, still = None, 0
    for _ in range(timeout_ms // 100):
        box = locator.bounding_box()
        still = still + 1 if box is not None and box == last else 0
        if still >= 5:
            return box
        last = box
        page.wait_for_timeout(100)
    raise AssertionError(f"the element kept moving for {timeout_ms} ms (last box {last})")


def test_a_box_drawn_on_the_region_canvas_fills_the_region_field(page):
    """Issue 18: each subject's region drawn on a canvas of the output's shape; the drawing's box is the region."""
    page.locator("#subject-1-region-box").get_by_text("Region (optional)").click()  # folded at first
    canvas = page.locator("#subject-1-region-canvas canvas").first
    sync_api.expect(canvas).to_be_visible(timeout=30_000)
    sync_api.expect(page.locator("#subject-1-region-canvas button[aria-label=Brush]")).to_have_class(
        re.compile("highlight"), timeout=10_000)
    box = _settled_box(page, canvas)  # the editor's area: the canvas image sits in its middle, at the display's scale
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 40, y - 20)
    page.mouse.down()
    for k in range(1, 21):  # a diagonal stroke through the middle, 80 x 40 screen pixels
        page.mouse.move(x - 40 + 4 * k, y - 20 + 2 * k)
    page.mouse.up()
    field = page.locator("#subject-1-region textarea, #subject-1-region input").first
    sync_api.expect(field).to_have_value(re.compile(r"^[\d.]+, [\d.]+, [\d.]+, [\d.]+$"), timeout=30_000)
    x_0, y_0, x_1, y_1 = (float(v) for v in field.input_value().split(","))
    assert x_0 < 0.5 < x_1 and y_0 < 0.5 < y_1, field.input_value()  # the box around the stroke
    assert 0.1 < x_1 - x_0 < 0.9 and 0.05 < y_1 - y_0 < 0.6 and x_1 - x_0 > y_1 - y_0, field.input_value()
    page.screenshot(path=os.path.join(OUT, "app_browser_region.png"), full_page=False)


@pytest.mark.parametrize("size", [(1280, 800), (1920, 1080)])
def test_prompt_first_upload_generate_and_output_fit_one_screen(app, browser, size):
    """A newcomer's first screen, no scrolling: the prompt, subject 1's upload, Generate and the output panel all
    lie wholly (the output: its top 200 px) inside the viewport; the optional sections start folded."""
    width, height = size
    pg = browser.new_page(viewport={"width": width, "height": height})
    try:
        pg.goto(app[0])
        pg.wait_for_selector("#generate", timeout=60_000)
        pg.wait_for_timeout(500)
        assert pg.evaluate("window.scrollY") == 0
        boxes = {sel: pg.locator(sel).first.bounding_box() for sel in
                 ("#prompt", "#subject-1-image", "#generate", "#output-gallery")}
        pg.screenshot(path=os.path.join(OUT, f"app_browser_first_screen_{width}x{height}.png"))
        for sel, box in boxes.items():
            assert box is not None, f"{sel} is not shown"
            bottom = box["y"] + (min(box["height"], 200) if sel == "#output-gallery" else box["height"])
            assert box["x"] >= 0 and box["x"] + box["width"] <= width, f"{sel} is cut off sideways at {size}: {box}"
            assert box["y"] >= 0 and bottom <= height, f"{sel} needs scrolling at {size}: {box}"
        out, button = boxes["#output-gallery"], boxes["#generate"]
        beside = out["x"] >= button["x"] + button["width"] - 1
        under = out["y"] >= button["y"] + button["height"] - 1 and out["y"] - (button["y"] + button["height"]) < 150
        assert beside or under, f"the output is neither beside nor right under Generate: {out} vs {button}"
        sync_api.expect(pg.locator("#subject-1-draw")).to_be_hidden()  # the optional sections start folded
        sync_api.expect(pg.locator("#subject-1-region-canvas")).to_be_hidden()
    finally:
        pg.close()


def _gallery_srcs(page, selector):
    return page.locator(f"{selector} img").evaluate_all("els => els.map(e => e.getAttribute('src'))")


def test_a_finished_run_shows_only_its_own_pictures_with_captions_below_them(page):
    """Two runs in a row: once the second says done, every output and routing thumbnail is one of its own (none of
    the first run's files), each decoded, and each caption lies below its picture, not over it."""
    page.locator("#settings").get_by_text("Settings").click()
    page.locator("#seed input").fill("1")
    _generate_one(page)
    sync_api.expect(page.locator("#run-progress")).to_contain_text("done", timeout=60_000)
    first = set(_gallery_srcs(page, "#output-gallery") + _gallery_srcs(page, "#routing-gallery"))
    assert first
    page.locator("#seed input").fill("2")
    page.locator("#prompt textarea").fill("a red striped star on snow")
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#run-info').innerText.match(/Seed\\D*2\\b/)",
                           timeout=240_000)
    for selector in ("#output-gallery", "#routing-gallery"):
        imgs = page.locator(f"{selector} img")
        assert imgs.count() > 0
        for k in range(imgs.count()):
            _loaded(imgs.nth(k))
            assert imgs.nth(k).evaluate("el => el.naturalWidth") > 0
        srcs = _gallery_srcs(page, selector)
        assert not first & set(srcs), f"{selector} still shows the first run's pictures"
    items = page.locator("#routing-gallery .thumbnail-item")
    for k in range(items.count()):
        img, caption = items.nth(k).locator("img").bounding_box(), items.nth(k).locator(".caption-label").bounding_box()
        assert caption["y"] >= img["y"] + img["height"] - 1, (k, img, caption)  # below the map, not over it
    page.screenshot(path=os.path.join(OUT, "app_browser_second_run.png"), full_page=True)


def test_storyboard_add_and_remove_shot_and_no_column_menu(page):
    """Shots come and go with the named buttons; the cell menu offers no column insert or delete."""
    page.get_by_role("tab", name="Storyboard").click()
    rows = page.locator("#shots [role=row].virtual-row")
    sync_api.expect(rows).to_have_count(3, timeout=10_000)
    page.locator("#shots [data-testid=cell-0-0]").dblclick()
    page.keyboard.type("{star} on sand")
    page.keyboard.press("Enter")
    page.click("#add-shot")
    sync_api.expect(rows).to_have_count(4, timeout=10_000)
    page.click("#add-shot")
    sync_api.expect(rows).to_have_count(5, timeout=10_000)
    sync_api.expect(page.locator("#shots [data-testid=cell-0-0]")).to_contain_text("{star} on sand")  # kept
    page.click("#remove-shot")
    sync_api.expect(rows).to_have_count(4, timeout=10_000)
    page.locator("#shots [data-testid=cell-0-1]").click(button="right")
    page.wait_for_timeout(500)
    sync_api.expect(page.get_by_text("Add column", exact=False)).to_have_count(0)
    sync_api.expect(page.get_by_text("Delete column", exact=False)).to_have_count(0)
    page.keyboard.press("Escape")
    page.click("#generate-storyboard")  # an empty story: the status line says so, not only the toast
    sync_api.expect(page.locator("#story-status")).to_contain_text("Cannot generate the storyboard", timeout=30_000)


def _region_outline(canvas, color, timeout_s=90.0, want=None):
    """The bounding box (x0, y0, x1, y1, in the canvas element's screen pixels) of the pixels of ``color`` on the
    region canvas as drawn on the page (the editor's buttons, whose colour icon has it too, left out), and those
    pixels; polled until ``want(found)`` holds (or the time is up); None if none."""
    deadline, found = time.time() + timeout_s, None
    while True:
        shot = np.asarray(Image.open(io.BytesIO(canvas.screenshot())).convert("RGB")).astype(int)
        near = np.abs(shot - np.array(color)).sum(axis=-1) < 60
        origin = canvas.bounding_box()
        for b in canvas.evaluate("""c => [...c.closest('[id$=region-canvas]').querySelectorAll('button')]
                .map(e => e.getBoundingClientRect()).map(r => [r.x, r.y, r.right, r.bottom])"""):
            bx0, by0 = (max(0, int(v - o) - 2) for v, o in zip(b[:2], (origin["x"], origin["y"])))
            near[by0: int(b[3] - origin["y"]) + 2, bx0: int(b[2] - origin["x"]) + 2] = False  # the tools' icons
        ys, xs = np.nonzero(near)
        found = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, near) if len(xs) else None
        if (found is not None and (want is None or want(found))) or time.time() > deadline:
            return found
        time.sleep(0.5)


def _square(found, ratio):
    x0, y0, x1, y1, _ = found
    return abs((x1 - x0) / (y1 - y0) - ratio) < 0.06


@pytest.mark.parametrize("width", [1024, 1400, 1920])
def test_the_region_canvas_is_whole_and_shows_the_region_as_a_box(app, browser, width):
    """Issue 30: at 1400 px the canvas showed only the middle of its grid (its drawing surface twice as wide as its
    box) and a drawn region stayed a scribble. At each width: the canvas lies inside its box and the viewport; a
    typed region is shown as a box on it (0, 0, 1, 1: the whole grid's outline, all four sides in view; the left
    half: half as wide, ending at the middle); a diagonal stroke is replaced by its box (all four corners drawn)."""
    pg = browser.new_page(viewport={"width": width, "height": 1000})
    try:
        pg.goto(app[0])
        pg.wait_for_selector("#generate", timeout=60_000)
        pg.locator("#subject-1-region-box").get_by_text("Region (optional)").click()
        canvas = pg.locator("#subject-1-region-canvas canvas").first
        sync_api.expect(canvas).to_be_visible(timeout=30_000)
        box = _settled_box(pg, canvas)
        outer = pg.locator("#subject-1-region-canvas").bounding_box()
        assert outer["x"] - 1 <= box["x"] and box["x"] + box["width"] <= outer["x"] + outer["width"] + 1, (box, outer)
        assert 0 <= box["x"] and box["x"] + box["width"] <= width, (box, width)
        field = pg.locator("#subject-1-region textarea, #subject-1-region input").first
        color = PALETTE[0]

        field.fill("0, 0, 1, 1")
        whole = _region_outline(canvas, color, want=lambda f: _square(f, 1.0))
        assert whole is not None and _square(whole, 1.0), whole  # the square output's whole grid, outlined
        x0, y0, x1, y1, near = whole
        assert x0 > 0 and x1 < box["width"] - 1, (whole[:4], box)  # not cut at either side
        for side in (slice(x0, x0 + 6), slice(x1 - 6, x1)):  # each side drawn down its whole height
            assert near[y0:y1, side].any(axis=1).mean() > 0.9, f"the outline's side at x={side} is not whole"
        field.fill("0, 0, 0.5, 1")
        half = _region_outline(canvas, color, want=lambda f: _square(f, 0.5))
        assert half is not None and _square(half, 0.5), half[:4]
        assert abs(half[0] - x0) <= 2 and abs(half[2] - (x0 + x1) / 2) <= 3, (half[:4], whole[:4])

        brush = pg.locator("#subject-1-region-canvas button[aria-label=Brush]")
        sync_api.expect(brush).to_have_class(re.compile("highlight"), timeout=10_000)  # selected again, by the app
        box = _settled_box(pg, canvas)  # where it is now (taking its picture scrolled it into view)
        cx, cy = box["x"] + (x0 + x1) / 2, box["y"] + (y0 + y1) / 2
        pg.mouse.move(cx + 35, cy - 40)
        pg.mouse.down()
        for k in range(1, 21):  # a diagonal stroke, 40 x 80 screen pixels, in the right half
            pg.mouse.move(cx + 35 + 2 * k, cy - 40 + 4 * k)
        pg.mouse.up()
        pg.mouse.move(1, 1)  # the brush's cursor off the canvas
        sync_api.expect(field).not_to_have_value("0, 0, 0.5, 1", timeout=30_000)
        fx0, fy0, fx1, fy1 = (float(v) for v in field.input_value().split(","))
        assert fx0 > 0.5 and fy0 < 0.5 < fy1, field.input_value()
        drawn = _region_outline(canvas, color, want=lambda f: _square(f, (fx1 - fx0) / (fy1 - fy0)))
        assert drawn is not None and _square(drawn, (fx1 - fx0) / (fy1 - fy0)), (drawn[:4], field.input_value())
        dx0, dy0, dx1, dy1, near = drawn
        assert dx0 > (x0 + x1) / 2, (drawn[:4], whole[:4])
        for y, x in ((dy0, dx1 - 1), (dy1 - 1, dx0), (dy0, dx0), (dy1 - 1, dx1 - 1)):  # a box, not the stroke
            assert near[max(0, y - 2): y + 3, max(0, x - 2): x + 3].any(), (x, y, drawn[:4])
        pg.locator("#subject-1-region-box").screenshot(path=os.path.join(OUT, f"app_browser_region_{width}.png"))
    finally:
        pg.close()
