"""The demo in a real browser: Debian's headless Chromium driven by Playwright against ``python app.py``.

Runs the miniature when it is installed (the tiny untrained pipeline otherwise, which exercises the same UI and
code path). Skips when Chromium is absent; `.ci/run` installs it. The screenshot lands in tests/outputs/.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from anystory.app_logic import miniature_status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "outputs")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
STAR = os.path.join(ROOT, "assets", "examples", "red_striped_star.png")
CAT = os.path.join(ROOT, "assets", "examples", "cat.png")

pytestmark = pytest.mark.skipif(not os.path.isfile(CHROMIUM), reason=f"Chromium not found at {CHROMIUM}")
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    model = "miniature" if miniature_status().available else "tiny"
    port = _free_port()
    os.makedirs(OUT, exist_ok=True)
    log_path = os.path.join(OUT, "app_browser_server.log")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"app.py did not serve {url} within 180 s:\n{open(log_path).read()[-3000:]}")
            time.sleep(0.5)
        yield url, model
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def page(app):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1600})
        pg.goto(app[0])
        pg.wait_for_selector("#generate", timeout=60_000)
        yield pg
        browser.close()


def test_bad_input_shows_a_message(page):
    page.click("#generate")
    sync_api.expect(page.get_by_text("No subject image: upload at least one reference image.")).to_be_visible(timeout=30_000)
    page.reload()  # a clean page (no toast) for the next test
    page.wait_for_selector("#generate", timeout=60_000)


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
        img.evaluate("el => el.decode ? el.decode() : null")
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


def test_storyboard_import_bundle_and_generate_three_frames(page, tmp_path_factory):
    from anystory.storyboard import export_bundle, import_script

    script, missing = import_script(os.path.join(ROOT, "assets", "examples", "storyboard.yaml"), "/unused")
    assert missing == []
    bundle = export_bundle(script, str(tmp_path_factory.mktemp("story") / "story.zip"))
    page.get_by_role("tab", name="Storyboard").click()
    page.locator("#import-script input[type=file]").set_input_files(bundle)
    sync_api.expect(page.locator("#story-status")).to_contain_text("2 characters, 3 shots", timeout=30_000)
    page.click("#generate-storyboard")
    sync_api.expect(page.locator("#story-status")).to_contain_text("3 of 3 frames, seed 7", timeout=240_000)
    assert page.locator("#story-frames img").count() == 3
    page.screenshot(path=os.path.join(OUT, "app_browser_storyboard.png"), full_page=True)
    page.get_by_role("tab", name="Generate").click()


def test_add_and_remove_subject_slots(page):
    third = page.locator("#subject-3-image")
    sync_api.expect(third).to_be_hidden()
    page.click("#add-subject")
    sync_api.expect(third).to_be_visible(timeout=10_000)
    page.click("#remove-subject")
    sync_api.expect(third).to_be_hidden(timeout=10_000)


def test_a_file_that_is_no_image_gets_a_message_and_earlier_results_stay(page, tmp_path_factory):
    """A text file renamed .png, on both tabs: the app's message, no Error badge, the previous outputs kept."""
    fake = tmp_path_factory.mktemp("bad") / "holiday.png"
    fake.write_text("this is a text file, not a picture")
    page.get_by_role("tab", name="Generate").click()
    output = page.locator("#output-gallery img").first
    if page.locator("#output-gallery img").count() == 0:  # run alone: make a result to keep
        page.locator("#subject-1-image input[type=file]").set_input_files(STAR)
        page.locator("#prompt textarea").fill("a red striped star on sand")
        page.click("#generate")
    sync_api.expect(output).to_be_visible(timeout=240_000)
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

    page.get_by_role("tab", name="Storyboard").click()
    if not page.locator("#char-1-alias textarea, #char-1-alias input").first.input_value():  # run alone
        from anystory.storyboard import export_bundle, import_script

        script, _ = import_script(os.path.join(ROOT, "assets", "examples", "storyboard.yaml"), "/unused")
        bundle = export_bundle(script, str(tmp_path_factory.mktemp("story") / "story.zip"))
        page.locator("#import-script input[type=file]").set_input_files(bundle)
        sync_api.expect(page.locator("#story-status")).to_contain_text("2 characters, 3 shots", timeout=30_000)
    frames = page.locator("#story-frames img").count()
    page.locator("#char-1-ref input[type=file]").set_input_files(str(fake))
    page.wait_for_timeout(1000)
    page.click("#generate-storyboard")
    toast = page.get_by_text("image: cannot read holiday.png as an image").filter(visible=True)  # not slot 1's note
    sync_api.expect(toast.first).to_be_visible(timeout=30_000)
    assert page.locator("#story-frames img").count() == frames
    sync_api.expect(page.locator("#story-frames").get_by_text("Error", exact=True)).to_have_count(0)
    page.get_by_role("tab", name="Generate").click()


def test_matting_status_stays_true_after_a_reload(page):
    """After a generation tried BiRefNet (absent: the hub is off), a reloaded page still says what was found."""
    status = page.locator("#matting-status")
    if "unavailable" not in (status.text_content() or ""):  # run alone: one generation tries the matting
        page.locator("#subject-1-image input[type=file]").set_input_files(CAT)
        page.locator("#prompt textarea").fill("a cat on sand")
        page.click("#generate")
        sync_api.expect(page.locator("#output-gallery img").first).to_be_visible(timeout=240_000)
    sync_api.expect(status).to_contain_text("unavailable", timeout=30_000)
    page.reload()
    page.wait_for_selector("#generate", timeout=60_000)
    sync_api.expect(page.locator("#matting-status")).to_contain_text("unavailable", timeout=30_000)
    sync_api.expect(page.locator("#matting-status")).to_contain_text("alpha channel")
