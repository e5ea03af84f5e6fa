"""The docs' screenshots of the demo, taken from the real app in a real browser, so they stay true.

    python -m benchmarks.app_screenshots --out docs/assets/screenshots

Starts ``app.py`` on 127.0.0.1 (the miniature by default), drives Debian's headless Chromium through Playwright as a
newcomer would (two subjects, a prompt, Generate; a typed region; the example story) and saves small PNGs: the
Generate tab before and after a run, the region canvas, the routing display and the Storyboard tab (palette PNGs,
a few hundred KB in all). Needs ``chromium`` (apt) and ``playwright`` (``pip install -e ".[test]"``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "assets", "examples")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
#: The viewport of every shot: the smallest screen the first-screen layout is made for.
VIEWPORT = {"width": 1280, "height": 800}
#: Colours each PNG keeps (a palette image: a screenshot of flat UI loses nothing visible, and a tenth of the bytes).
COLOURS = 128
GENERATE_WAIT_MS = 600_000
#: Subject 1's colour (anystory.visualize.PALETTE[0]): its region box on the canvas.
REGION_COLOUR = (230, 25, 75)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Gradio's own start check (5 HEAD requests, the first timeout ends it) fails on a starved CPU and leaves the server
#: half up; the app is then started again, at most ``STARTS`` times. Gradio logs the second line once it passed.
GRADIO_START_CHECK = "When localhost is not accessible"
GRADIO_STARTED = "To create a public link"
STARTS = 3


@contextlib.contextmanager
def serve_app(model: str, log_path: str, port: int | None = None, timeout_s: float = 600) -> Iterator[str]:
    """``python app.py --model MODEL`` on 127.0.0.1, offline; yields its URL once it answers, stops it after."""
    port = port or free_port()
    url, deadline = f"http://127.0.0.1:{port}/", time.time() + timeout_s
    for _ in range(STARTS):
        proc = _start_app(model, port, log_path)
        try:
            served = _wait_until_served(proc, url, log_path, deadline)
        except BaseException:  # too slow, or exited: nothing is left running
            _stop(proc)
            raise
        if served:
            break
        _stop(proc)
    else:
        raise RuntimeError(f"app.py failed Gradio's start check {STARTS} times (log: {log_path})")
    try:
        yield url
    finally:
        _stop(proc)


def _start_app(model: str, port: int, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "app.py", "--model", model, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_until_served(proc: subprocess.Popen, url: str, log_path: str, deadline: float) -> bool:
    """True once ``url`` answers; False when Gradio's start check failed (start again); raises on anything else."""
    while True:
        with open(log_path, errors="replace") as f:
            log = f.read()
        if GRADIO_START_CHECK in log:
            return False
        if GRADIO_STARTED in log and _answers(url):
            return True
        if proc.poll() is not None:
            raise RuntimeError(f"app.py exited with {proc.returncode}:\n{log[-3000:]}")
        if time.time() > deadline:
            raise RuntimeError(f"app.py did not serve {url} in time (log: {log_path})")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def shrink(path: str, colours: int = COLOURS) -> int:
    """Rewrite a screenshot as a palette PNG of ``colours`` colours; returns its size in bytes."""
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    return os.path.getsize(path)


def _generate_shots(page, out: str) -> None:
    """The Generate tab before and after a two-subject run, the routing display, and a region typed in."""
    page.screenshot(path=os.path.join(out, "generate_before.png"))
    for k, name in ((1, "red_striped_star"), (2, "blue_dotted_moon")):
        page.locator(f"#subject-{k}-image input[type=file]").set_input_files(os.path.join(EXAMPLES, f"{name}.png"))
        page.locator(f"#subject-{k}-name textarea, #subject-{k}-name input").first.fill(name.split("_")[-1])
    page.locator("#prompt textarea").fill("a red striped star and a blue dotted moon on sand")
    page.locator("#subject-2-image img").first.wait_for(state="visible", timeout=60_000)
    page.click("#generate")
    page.wait_for_function("() => /done/.test(document.querySelector('#run-progress').innerText)",
                           timeout=GENERATE_WAIT_MS)
    page.wait_for_function("() => [...document.querySelectorAll('#routing-gallery img')].length > 0 && "
                           "[...document.querySelectorAll('#output-gallery img, #routing-gallery img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)
    page.screenshot(path=os.path.join(out, "generate_after.png"))
    _union_shot(page, ("#routing-gallery", "#routing-legend"), os.path.join(out, "routing.png"))
    page.locator("#subject-1-region-box").get_by_text("Region (optional)").click()
    page.locator("#subject-1-region textarea, #subject-1-region input").first.fill("0, 0, 0.5, 1")
    _wait_for_colour(page.locator("#subject-1-region-canvas canvas").first, REGION_COLOUR)  # redrawn with the box
    page.locator("#subject-1-region-box").screenshot(path=os.path.join(out, "region_canvas.png"))


def _wait_for_colour(element, colour, pixels: int = 400, timeout_s: float = 120) -> None:
    """Until ``element`` shows at least ``pixels`` pixels of ``colour`` (the slot's box, drawn by the server)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        with Image.open(io.BytesIO(element.screenshot())) as shot:
            found = sum(n for n, c in shot.convert("RGB").getcolors(1 << 20) if
                        sum(abs(a - b) for a, b in zip(c, colour)) < 60)
        if found >= pixels:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the region canvas did not show the typed box within {timeout_s:.0f} s")


def _union_shot(page, selectors, path: str, margin: int = 8) -> None:
    """One picture of the page around every element of ``selectors`` (in page coordinates, scrolled or not)."""
    scroll = page.evaluate("() => [window.scrollX, window.scrollY]")
    boxes = [page.locator(s).first.bounding_box() for s in selectors]
    x0, y0 = min(b["x"] for b in boxes) - margin, min(b["y"] for b in boxes) - margin
    x1, y1 = max(b["x"] + b["width"] for b in boxes) + margin, max(b["y"] + b["height"] for b in boxes) + margin
    page.screenshot(path=path, full_page=True, clip={"x": max(0, x0 + scroll[0]), "y": max(0, y0 + scroll[1]),
                                                     "width": x1 - x0, "height": y1 - y0})


def _storyboard_shot(page, out: str) -> None:
    """The Storyboard tab after its example story ran: the cast, the shots, the captioned frames."""
    page.get_by_role("tab", name="Storyboard").click()
    page.click("#story-example")
    page.wait_for_function("() => /3 shots/.test(document.querySelector('#story-status').innerText)", timeout=60_000)
    page.click("#generate-storyboard")
    page.wait_for_function("() => /3 of 3 frames/.test(document.querySelector('#story-status').innerText)",
                           timeout=GENERATE_WAIT_MS)
    page.wait_for_function("() => [...document.querySelectorAll('#story-frames img')]"
                           ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
    page.screenshot(path=os.path.join(out, "storyboard.png"), full_page=True)


def capture(url: str, out: str, chromium: str) -> list:
    """Every screenshot of the app at ``url`` into ``out``; returns their paths."""
    from playwright.sync_api import sync_playwright

    os.makedirs(out, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            for step in (_generate_shots, _storyboard_shot):
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(url)
                page.wait_for_selector("#generate", timeout=120_000)
                page.wait_for_timeout(1000)
                step(page, out)
                page.close()
        finally:
            browser.close()
    return [os.path.join(out, n) for n in SHOTS]


SHOTS = ("generate_before.png", "generate_after.png", "routing.png", "region_canvas.png", "storyboard.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=os.path.join("docs", "assets", "screenshots"), help="folder for the PNGs")
    p.add_argument("--model", default="miniature", choices=("miniature", "tiny"),
                   help="the app's --model (tiny: the untrained test pipeline, for a quick check)")
    p.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium",
                   help="the Chromium binary (Debian's package)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds the app may take to start")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isfile(args.chromium):
        print(f"error: Chromium not found at {args.chromium}: apt-get install chromium", file=sys.stderr)
        return 1
    log = os.path.join(tempfile.mkdtemp(prefix="anystory_shots_"), "app.log")
    with serve_app(args.model, log, timeout_s=args.start_timeout) as url:
        paths = capture(url, args.out, args.chromium)
    total = sum(shrink(p) for p in paths)
    for p in paths:
        print(f"{p}: {os.path.getsize(p) / 1024:.0f} KB")
    print(f"{len(paths)} screenshots, {total / 1024:.0f} KB in all (app log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
