"""Subject validation and preparation, shared by both pipelines and the app."""
import numpy as np
import pytest
from PIL import Image

from anystory.subjects import AlphaOrWholeImageSegmenter, Segmenter, Subject, prepare_subjects, square_crop_box


def test_mask_crops_a_square_on_white_around_the_subject():
    img = np.zeros((100, 200, 3), np.uint8)  # black photo
    mask = np.zeros((100, 200), bool)
    mask[40:60, 150:190] = True  # 20 x 40 subject
    img[mask] = (200, 10, 10)
    (p,) = prepare_subjects([Subject(img, mask=mask)])
    side = round(40 * 1.04)
    assert abs(p.image.width - side) <= 1 and p.image.width == p.image.height
    arr = np.asarray(p.image)
    assert (arr[~p.mask] == 255).all(), "outside the mask must be white (including padding past the border)"
    assert (arr[p.mask] == (200, 10, 10)).all()
    assert p.mask.sum() == mask.sum() and p.mask_source == "given"


def test_square_crop_box_centres_the_mask():
    m = np.zeros((50, 50), bool)
    m[10:20, 10:30] = True
    x0, y0, x1, y1 = square_crop_box(m, 1.0)
    assert (x1 - x0, y1 - y0) == (20, 20) and (x0, y0) == (10, 5)


def test_alpha_channel_is_the_default_mask():
    rgba = np.zeros((30, 30, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[5:15, 5:25, 3] = 255
    (p,) = prepare_subjects([Subject(Image.fromarray(rgba, "RGBA"))])
    assert p.mask_source == "alpha" and p.mask.sum() == 200
    (q,) = prepare_subjects([Subject(Image.new("RGB", (30, 20), "red"))])
    assert q.mask_source == "whole-image" and q.mask.sum() == 30 * 20  # square crop pads outside the mask


def test_custom_segmenter_is_used_and_checked():
    class Centre(Segmenter):
        name = "centre"

        def __call__(self, image):
            m = np.zeros((image.height, image.width), bool)
            m[image.height // 4: -image.height // 4, image.width // 4: -image.width // 4] = True
            return m

    (p,) = prepare_subjects([Subject(Image.new("RGB", (40, 40)))], segmenter=Centre())
    assert p.mask_source == "centre" and p.mask.sum() == 400

    class Wrong(Segmenter):
        name = "wrong"

        def __call__(self, image):
            return np.ones((3, 3), bool)

    with pytest.raises(ValueError, match="wrong returned a mask of shape"):
        prepare_subjects([Subject(Image.new("RGB", (40, 40)))], segmenter=Wrong())


def test_errors_name_the_subject_and_the_problem(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"subject 1 \(bob\) image: cannot read image file"):
        prepare_subjects([Subject(Image.new("RGB", (8, 8))), Subject(str(bad), name="bob")])
    with pytest.raises(ValueError, match="mask size 8x9 does not match image size 8x8"):
        prepare_subjects([Subject(Image.new("RGB", (8, 8)), mask=np.ones((9, 8), bool))])
    with pytest.raises(ValueError, match="file not found: a.png"):
        prepare_subjects(["a.png"])
    with pytest.raises(ValueError, match="expected anystory.Subject"):
        prepare_subjects([3])
    with pytest.raises(ValueError, match="maximum is 2"):
        prepare_subjects([Subject(Image.new("RGB", (8, 8)))] * 3, max_subjects=2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        prepare_subjects([Subject(np.full((4, 4, 3), np.nan, np.float32))])


def test_float_and_bool_arrays_are_accepted():
    img = np.random.RandomState(0).rand(16, 16, 3).astype(np.float32)
    mask = np.zeros((16, 16), bool)
    mask[2:10, 2:10] = True
    (p,) = prepare_subjects([Subject(img, mask=mask)])
    assert p.image.mode == "RGB" and p.mask.sum() == 64
