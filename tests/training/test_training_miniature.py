"""The shipped miniature: loaded by the real SDXL code path, small, fast on a CPU, and it draws its subjects."""
import json
import os
import time

import numpy as np
import pytest
import torch

from anystory import AnyStorySDXLPipeline, Subject
from anystory.sdxl.miniature import MINIATURE_DIR, load_miniature

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    p = load_miniature()
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_is_diffusers_format_and_small():
    with open(os.path.join(MINIATURE_DIR, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "AnyStorySDXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "image_encoder"):
        assert os.path.isdir(os.path.join(MINIATURE_DIR, name)), name
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(MINIATURE_DIR) for f in fs)
    assert size <= 25 * 2**20


def test_same_code_path_as_sdxl(pipe):
    assert type(pipe) is AnyStorySDXLPipeline
    same = AnyStorySDXLPipeline.from_pretrained(MINIATURE_DIR, dtype=torch.float32)
    same.load_anystory_weights(MINIATURE_DIR)
    a, b = pipe.anystory.state_dict(), same.anystory.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert pipe.unet.dtype == torch.float32 and pipe.max_subjects == 4


def test_generates_two_subjects_in_a_few_seconds(pipe):
    from anystory.data.synthetic import Identity, SyntheticWorld

    world = SyntheticWorld(5)
    refs = [world.reference(Identity.parse(n), 0).image for n in ("red striped star", "blue dotted moon")]
    started = time.perf_counter()
    out = pipe("two objects on sand", subjects=[Subject(r) for r in refs], num_inference_steps=20, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="np", return_routing_maps=True)
    seconds = time.perf_counter() - started
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()
    maps = out.routing_maps[-1][0]
    assert maps.shape == (3, 16, 16)
    assert (maps[:2] > 0.5).flatten(1).any(1).all(), "each subject should own some positions"
    assert seconds < 30


def test_draws_the_reference_colour_where_the_router_sends_it(pipe):
    """One red subject, generic prompt: the colour can only come from the reference."""
    from anystory.data.object_finder import foreground_mask
    from anystory.data.synthetic import COLOURS, Identity, SyntheticWorld
    from benchmarks.routing_study import nearest_colour

    world = SyntheticWorld(6)
    hits = 0
    for seed, name in enumerate(("red striped star", "blue dotted moon", "yellow circle")):
        ref = world.reference(Identity.parse(name), seed).image
        out = pipe("an object on snow", subjects=[Subject(ref)], num_inference_steps=20, guidance_scale=3.0,
                   generator=torch.Generator().manual_seed(seed), output_type="np")
        img = (out.images[0] * 255).round().astype(np.uint8)
        fg = foreground_mask(img)
        if fg.sum() >= 20:
            colours = nearest_colour(img[fg])
            hits += np.bincount(colours, minlength=len(COLOURS)).argmax() == list(COLOURS).index(Identity.parse(name).colour)
    assert hits >= 2
