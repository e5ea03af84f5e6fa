"""The demo's logic without a browser: model choice (order, fallbacks, messages), generation, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from anystory.app import inputs
from anystory.app.inputs import InputError, SubjectSlot, check_prompt, collect_subjects, load_image_file, resolve_seed
from anystory.app.environment import FLUX_MIN_GIB, Environment, WeightsStatus, hub_file_status, probe_environment
from anystory.app.gallery import routing_items
from anystory.app.generate_tab import run_generation
from anystory.app.generation import GenerationError, is_out_of_memory
from anystory.app.models import ModelHandle, NoModelError, load_model, plan_models
from anystory.presets import Preset
from anystory.matting import BiRefNetSegmenter, LazyBiRefNetSegmenter
from anystory.subjects import AlphaOrWholeImageSegmenter

OK = WeightsStatus(True, "cached")


def _env(**kw):
    base = dict(cuda=False, miniature=WeightsStatus(True, "installed"))
    base.update(kw)
    return Environment(**base)


def _gpu(gib, flux=OK, **kw):
    return _env(cuda=True, gpu_name="Test GPU", gpu_memory_gib=gib, flux_code=OK, flux_weights=flux, **kw)


class Loaded:
    """What a loader returns in the choice tests: which kind was loaded (no weights are involved)."""

    def __init__(self, kind):
        self.kind = kind


def _loaders(fail=()):
    def make(kind):
        def load(env):
            if kind in fail:
                raise OSError(f"{kind} weights missing")
            return Loaded(kind)
        return load
    return {k: make(k) for k in ("flux", "sdxl", "miniature", "tiny")}


# ---- model choice ---------------------------------------------------------------------------------------------
def test_cpu_without_weights_gets_the_miniature_and_says_why():
    handle = load_model(_env(), loaders=_loaders())
    assert handle.kind == "miniature" and handle.pipe.kind == "miniature"
    text = handle.status_markdown()
    assert "miniature" in text and "runs anywhere, offline" in text
    assert "FLUX: no CUDA GPU" in text and "SDXL AnyStory: no weights configured" in text


def test_big_gpu_with_reachable_weights_gets_flux_first():
    candidates, skipped = plan_models(_gpu(80, sdxl_weights="/w"))
    assert [c.kind for c in candidates] == ["flux", "sdxl", "miniature"] and skipped == []
    assert "CUDA GPU Test GPU (80 GiB)" in candidates[0].reason and "offload" not in candidates[0].reason
    assert load_model(_gpu(80), loaders=_loaders()).kind == "flux"


def test_flux_on_a_mid_size_gpu_is_chosen_with_offload():
    candidates, _ = plan_models(_gpu(32))
    assert candidates[0].kind == "flux" and "with CPU offload" in candidates[0].reason


@pytest.mark.parametrize("env, expected", [
    (_gpu(12), f"has 12 GiB, FLUX needs at least {FLUX_MIN_GIB:.0f} GiB"),
    (_gpu(80, flux=WeightsStatus(False, "Junjie96/AnyStory/anystory_flux.bin is not cached")),
     "FLUX: weights not reachable (Junjie96/AnyStory/anystory_flux.bin is not cached)"),
    (_env(cuda=True, gpu_name="G", gpu_memory_gib=80, flux_code=WeightsStatus(False, "the FLUX pipeline is not installed")),
     "FLUX: the FLUX pipeline is not installed"),
])
def test_flux_skips_name_the_reason(env, expected):
    handle = load_model(env, loaders=_loaders())
    assert handle.kind == "miniature"
    assert expected in handle.status_markdown()


def test_a_failed_load_falls_back_in_order_and_is_reported():
    handle = load_model(_gpu(80, sdxl_weights="/weights/sdxl"), loaders=_loaders(fail=("flux",)))
    assert handle.kind == "sdxl" and "/weights/sdxl" in handle.title
    assert "flux: failed to load (OSError: flux weights missing)" in handle.status_markdown()
    handle = load_model(_gpu(80, sdxl_weights="/w"), loaders=_loaders(fail=("flux", "sdxl")))
    assert handle.kind == "miniature"


def test_nothing_loadable_is_an_error_listing_every_reason():
    env = _env(miniature=WeightsStatus(False, "the miniature's weights are missing"))
    with pytest.raises(NoModelError, match="FLUX: no CUDA GPU.*no weights configured.*weights are missing"):
        load_model(env, loaders=_loaders())
    with pytest.raises(NoModelError, match="miniature: failed to load"):
        load_model(_env(), loaders=_loaders(fail=("miniature",)))


def test_a_requested_model_is_not_silently_replaced():
    with pytest.raises(NoModelError, match="FLUX: no CUDA GPU"):
        load_model(_env(), "flux", loaders=_loaders())
    handle = load_model(_env(sdxl_weights="/w"), "sdxl", loaders=_loaders())
    assert handle.kind == "sdxl" and handle.reason.startswith("requested with --model sdxl")
    assert plan_models(_env(), "tiny")[0][0].kind == "tiny"  # never chosen by "auto"
    assert all(c.kind != "tiny" for c in plan_models(_gpu(80, sdxl_weights="/w"))[0])
    with pytest.raises(ValueError, match="unknown model"):
        plan_models(_env(), "sd15")


def test_probe_reads_configuration_and_the_offline_hub(monkeypatch):
    monkeypatch.setenv("ANYSTORY_SDXL_WEIGHTS", "/data/anystory_sdxl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = probe_environment()
    assert env.sdxl_weights == "/data/anystory_sdxl" and env.flux_weights is None  # no GPU: the hub is not asked
    status = hub_file_status("Junjie96/AnyStory", "anystory_flux.bin")  # conftest: HF_HUB_OFFLINE=1
    assert not status.available and "HF_HUB_OFFLINE" in status.detail


# ---- generation with a tiny real pipeline -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg():
    return LazyBiRefNetSegmenter()


STAR = "assets/examples/red_striped_star.png"
CAT = "assets/examples/cat.png"


def test_generation_gives_images_overlays_and_downloads(handle, seg, tmp_path):
    calls = []
    r = run_generation(handle, seg, [SubjectSlot(STAR, name="star"), SubjectSlot(CAT, name="cat")],
                       "a red striped star and a cat on sand", seed=5, steps=3, num_images=2,
                       progress=lambda i, n: calls.append((i, n)), out_dir=str(tmp_path))
    size = handle.defaults.size
    assert len(r.images) == 2 and all(im.size == (size, size) for im in r.images)
    assert len(r.overlays) == 2 and all(o.size == (size, size) for o in r.overlays)
    assert len(r.route_maps) == 2
    assert calls == [(0, 3), (1, 3), (2, 3), (3, 3)]  # 0: before the first step, while subjects are encoded
    assert r.seed == 5 and "Seed **5**" in r.info
    assert "star" in r.legend and "cat" in r.legend
    assert "automatic (alpha)" in r.info and "automatic (whole-image)" in r.info
    assert len(r.files) == 4 and all(p.endswith(".png") and (tmp_path / p.split("/")[-1]).exists() for p in r.files)
    items = routing_items(r)  # per image: all subjects, each subject alone, the map
    assert [label.split(" - ")[0] for _, label in items] == ["all subjects", "only star", "only cat", "map"] * 2
    assert all(image.size[0] >= 384 for image, _ in items)  # enlarged for the page


def test_random_seed_is_shown_and_reproduces(handle, seg):
    slots = [SubjectSlot(STAR)]
    first = run_generation(handle, seg, slots, "a star", seed=-1, steps=2)
    assert 0 <= first.seed < 2**31 and f"Seed **{first.seed}**" in first.info
    again = run_generation(handle, seg, slots, "a star", seed=first.seed, steps=2)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))


def test_flux_pipeline_through_the_app(seg):
    tiny_flux = pytest.importorskip("anystory.flux.tiny_flux")
    pipe = tiny_flux.tiny_anystory_flux_pipeline(0, True)
    flux = ModelHandle("flux", pipe, "cpu", "test", defaults=Preset(3, 3.5, 32, 32, 64, 16))
    r = run_generation(flux, seg, [SubjectSlot(STAR, name="star"), SubjectSlot(CAT, name="cat")], "a star and a cat",
                       negative_prompt="blurry", seed=1)
    assert [im.size for im in r.images] == [(32, 32)] and len(r.overlays) == 1
    assert "star" in r.legend and "cat" in r.legend
    assert "negative prompt is not used by FLUX.1-dev" in r.info


# ---- bad input --------------------------------------------------------------------------------------------------
def _png(path, size=(48, 40), mode="RGB"):
    Image.new(mode, size, 128).save(path)
    return str(path)


def test_no_subject_image(handle, seg):
    with pytest.raises(InputError, match="No subject image"):
        run_generation(handle, seg, [SubjectSlot(), SubjectSlot()], "a cat")


def test_mask_without_image(handle, seg, tmp_path):
    with pytest.raises(InputError, match="Subject 2: a mask was given but no image"):
        run_generation(handle, seg, [SubjectSlot(STAR), SubjectSlot(mask=_png(tmp_path / "m.png"))], "a cat")


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"hello", "unsupported file type '.txt'"),
    ("drawing.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "unsupported file type '.svg'"),
    ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "cannot read broken.png as an image"),
])
def test_unsupported_or_broken_files(handle, seg, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        run_generation(handle, seg, [SubjectSlot(str(tmp_path / name))], "a cat")


def test_oversized_file_and_too_many_pixels(handle, seg, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * (inputs.MAX_UPLOAD_BYTES + 1))
    with pytest.raises(InputError, match=r"Subject 1 image: the file is 10\.0 MB; the limit is 10 MB"):
        run_generation(handle, seg, [SubjectSlot(str(big))], "a cat")
    huge = _png(tmp_path / "huge.png", size=(5000, 4000), mode="1")  # small file, 20 MP
    with pytest.raises(InputError, match="5000x4000 pixels; the limit is 4096x4096"):
        run_generation(handle, seg, [SubjectSlot(huge)], "a cat")


def test_mask_image_mismatch(handle, seg, tmp_path):
    image, mask = _png(tmp_path / "i.png", (48, 40)), _png(tmp_path / "m.png", (32, 32), "L")
    with pytest.raises(InputError, match="mask size 32x32 does not match image size 48x40"):
        run_generation(handle, seg, [SubjectSlot(image, mask=mask)], "a cat")
    drawn = {"background": None, "layers": [Image.new("RGBA", (30, 30), (255, 0, 0, 255))], "composite": None}
    with pytest.raises(InputError, match="the drawn mask is 30x30 but the image is 48x40"):
        run_generation(handle, seg, [SubjectSlot(image, drawn=drawn)], "a cat")


def test_drawn_and_uploaded_masks_are_used(handle, seg, tmp_path):
    image = _png(tmp_path / "i.png", (48, 40))
    layer = Image.new("RGBA", (48, 40), (0, 0, 0, 0))
    layer.paste((255, 0, 0, 255), (10, 10, 20, 20))
    subjects, sources = collect_subjects([SubjectSlot(image, drawn={"layers": [layer]}),
                                          SubjectSlot(image, mask=_png(tmp_path / "m.png", (48, 40), "L"))], 4, seg)
    assert sources == ["Subject 1: drawn mask", "Subject 2: uploaded mask"]
    assert subjects[0].mask.sum() == 100 and subjects[0].mask[10:20, 10:20].all()
    with pytest.raises(InputError, match="Subject 1: mask is empty"):
        collect_subjects([SubjectSlot(image, mask=_black(tmp_path))], 4, seg)


def _black(tmp_path):
    path = tmp_path / "black.png"
    Image.new("L", (48, 40), 0).save(path)
    return str(path)


def test_over_long_and_empty_prompts(handle, seg):
    long_prompt = " ".join(["a very detailed red striped star"] * 20)
    with pytest.raises(InputError, match=r"Prompt is too long: \d+ tokens, the text encoder reads at most 77"):
        run_generation(handle, seg, [SubjectSlot(STAR)], long_prompt)
    with pytest.raises(InputError, match="Negative prompt is too long"):
        run_generation(handle, seg, [SubjectSlot(STAR)], "a star", negative_prompt=long_prompt)
    with pytest.raises(InputError, match="Prompt is empty"):
        run_generation(handle, seg, [SubjectSlot(STAR)], "   ")
    assert check_prompt("a star", handle.pipe) == "a star"


def test_too_many_subjects(handle, seg):
    with pytest.raises(InputError, match="Too many subjects: 5 given, this model takes at most 4"):
        run_generation(handle, seg, [SubjectSlot(STAR)] * 5, "five stars")


@pytest.mark.parametrize("kw, message", [
    (dict(seed=-5), "Seed must be -1"), (dict(seed="abc"), "Seed must be an integer"),
    (dict(steps=0), "Steps must be an integer between 1 and 100"),
    (dict(width=62), "Width must be a multiple of"), (dict(height=4096), "Height must be an integer between"),
    (dict(num_images=9), "Images per prompt"),
])
def test_bad_settings(handle, seg, kw, message):
    with pytest.raises(InputError, match=message):
        run_generation(handle, seg, [SubjectSlot(STAR)], "a star", **kw)


def test_out_of_memory_gives_the_advice(handle, seg, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(handle.pipe.unet, "forward", oom)
    with pytest.raises(GenerationError) as e:
        run_generation(handle, seg, [SubjectSlot(STAR)], "a star", steps=2)
    text = str(e.value)
    assert "Out of memory" in text and "Lower the resolution" in text and "offload" in text
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 GB"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_resolve_seed():
    assert resolve_seed(7) == 7 and resolve_seed("7") == 7
    assert 0 <= resolve_seed(-1) <= 2**31 - 1 and 0 <= resolve_seed(None)


def test_pil_and_array_uploads_are_accepted():
    assert load_image_file(np.zeros((8, 9, 3), np.uint8), "x").size == (9, 8)
    with pytest.raises(InputError, match="expected an image file"):
        load_image_file(42, "Subject 1 image")


# ---- matting ----------------------------------------------------------------------------------------------------
def test_birefnet_offline_falls_back_and_says_so():
    seg = LazyBiRefNetSegmenter()
    assert "not in the local cache and the hub is off" in seg.status  # said before any subject needs it
    star = Image.open(STAR)
    mask = seg(star)
    assert seg.last_source == "alpha" and mask.shape == (star.height, star.width) and not mask.all()
    assert seg(Image.open(CAT).convert("RGB")).all() and seg.last_source == "whole-image"
    assert "unavailable" in seg.status and "alpha channel" in seg.status
    assert isinstance(seg._inner, AlphaOrWholeImageSegmenter)


class HalfModel(torch.nn.Module):
    """Stands in for BiRefNet's network: logits +8 on the left half of its input, -8 on the right."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        out = torch.full((x.shape[0], 1, x.shape[2], x.shape[3]), -8.0)
        out[..., : x.shape[3] // 2] = 8.0
        return [out + self.p]


def test_birefnet_wrapper_pre_and_post_processing(tmp_path):
    model = HalfModel()
    seg = LazyBiRefNetSegmenter(str(tmp_path), loader=lambda model_id, device: model)  # a local folder
    assert "loaded on first use" in seg.status
    mask = seg(Image.new("RGB", (60, 30), (10, 200, 10)))
    assert model.seen == [(1, 3, 1024, 1024)]
    assert mask.shape == (30, 60) and mask[:, :29].all() and not mask[:, 31:].any()
    assert seg.last_source.startswith("BiRefNet") and "unavailable" not in seg.status
    seg(Image.open(STAR))  # a real cut-out keeps its alpha: the network is not run
    assert len(model.seen) == 1 and seg.last_source == "alpha"
    assert isinstance(seg._inner, BiRefNetSegmenter)


def test_an_unreachable_hub_is_decided_within_two_seconds_and_said(monkeypatch, tmp_path):
    """No network but HF_HUB_OFFLINE unset: a hub that accepts connections and never answers (as a dead link does)."""
    import socket
    import time

    import huggingface_hub.constants

    from anystory import matting

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)  # connections complete in the backlog; no byte ever comes back
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # nothing cached
    try:
        start = time.perf_counter()
        seg = LazyBiRefNetSegmenter()
        status = seg.status  # what the page shows before the first click
        mask = seg(Image.new("RGB", (20, 10), "red"))  # the first generation's matting
        assert time.perf_counter() - start <= 2.0
        assert "is unreachable" in status and "alpha channel" in status
        assert mask.all() and seg.last_source == "whole-image"
        assert "unreachable" in seg.status and "unavailable" in seg.status
        start = time.perf_counter()  # remembered: a page reload or a second segmenter does not probe again
        assert "unreachable" in LazyBiRefNetSegmenter().status
        flux = hub_file_status("Junjie96/AnyStory", "anystory_flux.bin")  # the app's FLUX check at start-up
        assert time.perf_counter() - start < 0.5
        assert not flux.available and "is unreachable" in flux.detail
    finally:
        server.close()
    assert matting.HUB_PROBE_SECONDS <= 2.0


def test_hub_probe_counts_any_http_answer_as_reachable(monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from anystory.matting import hub_reachable

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)  # either switches the hub off, as in huggingface_hub
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{httpd.server_address[1]}")
    try:
        assert hub_reachable() is True
    finally:
        httpd.shutdown()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False


# ---- errors keep their kind ---------------------------------------------------------------------------------------
def test_a_bug_in_the_pipeline_is_not_reported_as_an_input_error(handle, seg, monkeypatch):
    """Only InvalidInputError is the user's problem; a ValueError from the model's code is a bug and stays one."""
    from anystory.errors import InvalidInputError

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(handle.pipe.unet, "forward", broken)
    with pytest.raises(ValueError, match="could not be broadcast") as e:
        run_generation(handle, seg, [SubjectSlot(STAR)], "a star", steps=2)
    assert not isinstance(e.value, InvalidInputError)

    def refused(*args, **kwargs):
        raise InvalidInputError("subject 0: mask is empty")

    monkeypatch.setattr(handle.pipe.unet, "forward", refused)
    with pytest.raises(InvalidInputError, match="mask is empty"):
        run_generation(handle, seg, [SubjectSlot(STAR)], "a star", steps=2)
