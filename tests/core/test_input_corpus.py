"""A corpus of bad and unusual inputs, one table row each: the input, the expected handling, the message fragment.

Rows run against ``prepare_subjects`` (what both pipelines call first), the SDXL and the FLUX pipeline
themselves (every "subjects" error row is also run through both), the app's generate and storyboard functions,
and the eval harness's image loading. "ok" rows carry a check of the result instead of a message.
"""
import os

import numpy as np
import pytest
from PIL import Image

from anystory import Subject, prepare_subjects
from anystory.app.inputs import InputError, SubjectSlot, collect_subjects
from anystory.app.environment import Environment
from anystory.app.generate_tab import run_generation
from anystory.app.models import load_model
from anystory.app.storyboard_run import storyboard_frames
from anystory.app.storyboard_tab import script_from_ui
from anystory.subjects import AlphaOrWholeImageSegmenter

EXIF_ORIENTATION = 0x0112


def _png(path, image):
    image.save(path)
    return str(path)


def _rgba(alpha):
    arr = np.full((20, 20, 4), 120, np.uint8)
    arr[..., 3] = alpha
    return Image.fromarray(arr, "RGBA")


def _mask(dtype, fg=1, bg=0, shape=(20, 20)):
    m = np.full(shape, bg, dtype)
    m[5:15, 5:10] = fg
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    f = {"dir": str(d)}
    f["good"] = _png(d / "good.png", Image.new("RGB", (20, 20), (200, 30, 30)))
    (d / "renamed.png").write_text("a text file with an image's name")
    f["renamed"] = str(d / "renamed.png")
    blob = open(f["good"], "rb").read()
    (d / "truncated.png").write_bytes(blob[: len(blob) // 2])
    f["truncated"] = str(d / "truncated.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(d / "full.jpg", quality=90)
    jpg = open(d / "full.jpg", "rb").read()
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    f["truncated_jpg"] = str(d / "truncated.jpg")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 30 wide x 20 high, displayed rotated: 20 wide x 30 high
    Image.new("RGB", (30, 20), (10, 120, 200)).save(d / "phone.jpg", exif=exif)
    f["phone"] = str(d / "phone.jpg")
    upright = np.zeros((30, 20), np.uint8)
    upright[5:25, 5:15] = 255
    f["phone_mask"] = _png(d / "phone_mask.png", Image.fromarray(upright))  # drawn on the photo as displayed
    stored = Image.fromarray(np.rot90(upright, 1).copy())  # the same mask stored as the camera wrote the photo
    stored.save(d / "phone_mask_exif.png", exif=exif)
    f["phone_mask_exif"] = str(d / "phone_mask_exif.png")
    f["transparent"] = _png(d / "transparent.png", _rgba(0))
    f["mask01"] = _png(d / "mask01.png", Image.fromarray(_mask(np.uint8)))
    opaque = np.zeros((20, 20, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[5:15, 5:10, :3] = 255
    f["mask_rgba_opaque"] = _png(d / "mask_rgba.png", Image.fromarray(opaque, "RGBA"))
    f["mask16"] = _png(d / "mask16.png", Image.fromarray(_mask(np.uint16, 65535), "I;16"))
    f["photo16"] = _png(d / "photo16.png", Image.fromarray(np.full((20, 20), 40000, np.uint16), "I;16"))
    f["empty_mask"] = _png(d / "empty_mask.png", Image.new("L", (20, 20), 0))
    f["big"] = str(d / "big.png")
    with open(f["big"], "wb") as out:
        out.write(b"\x89PNG\r\n\x1a\n" + b"\0" * (10 * 1024 * 1024 + 1))
    (d / "notes.txt").write_text("hello")
    f["txt"] = str(d / "notes.txt")
    f["svg"] = str(d / "drawing.svg")
    (d / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    return f


RGB = np.full((20, 20, 3), 128, np.uint8)
S = Subject


def _n(n):
    return lambda out: len(out) == n


def _mask_sum(n):
    return lambda out: len(out) == 1 and int(out[0].mask.sum()) == n


def _extent(mask):
    """(height, width) of the mask's bounding box: the photo's upright shape for a whole-image mask."""
    ys, xs = np.nonzero(mask)
    return int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)


def _source(name):
    return lambda out: out[0].mask_source == name


# (id, build(files) -> the `subjects` argument, expected handling, message fragment or check of the result)
SUBJECT_ROWS = [
    # images: arrays by dtype and range
    ("uint8 RGB", lambda f: [S(RGB)], "ok", _n(1)),
    ("uint16 RGB", lambda f: [S(np.full((20, 20, 3), 65535, np.uint16))], "ok",
     lambda out: np.asarray(out[0].image).min() == 255),
    ("float 0..1", lambda f: [S(np.full((20, 20, 3), 0.5, np.float32))], "ok",
     lambda out: np.asarray(out[0].image).max() == 128),
    ("float 0..255", lambda f: [S(np.full((20, 20, 3), 128.0, np.float64))], "ok",
     lambda out: np.asarray(out[0].image).max() == 128),
    ("float above 255", lambda f: [S(np.full((8, 8, 3), 300.0, np.float32))], "error", "float32 in [300, 300]"),
    ("negative float", lambda f: [S(np.full((8, 8, 3), -0.5, np.float32))], "error", "must lie in [0, 1] or [0, 255]"),
    ("NaN image", lambda f: [S(np.full((8, 8, 3), np.nan, np.float32))], "error", "NaN or infinite"),
    ("inf image", lambda f: [S(np.full((8, 8, 3), np.inf))], "error", "NaN or infinite"),
    ("int64 0..255", lambda f: [S(np.full((8, 8, 3), 200, np.int64))], "ok", _n(1)),
    ("int64 negative", lambda f: [S(np.full((8, 8, 3), -5, np.int64))], "error", "int64 in [-5, -5]"),
    ("int32 above 255", lambda f: [S(np.full((8, 8), 1000, np.int32))], "error", "integer arrays must be uint8"),
    ("bool image", lambda f: [S(np.ones((8, 8), bool))], "ok", _n(1)),
    ("2 channels", lambda f: [S(np.zeros((8, 8, 2), np.uint8))], "error", "1, 3 or 4 channels"),
    ("5 channels", lambda f: [S(np.zeros((8, 8, 5), np.uint8))], "error", "1, 3 or 4 channels"),
    ("1-D array", lambda f: [S(np.zeros(8, np.uint8))], "error", "must be HxW or HxWxC"),
    ("4-D array", lambda f: [S(np.zeros((1, 8, 8, 3), np.uint8))], "error", "must be HxW or HxWxC"),
    ("empty array", lambda f: [S(np.zeros((0, 8, 3), np.uint8))], "error", "non-empty"),
    ("complex array", lambda f: [S(np.zeros((8, 8), np.complex64))], "error", "dtype complex64"),
    ("object array", lambda f: [S(np.full((8, 8), None, object))], "error", "dtype object"),
    ("HxWx1 array", lambda f: [S(np.full((8, 8, 1), 90, np.uint8))], "ok", _n(1)),
    # images: transparency, modes, files
    ("transparent RGBA", lambda f: [S(_rgba(0))], "error", "fully transparent"),
    ("transparent LA", lambda f: [S(Image.new("LA", (8, 8), (50, 0)))], "error", "fully transparent"),
    ("transparent RGBA array", lambda f: [S(np.zeros((8, 8, 4), np.uint8))], "error", "fully transparent"),
    ("transparent file", lambda f: [S(f["transparent"])], "error", "fully transparent"),
    ("partly transparent", lambda f: [S(_rgba(np.pad(np.full((10, 10), 255), 5)))], "ok", _source("alpha")),
    ("mode L", lambda f: [S(Image.new("L", (8, 8), 90))], "ok", _n(1)),
    ("mode I;16 file", lambda f: [S(f["photo16"])], "ok",
     lambda out: np.asarray(out[0].image).max() == round(40000 / 257)),
    ("mode CMYK", lambda f: [S(Image.new("CMYK", (8, 8), (0, 0, 0, 0)))], "ok", _n(1)),
    ("mode 1", lambda f: [S(Image.new("1", (8, 8), 1))], "ok", _n(1)),
    ("mode F", lambda f: [S(Image.new("F", (8, 8), 3.5))], "ok", _n(1)),
    ("mode P", lambda f: [S(Image.new("P", (8, 8), 3))], "ok", _n(1)),
    ("zero-size image", lambda f: [S(Image.new("RGB", (0, 0)))], "error", "zero size"),
    ("missing file", lambda f: [S(os.path.join(f["dir"], "nope.png"))], "error", "file not found"),
    ("empty path", lambda f: [S("")], "error", "empty file path"),
    ("a folder", lambda f: [S(f["dir"])], "error", "is a folder"),
    ("text renamed .png", lambda f: [S(f["renamed"])], "error", "cannot read image file"),
    ("truncated PNG", lambda f: [S(f["truncated"])], "error", "cannot read image file"),
    ("truncated JPEG", lambda f: [S(f["truncated_jpg"])], "error", "cannot read image file"),
    ("EXIF-rotated photo", lambda f: [S(f["phone"])], "ok", lambda out: _extent(out[0].mask) == (30, 20)),
    ("EXIF photo opened with PIL", lambda f: [S(Image.open(f["phone"]))], "ok",
     lambda out: _extent(out[0].mask) == (30, 20)),
    ("int as image", lambda f: [S(42)], "error", "expected a PIL image, numpy array or file path, got int"),
    ("None as image", lambda f: [S(None)], "error", "got NoneType"),
    ("dict as image", lambda f: [S({"path": "x.png"})], "error", "got dict"),
    # masks: any mode or dtype, foreground relative to the mask's own range
    ("bool mask", lambda f: [S(RGB, mask=_mask(bool, True, False))], "ok", _mask_sum(50)),
    ("uint8 0/1 mask", lambda f: [S(RGB, mask=_mask(np.uint8))], "ok", _mask_sum(50)),
    ("int64 0/1 mask", lambda f: [S(RGB, mask=_mask(np.int64))], "ok", _mask_sum(50)),
    ("float 0..1 mask", lambda f: [S(RGB, mask=_mask(np.float32, 1.0))], "ok", _mask_sum(50)),
    ("float 0..255 mask", lambda f: [S(RGB, mask=_mask(np.float64, 255.0))], "ok", _mask_sum(50)),
    ("uint8 0/255 mask", lambda f: [S(RGB, mask=_mask(np.uint8, 255))], "ok", _mask_sum(50)),
    ("faint float mask", lambda f: [S(RGB, mask=_mask(np.float32, 0.2))], "ok", _mask_sum(50)),
    ("PNG 0/1 mask", lambda f: [S(RGB, mask=f["mask01"])], "ok", _mask_sum(50)),
    ("opaque RGBA mask", lambda f: [S(RGB, mask=f["mask_rgba_opaque"])], "ok", _mask_sum(50)),
    ("RGBA mask, alpha varies", lambda f: [S(RGB, mask=_rgba(_mask(np.uint8, 255)))], "ok", _mask_sum(50)),
    ("transparent RGBA mask", lambda f: [S(RGB, mask=Image.fromarray(np.dstack([_mask(np.uint8, 255)] * 3 + [
        np.zeros((20, 20), np.uint8)]), "RGBA"))], "ok", _mask_sum(50)),
    ("RGB red-on-black mask", lambda f: [S(RGB, mask=np.dstack([_mask(np.uint8, 255), np.zeros((20, 20, 2),
                                                                                              np.uint8)]))],
     "ok", _mask_sum(50)),
    ("mode 1 mask", lambda f: [S(RGB, mask=Image.fromarray(_mask(bool, True, False)))], "ok", _mask_sum(50)),
    ("16-bit mask file", lambda f: [S(RGB, mask=f["mask16"])], "ok", _mask_sum(50)),
    ("constant nonzero mask", lambda f: [S(RGB, mask=np.ones((20, 20), np.uint8))], "ok", _mask_sum(400)),
    ("EXIF photo, upright mask", lambda f: [S(f["phone"], mask=f["phone_mask"])], "ok", _mask_sum(200)),
    ("EXIF photo, EXIF mask", lambda f: [S(f["phone"], mask=f["phone_mask_exif"])], "ok", _mask_sum(200)),
    ("all-zero mask", lambda f: [S(RGB, mask=np.zeros((20, 20), np.uint8))], "error", "mask is empty (all background)"),
    ("all-false mask", lambda f: [S(RGB, mask=np.zeros((20, 20), bool))], "error", "mask is empty"),
    ("all-zero float mask", lambda f: [S(RGB, mask=np.zeros((20, 20)))], "error", "mask is empty"),
    ("all-zero mask file", lambda f: [S(RGB, mask=f["empty_mask"])], "error", "mask is empty"),
    ("mask size mismatch", lambda f: [S(RGB, mask=np.ones((21, 20), bool))], "error",
     "mask size 20x21 does not match image size 20x20"),
    ("EXIF photo, stored-size mask", lambda f: [S(f["phone"], mask=np.ones((20, 30), bool))], "error",
     "mask size 30x20 does not match image size 20x30"),
    ("NaN mask", lambda f: [S(RGB, mask=np.full((20, 20), np.nan))], "error", "NaN or infinite"),
    ("1-D mask", lambda f: [S(RGB, mask=np.ones(20))], "error", "must be HxW or HxWxC"),
    ("2-channel mask", lambda f: [S(RGB, mask=np.ones((20, 20, 2)))], "error", "1, 3 or 4 channels"),
    ("complex mask", lambda f: [S(RGB, mask=np.ones((20, 20), np.complex64))], "error", "dtype complex64"),
    ("missing mask file", lambda f: [S(RGB, mask=os.path.join(f["dir"], "nope_mask.png"))], "error",
     "mask: file not found"),
    ("text mask file", lambda f: [S(RGB, mask=f["renamed"])], "error", "mask: cannot read image file"),
    ("int as mask", lambda f: [S(RGB, mask=7)], "error", "mask: expected a PIL image"),
    # scales
    ("scale 1e30", lambda f: [S(RGB, scale=1e30)], "error", "scale must be a number between 0 and 10"),
    ("scale -1", lambda f: [S(RGB, scale=-1)], "error", "scale must be a number between 0 and 10"),
    ("scale NaN", lambda f: [S(RGB, scale=float("nan"))], "error", "scale must be finite"),
    ("scale inf", lambda f: [S(RGB, scale=float("inf"))], "error", "scale must be finite"),
    ("scale text", lambda f: [S(RGB, scale="strong")], "error", "scale must be a number"),
    ("scale None", lambda f: [S(RGB, scale=None)], "error", "scale must be a number"),
    ("reference_scale 11", lambda f: [S(RGB, reference_scale=11)], "error", "reference_scale must be a number between 0 and 10"),
    ("scale 10", lambda f: [S(RGB, scale=10, reference_scale=10)], "ok", lambda out: out[0].scale == 10),
    ("scale 0", lambda f: [S(RGB, scale=0, reference_scale=0)], "ok", lambda out: out[0].reference_scale == 0),
    ("scale as string number", lambda f: [S(RGB, scale="0.5")], "ok", lambda out: out[0].scale == 0.5),
    # the `subjects` argument's forms
    ("one Subject", lambda f: S(RGB), "ok", _n(1)),
    ("one PIL image", lambda f: Image.new("RGB", (8, 8)), "ok", _n(1)),
    ("one path", lambda f: f["good"], "ok", _n(1)),
    ("one array", lambda f: RGB, "ok", _n(1)),
    ("a tuple of images", lambda f: (RGB, Image.new("RGB", (8, 8))), "ok", _n(2)),
    ("a list mixing forms", lambda f: [S(RGB), f["good"]], "ok", _n(2)),
    ("no subjects", lambda f: [], "ok", _n(0)),
    ("None", lambda f: None, "ok", _n(0)),
    ("a path that is no file", lambda f: "nofile.png", "error", "file not found: nofile.png"),
    ("too many subjects", lambda f: [S(RGB)] * 5, "error", "Too many subjects: got 5, the maximum is 4"),
    ("an int in the list", lambda f: [S(RGB), 3], "error", "subject 1: expected anystory.Subject"),
    ("an int as subjects", lambda f: 42, "error", "expected a Subject, an image, a path or a list"),
]


def _ids(rows):
    return [r[0] for r in rows]


def _expect(call, expect, detail, error=ValueError):
    if expect == "error":
        with pytest.raises(error) as info:
            call()
        assert detail in str(info.value), f"expected {detail!r} in {str(info.value)!r}"
    else:
        assert detail(call()), "the result fails the row's check"


@pytest.mark.parametrize("row", SUBJECT_ROWS, ids=_ids(SUBJECT_ROWS))
def test_subjects(files, row):
    _, build, expect, detail = row
    _expect(lambda: prepare_subjects(build(files), segmenter=AlphaOrWholeImageSegmenter()), expect, detail)


ERROR_ROWS = [r for r in SUBJECT_ROWS if r[2] == "error"]


@pytest.fixture(scope="module")
def sdxl():
    from anystory.app.models import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    from anystory.flux.tiny_flux import tiny_anystory_flux_pipeline

    pipe = tiny_anystory_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("row", ERROR_ROWS, ids=_ids(ERROR_ROWS))
def test_sdxl_pipeline(files, sdxl, row):
    _, build, expect, detail = row
    _expect(lambda: sdxl("a cat", subjects=build(files), num_inference_steps=1), expect, detail)


#: Masks whose largest value is not above the release's threshold (200 of 255) keep the release's clear refusal on
#: FLUX (issue 14's choice); a 0/1 mask is read as 0/255 there too.
FLUX_BELOW_THRESHOLD = ("faint float mask", "RGB red-on-black mask")
FLUX_MASK_ROWS = [r for r in SUBJECT_ROWS if r[2] == "ok" and "mask" in r[0] and "EXIF" not in r[0]]


@pytest.mark.parametrize("row", FLUX_MASK_ROWS, ids=_ids(FLUX_MASK_ROWS))
def test_flux_reads_masks_by_the_same_rule(files, flux, row):
    """The FLUX path prepares subjects as the release does (its own threshold and crop) from the same masks."""
    name, build, _, _ = row
    subjects = build(files)
    assert prepare_subjects(subjects, segmenter=AlphaOrWholeImageSegmenter())[0].mask.any()
    if name in FLUX_BELOW_THRESHOLD:
        with pytest.raises(ValueError, match="no mask value above 200"):
            flux.check_subjects(subjects)
        return
    (prepared,) = flux.check_subjects(subjects)
    assert prepared.mask.any() and prepared.mask_values.max() == 255


@pytest.mark.parametrize("row", ERROR_ROWS, ids=_ids(ERROR_ROWS))
def test_flux_pipeline(files, flux, row):
    _, build, expect, detail = row
    _expect(lambda: flux("a cat", subjects=build(files), num_inference_steps=1, height=32, width=32), expect, detail)


# ---- the app: run_generation (Generate tab) and storyboard_frames (Storyboard tab) ------------------------------
def _slots(*images, **kw):
    return [SubjectSlot(image, **kw) for image in images]


APP_ROWS = [
    # (id, build(files) -> run_generation keyword arguments, expected handling, message fragment)
    ("no subject", lambda f: dict(slots=[SubjectSlot()]), "error", "No subject image"),
    ("text renamed .png", lambda f: dict(slots=_slots(f["renamed"])), "error",
     "Subject 1 image: cannot read renamed.png as an image"),
    ("truncated PNG", lambda f: dict(slots=_slots(f["truncated"])), "error", "cannot read truncated.png as an image"),
    ("truncated JPEG", lambda f: dict(slots=_slots(f["truncated_jpg"])), "error", "the file is damaged or truncated"),
    ("transparent PNG", lambda f: dict(slots=_slots(f["transparent"])), "error", "fully transparent"),
    ("unsupported .txt", lambda f: dict(slots=_slots(f["txt"])), "error", "unsupported file type '.txt'"),
    ("unsupported .svg", lambda f: dict(slots=_slots(f["svg"])), "error", "unsupported file type '.svg'"),
    ("over 10 MB", lambda f: dict(slots=_slots(f["big"])), "error", "the limit is 10 MB"),
    ("missing upload", lambda f: dict(slots=_slots(os.path.join(f["dir"], "gone.png"))), "error",
     "file not found: gone.png"),
    ("mask without image", lambda f: dict(slots=[SubjectSlot(mask=f["mask01"])]), "error",
     "a mask was given but no image"),
    ("text file as mask", lambda f: dict(slots=_slots(f["good"], mask=f["renamed"])), "error",
     "Subject 1 mask: cannot read renamed.png as an image"),
    ("empty mask file", lambda f: dict(slots=_slots(f["good"], mask=f["empty_mask"])), "error", "mask is empty"),
    ("EXIF photo, stored-size mask", lambda f: dict(slots=_slots(f["phone"], mask=f["truncated"])), "error",
     "cannot read truncated.png"),
    ("scale 1e30", lambda f: dict(slots=_slots(f["good"], scale=1e30)), "error", "scale must be a number between 0 and 10"),
    ("too many subjects", lambda f: dict(slots=_slots(*[f["good"]] * 5)), "error", "Too many subjects: 5 given"),
    ("prompt is a list", lambda f: dict(slots=_slots(f["good"]), prompt=["a", "cat"]), "error",
     "Prompt must be text, got list"),
    ("prompt is a number", lambda f: dict(slots=_slots(f["good"]), prompt=42), "error", "Prompt must be text, got int"),
    ("negative prompt is a dict", lambda f: dict(slots=_slots(f["good"]), negative_prompt={"a": 1}), "error",
     "Negative prompt must be text, got dict"),
    ("empty prompt", lambda f: dict(slots=_slots(f["good"]), prompt="   "), "error", "Prompt is empty"),
    ("prompt too long", lambda f: dict(slots=_slots(f["good"]), prompt="word " * 500), "error", "Prompt is too long"),
    ("seed text", lambda f: dict(slots=_slots(f["good"]), seed="lucky"), "error", "Seed must be an integer"),
    ("seed too big", lambda f: dict(slots=_slots(f["good"]), seed=2**40), "error", "Seed must be -1"),
    ("steps 0", lambda f: dict(slots=_slots(f["good"]), steps=0), "error", "Steps must be an integer between 1"),
    ("steps 2.5", lambda f: dict(slots=_slots(f["good"]), steps=2.5), "error", "Steps must be an integer"),
    ("guidance NaN", lambda f: dict(slots=_slots(f["good"]), guidance=float("nan")), "error", "Guidance must be"),
    ("width not a multiple", lambda f: dict(slots=_slots(f["good"]), width=65), "error", "Width must be"),
    ("images 9", lambda f: dict(slots=_slots(f["good"]), num_images=9), "error", "Images per prompt must be"),
]

APP_OK_ROWS = [
    # (id, slots, check of collect_subjects' (subjects, sources)): what run_generation hands the pipeline
    ("EXIF photo with a mask drawn as displayed", lambda f: _slots(f["phone"], mask=f["phone_mask"]),
     lambda out: out[0][0].image.size == (20, 30) and "uploaded mask" in out[1][0]),
    ("PNG 0/1 mask", lambda f: _slots(f["good"], mask=f["mask01"]),
     lambda out: int(np.asarray(out[0][0].mask).max()) == 1),
    ("opaque RGBA mask", lambda f: _slots(f["good"], mask=f["mask_rgba_opaque"]),
     lambda out: out[0][0].mask.mode == "RGBA"),
    ("16-bit photo", lambda f: _slots(f["photo16"]), lambda out: "automatic" in out[1][0]),
]


@pytest.fixture(scope="module")
def handle():
    return load_model(Environment(), "tiny")


@pytest.mark.parametrize("row", APP_ROWS, ids=_ids(APP_ROWS))
def test_app_generate(files, handle, row):
    _, build, expect, detail = row
    kw = dict(prompt="a cat on sand")
    kw.update(build(files))
    slots = kw.pop("slots")
    _expect(lambda: run_generation(handle, AlphaOrWholeImageSegmenter(), slots, **kw), expect, detail, InputError)


@pytest.mark.parametrize("row", APP_OK_ROWS, ids=_ids(APP_OK_ROWS))
def test_app_subjects(files, row):
    _, build, check = row
    _expect(lambda: collect_subjects(build(files), 4, AlphaOrWholeImageSegmenter()), "ok", check)


def _story(reference, alias="star", shots=(("{star} on sand", ""),), **settings):
    chars = [alias, "a red star", reference] + ["", "", None] * 5
    return chars, [list(s) for s in shots], settings


STORY_ROWS = [
    # (id, build(files) -> (character slot values, shot rows, settings), expected handling, message fragment)
    ("text renamed .png", lambda f: _story(f["renamed"]), "error", "Character 1 (star) image: cannot read renamed.png"),
    ("truncated reference", lambda f: _story(f["truncated"]), "error", "cannot read truncated.png as an image"),
    ("transparent reference", lambda f: _story(f["transparent"]), "error", "fully transparent"),
    ("missing reference", lambda f: _story(os.path.join(f["dir"], "gone.png")), "error", "file not found: gone.png"),
    ("unsupported reference", lambda f: _story(f["txt"]), "error", "unsupported file type '.txt'"),
    ("no alias", lambda f: _story(f["good"], alias=""), "error", "give it an alias"),
    ("no reference", lambda f: _story(None), "error", "has no reference image"),
    ("unknown alias", lambda f: _story(f["good"], shots=(("{moon} on sand", ""),)), "error", "moon"),
    ("no shots", lambda f: _story(f["good"], shots=()), "error", "Storyboard:"),
    ("steps 0", lambda f: _story(f["good"], steps=0), "error", "Steps must be an integer between 1"),
]


@pytest.mark.parametrize("row", STORY_ROWS, ids=_ids(STORY_ROWS))
def test_app_storyboard(files, handle, row):
    _, build, expect, detail = row
    chars, shots, settings = build(files)

    def run():
        script = script_from_ui(chars, shots, "t", settings)
        return list(storyboard_frames(handle, AlphaOrWholeImageSegmenter(), script, seed=1))

    _expect(run, expect, detail, InputError)


# ---- the eval harness: image loading of photos and of `folder:` method outputs ------------------------------------
EVAL_ROWS = [
    ("text renamed .png", lambda f: f["renamed"], "error", "renamed.png: cannot read image file"),
    ("truncated PNG", lambda f: f["truncated"], "error", "cannot read image file"),
    ("truncated JPEG", lambda f: f["truncated_jpg"], "error", "cannot read image file"),
    ("missing file", lambda f: os.path.join(f["dir"], "gone.png"), "error", "file not found"),
    ("fully transparent", lambda f: f["transparent"], "error", "fully transparent"),
    ("EXIF-rotated photo", lambda f: f["phone"], "ok", lambda im: im.size == (20, 30) and im.mode == "RGB"),
    ("16-bit PNG", lambda f: f["photo16"], "ok", lambda im: np.asarray(im).max() == round(40000 / 257)),
    ("RGBA on white", lambda f: f["mask_rgba_opaque"], "ok", lambda im: im.mode == "RGB"),
]


@pytest.mark.parametrize("row", EVAL_ROWS, ids=_ids(EVAL_ROWS))
def test_eval_image_loading(files, row):
    from eval.metrics.base import load_rgb

    _, build, expect, detail = row
    _expect(lambda: load_rgb(build(files)), expect, detail)


def test_eval_folder_method_that_is_no_folder(files):
    from eval.methods import MethodError, make_method

    with pytest.raises(MethodError, match="is not a folder"):
        make_method("folder:" + files["good"], files["dir"])


def test_the_corpus_is_large_enough():
    rows = len(SUBJECT_ROWS) + 2 * len(ERROR_ROWS) + len(FLUX_MASK_ROWS) + len(APP_ROWS) + len(APP_OK_ROWS) + len(STORY_ROWS) + len(EVAL_ROWS)
    assert rows >= 100 and len({r[0] for r in SUBJECT_ROWS}) == len(SUBJECT_ROWS)
