"""Training data on disk: the layout, folder / tar / parquet readers, the shard writer, and the synthetic world
written through them giving the trainer exactly the batches it draws from memory."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from anystory import AnyStorySDXLPipeline
from anystory.data.formats import Dataset, DataFormatError, decode_sample, encode_record_files
from anystory.data.shards import folder_samples, main as shards_main, synthetic_samples, write_dataset
from anystory.training.components import anystory_config, build_components
from anystory.training.config import load_config
from anystory.training.data import DatasetSource, SyntheticSource, source_for, subject_batch, world_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
BATCH, STEPS = 3, 2


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def _sample_files(seed=0, size=(40, 48), subjects=2, refs=False, caption="two things on a table"):
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    masks = np.zeros((subjects, h, w), bool)
    for i in range(subjects):
        masks[i, 4 + 10 * i:14 + 10 * i, 6:20 + 5 * i] = True
    files = encode_record_files(image, masks, caption, names=[f"thing {i}" for i in range(subjects)])
    if refs:
        for i in range(subjects):
            files[f"ref{i}.jpg"] = _jpeg(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8))
            files[f"refmask{i}.png"] = _png(np.pad(np.full((20, 20), 255, np.uint8), 5))
    return image, masks, files


def _jpeg(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def _write_folder(root, samples):
    os.makedirs(root, exist_ok=True)
    for key, files in samples.items():
        for ext, data in files.items():
            with open(os.path.join(root, f"{key}.{ext}"), "wb") as f:
                f.write(data)


def _same_record(a, b):
    assert a.key == b.key and a.caption == b.caption and a.generic_caption == b.generic_caption
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert len(a.references) == len(b.references)
    for r, s in zip(a.references, b.references):
        assert r.name == s.name
        assert np.array_equal(np.asarray(r.image), np.asarray(s.image))
        assert (r.mask is None) == (s.mask is None)
        if r.mask is not None:
            assert np.array_equal(np.asarray(r.mask), np.asarray(s.mask))


@pytest.fixture
def folder(tmp_path):
    samples = {"a0": _sample_files(0)[2], "b1": _sample_files(1, subjects=1, refs=True)[2],
               "c2": _sample_files(2, subjects=3)[2]}
    _write_folder(tmp_path / "folder", samples)
    return tmp_path / "folder"


def test_a_folder_decodes_to_its_images_masks_captions_and_references(folder):
    data = Dataset.open(str(folder))
    assert data.kind == "folder" and len(data) == 3 and data.counts() == {1: 1, 2: 1, 3: 1}
    image, masks, _ = _sample_files(0)
    rec = data.record_with(2, 0)
    assert rec.key == "a0" and rec.caption == "two things on a table" and rec.generic_caption == rec.caption
    assert np.array_equal(rec.image, image) and np.array_equal(rec.masks, masks)
    target = rec.routing_target()
    assert target.shape == (3, 40, 48) and np.array_equal(target.sum(0), np.ones((40, 48), np.float32))
    # multi-subject data without reference photos: each subject's reference is cut from the target by its mask
    assert [r.name for r in rec.references] == ["thing 0", "thing 1"]
    assert np.array_equal(np.asarray(rec.references[1].mask) > 127, masks[1])
    paired = data.record_with(1, 0)  # paired data: its own reference photo and mask
    assert np.asarray(paired.references[0].image).shape == (30, 30, 3)
    assert np.asarray(paired.references[0].mask).sum() == 400 * 255
    assert data.record_with(2, 5).key == "a0"  # positions wrap around a count's samples


@pytest.mark.parametrize("fmt", ["tar", "parquet"])
def test_shards_hold_exactly_the_folder(folder, tmp_path, fmt):
    out = tmp_path / fmt
    index = write_dataset(folder_samples(str(folder)), str(out), fmt, per_shard=2)
    assert [s["name"] for s in index["shards"]] == [f"00000.{fmt}", f"00001.{fmt}"]
    assert json.loads((out / "index.json").read_text()) == index
    a, b = Dataset.open(str(folder)), Dataset.open(str(out))
    assert b.kind == fmt and b.counts() == a.counts()
    for i in range(len(a)):
        _same_record(a.record(i), b.record(i))


def test_shards_stream_through_fsspec_urls(folder, tmp_path):
    import fsspec

    write_dataset(folder_samples(str(folder)), str(tmp_path / "tar"), "tar", per_shard=2)
    fs = fsspec.filesystem("memory")
    for name in os.listdir(tmp_path / "tar"):
        fs.pipe(f"/bucket/shards/{name}", (tmp_path / "tar" / name).read_bytes())
    remote, local = Dataset.open("memory://bucket/shards"), Dataset.open(str(folder))
    for i in range(len(local)):
        _same_record(local.record(i), remote.record(i))


def test_pack_command_and_resolution(folder, tmp_path):
    assert shards_main(["pack", str(folder), str(tmp_path / "p"), "--format", "parquet"]) == 0
    data = Dataset.open(str(tmp_path / "p"), resolution=16)
    rec = data.record_with(2, 0)
    assert rec.image.shape == (16, 16, 3) and rec.masks.shape == (2, 16, 16)
    assert rec.masks.any(axis=(1, 2)).all()
    assert np.asarray(rec.references[0].image).shape == (40, 48, 3)  # cut from the full-resolution image


def test_bad_samples_are_named(tmp_path):
    image, masks, files = _sample_files(0)
    assert decode_sample("ok", files).key == "ok"
    cases = {
        "needs exactly one target image": {k: v for k, v in files.items() if k != "png"},
        "no caption": {k: v for k, v in files.items() if k != "json"},
        "is not JSON": dict(files, json=b"{"),
        "must have the image's size": dict(files, **{"mask1.png": _png(np.zeros((8, 8), np.uint8))}),
        "numbered 0..n-1": {k: v for k, v in files.items() if k != "mask0.png"},
        "are empty": dict(files, **{"mask0.png": _png(np.zeros((40, 48), np.uint8))}),
        "do not match the": dict(files, **{"ref0.png": _png(np.zeros((8, 8, 3), np.uint8))}),
        "not a readable image": dict(files, png=b"not an image"),
        "1 to 4 are supported": dict(files, **{f"mask{i}.png": files["mask0.png"] for i in range(5)}),
    }
    for message, bad in cases.items():
        with pytest.raises(DataFormatError, match=message) as err:
            decode_sample("s17", bad)
        assert "s17" in str(err.value)
    with pytest.raises(DataFormatError, match="neither a sample folder nor shards"):
        Dataset.open(str(tmp_path / "missing"))
    _write_folder(tmp_path / "one", {"x": files})
    with pytest.raises(DataFormatError, match="no sample has 3 subject"):
        Dataset.open(str(tmp_path / "one")).record_with(3, 0)


def test_overlapping_masks_become_disjoint_later_subject_on_top():
    image, masks, files = _sample_files(0)
    both = np.zeros((40, 48), np.uint8)
    both[0:30, 0:30] = 255
    rec = decode_sample("o", dict(files, **{"mask0.png": _png(both)}))
    assert not (rec.masks[0] & rec.masks[1]).any()
    assert np.array_equal(rec.masks[1], masks[1])


@pytest.fixture(scope="module")
def smoke_pipe():
    torch.set_num_threads(1)
    cfg = load_config(SMOKE)
    torch.manual_seed(0)
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.init_anystory(**anystory_config(cfg))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("fmt", ["tar", "parquet", "folder"])
def test_the_synthetic_world_through_shards_gives_the_trainer_the_same_batches(smoke_pipe, tmp_path, fmt):
    """What the miniature's command draws from memory equals what it reads from the world written as shards."""
    from anystory.training.diffusion import training_scheduler
    from anystory.training.loop import step_generator
    from anystory.training.subject_step import subject_step

    cfg = load_config(SMOKE, {"stage1": {"batch_size": BATCH, "steps": STEPS}, "stage2": {"batch_size": BATCH}})
    for stage in ("stage1", "stage2"):
        write_dataset(synthetic_samples(cfg, stage, BATCH * STEPS), str(tmp_path / stage), fmt, per_shard=4)
    sharded = load_config(SMOKE, dict(cfg, data={"stage1": str(tmp_path / "stage1"), "stage2": str(tmp_path / "stage2")}))
    memory = source_for(cfg, "stage1")
    assert isinstance(memory, SyntheticSource) and isinstance(source_for(sharded, "stage1"), DatasetSource)
    scheduler = training_scheduler(smoke_pipe)
    for stage in ("stage1", "stage2"):
        disk = source_for(sharded, stage)
        for count in (1, 2, 3):
            for step in range(STEPS):
                a = subject_batch(smoke_pipe, memory, stage, step, BATCH, count, "cpu")
                b = subject_batch(smoke_pipe, disk, stage, step, BATCH, count, "cpu")
                assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
                assert torch.equal(a.targets, b.targets)
                assert [s.caption for s in a.samples] == [s.caption for s in b.samples]
                assert [s.generic_caption for s in a.samples] == [s.generic_caption for s in b.samples]
        smoke_pipe.anystory.train()
        for step in range(STEPS):  # and the whole training step: captions, noise, losses
            losses = []
            for cfg_, source in ((cfg, memory), (sharded, disk)):
                torch.manual_seed(step)
                with torch.no_grad():
                    out = subject_step(cfg_, stage, smoke_pipe, source, scheduler, step, BATCH,
                                       step_generator(cfg, stage, step), teacher_routing=stage == "stage1",
                                       routing_weight=0.1)
                losses.append({k: v.item() for k, v in out.items()})
            assert losses[0] == losses[1]
    smoke_pipe.anystory.eval()


def test_synthetic_command_writes_one_pass_of_the_stage(tmp_path):
    assert shards_main(["synthetic", str(tmp_path / "s"), "--config", SMOKE, "--stage", "stage2",
                        "--format", "tar", "--per-shard", "100"]) == 0
    data = Dataset.open(str(tmp_path / "s"))
    steps, batch = 3, 2  # configs/smoke.yaml: stage2 {steps: 3, batch_size: 2}, subjects 1-3 by default weights
    assert data.counts() == {1: steps * batch, 2: steps * batch, 3: steps * batch}
    world = world_for(load_config(SMOKE))
    assert data.record_with(2, 1).caption == SyntheticSource(world).record("stage2", 1, 2).caption
