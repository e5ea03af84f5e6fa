"""The demo's progress line: the current stage, and an ETA measured on the current run only."""
import threading

import pytest
from PIL import Image

from anystory.app.progress import RunProgress, StagedSegmenter, Status, follow
from anystory.matting import LazyBiRefNetSegmenter


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_stages_in_order_and_an_eta_from_this_runs_steps_only():
    clock, seen = Clock(), []
    tracker = RunProgress(seen.append, clock=clock)
    tracker.stage("matting", "subject image 1")
    tracker.step(0, 4)  # before the first step: the subjects are encoded
    clock.t = 5.0
    tracker.step(1, 4)  # the first step carries the encoding: no estimate yet
    clock.t = 6.0
    tracker.step(2, 4)  # 1 s per step from here on
    clock.t = 7.0
    tracker.step(3, 4)
    tracker.step(4, 4)
    tracker.done()
    assert [s.stage for s in seen] == ["matting", "encoding subjects", "denoising", "denoising", "denoising",
                                       "decoding", "done"]
    assert seen[2].eta is None and "estimating" in seen[2].text()
    assert seen[3].eta == pytest.approx(2.0) and seen[4].eta == pytest.approx(1.0)
    assert seen[4].text().startswith("step 3/4 · about 1.0 s left")

    # a second, slower run on the same tracker type: nothing of the first run's timing carries over
    clock2, later = Clock(), []
    run2 = RunProgress(later.append, clock=clock2)
    run2.step(0, 10)
    clock2.t = 1.0
    run2.step(1, 10)
    clock2.t = 4.0
    run2.step(2, 10)
    assert later[-1].eta == pytest.approx(3.0 * 8)


def test_status_html_is_a_progress_bar_with_escaped_text():
    html = Status("denoising", "<b>", 1.0, 5, 20, 3.0).html()
    assert 'value="0.250"' in html and "&lt;b&gt;" in html and 'data-stage="denoising"' in html


def test_follow_streams_statuses_then_the_result_and_raises_errors_in_the_caller():
    gate = threading.Event()

    def work(tracker):
        tracker.stage("matting")
        gate.wait(5)
        tracker.step(0, 2)
        return "images"

    items = follow(work)
    first = next(items)
    assert isinstance(first, Status) and first.stage == "matting"
    gate.set()
    rest = list(items)
    assert rest[-1] == ("result", "images") and rest[-2].stage == "done"

    def broken(tracker):
        raise ValueError("bad subject")

    with pytest.raises(ValueError, match="bad subject"):
        list(follow(broken))


def test_staged_segmenter_reports_a_model_load_on_first_use_then_matting():
    seen = []
    lazy = LazyBiRefNetSegmenter(loader=lambda model_id, device: (_ for _ in ()).throw(OSError("offline")))
    staged = StagedSegmenter(lazy, RunProgress(seen.append))
    image = Image.new("RGB", (8, 8))
    assert staged(image).shape == (8, 8) and staged(image).all()
    assert [s.stage for s in seen] == ["loading", "matting", "matting"]
    assert "first use" in seen[0].detail and seen[2].detail == "subject image 2"
    assert staged.status == lazy.status  # everything else is the wrapped segmenter's
