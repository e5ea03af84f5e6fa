"""``python -m anystory.data.prepare``: a folder of images with captions -> shards for both stages, masks given or
from a matting model (here a tiny one built in code, in BiRefNet's interface), and a FLUX stage's step reads them."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anystory.data.formats import DataFormatError, Dataset
from anystory.data.prepare import main, prepare
from anystory.matting import BiRefNetSegmenter

SQUARES = [(4, 4, 28, 28), (36, 40, 60, 60)]  # x0, y0, x1, y1 of two dark objects on white


def dark_is_foreground():
    """A 1x1 convolution on BiRefNet's ImageNet-normalised input: positive logits where the pixel is dark."""
    conv = torch.nn.Conv2d(3, 1, 1)
    with torch.no_grad():
        conv.weight.copy_(-10 * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        conv.bias.fill_(-0.5 * 10 * 3 + 10 * (0.485 + 0.456 + 0.406))  # 0 at mid-grey
    return conv.eval()


def box_mask(box, size=64):
    m = np.zeros((size, size), bool)
    m[box[1]:box[3], box[0]:box[2]] = True
    return m


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    img = np.full((64, 64, 3), 255, np.uint8)
    for (x0, y0, x1, y1), colour in zip(SQUARES, [(200, 20, 20), (20, 20, 200)]):
        img[y0:y1, x0:x1] = [c // 4 for c in colour]
    Image.fromarray(img).save(src / "a.png")  # no masks: the matting model finds two objects
    (src / "a.txt").write_text("a red square and a blue square\n")
    Image.fromarray(img).save(src / "b.jpg")  # one given mask
    (src / "b.json").write_text(json.dumps({"caption": "a red square", "subjects": [{"name": "red square"}]}))
    Image.fromarray(box_mask(SQUARES[0]).astype(np.uint8) * 255).save(src / "b.mask0.png")
    Image.fromarray(img).save(src / "c.png")  # two given masks
    (src / "c.txt").write_text("two squares")
    for i, box in enumerate(SQUARES):
        Image.fromarray(box_mask(box).astype(np.uint8) * 255).save(src / f"c.mask{i}.png")
    return src


def test_shards_for_both_stages(folder, tmp_path):
    out = tmp_path / "out"
    counts = prepare(str(folder), str(out), BiRefNetSegmenter(dark_is_foreground(), resolution=32), fmt="tar")
    assert counts == {"stage1": 3, "stage2": 2}
    one, two = Dataset.open(str(out / "stage1")), Dataset.open(str(out / "stage2"))
    assert one.counts() == {1: 1, 2: 2} and two.counts() == {2: 2}
    a = one.record(0)
    assert a.caption == "a red square and a blue square" and a.masks.shape == (2, 64, 64)
    for mask, box in zip(a.masks, sorted(SQUARES, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))):
        truth = box_mask(box)
        assert (mask & truth).sum() / (mask | truth).sum() > 0.9  # the matting model's regions, largest first
    b, c = one.record(1), one.record(2)
    assert np.array_equal(b.masks[0], box_mask(SQUARES[0])) and b.caption == "a red square"
    assert all(np.array_equal(m, box_mask(box)) for m, box in zip(c.masks, SQUARES))
    assert len(c.references) == 2  # cut from the image by its masks: the stage-1 reference path


def test_a_flux_stage_reads_the_prepared_shards(folder, tmp_path):
    from anystory.training.config import load_config
    from anystory.training.data import source_for
    from anystory.training.flux_stages import load_stage_input
    from anystory.training.flux_step import flux_step

    out = tmp_path / "out"
    prepare(str(folder), str(out), BiRefNetSegmenter(dark_is_foreground(), resolution=32), fmt="parquet")
    cfg = load_config("configs/flux_tiny.yaml", {"work_dir": str(tmp_path / "run"), "data": {
        "stage1": str(out / "stage1"), "stage2": str(out / "stage2"), "resolution": 32}})
    pipe = load_stage_input(cfg, "flux_router")
    with torch.no_grad():
        losses = flux_step(cfg, "flux_router", pipe, source_for(cfg, "stage2"), 0, 2, torch.Generator().manual_seed(0),
                           count=2)
    assert all(torch.isfinite(v) for v in losses.values()) and 0 <= float(losses["miou"]) <= 1


def test_bad_input_is_named(folder, tmp_path):
    (folder / "a.txt").unlink()
    with pytest.raises(DataFormatError, match="a: no caption"):
        prepare(str(folder), str(tmp_path / "out"), BiRefNetSegmenter(dark_is_foreground(), resolution=32))
    (folder / "a.txt").write_text("caption")
    with pytest.raises(DataFormatError, match="a: no mask files"):
        prepare(str(folder), str(tmp_path / "out"), masks="given")
