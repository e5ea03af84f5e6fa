"""Layout: ``Subject(region=...)`` confines a subject's routing to its region on both backbones (the learned
router still decides inside it; the two-subject case on both: ``tests/core/test_backbone_contract.py``), and bad
regions are refused by name."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from anystory import Subject
from anystory.sdxl.attention_processors import AnyStorySelfAttnProcessor
from anystory.errors import InvalidInputError
from anystory.regions import check_region, region_pixels
from anystory.app.storyboard import ScriptError, dump_script, parse_script, shot_subjects
from anystory.subjects import prepare_subjects
from helpers.routing import noise_image, routed_outside, tiny_pipe
from helpers.flux_pipe import CALL, PROMPT, gen, make_pipe, subject_image

LEFT, RIGHT = (0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)  # aligned with every layer's grid


def test_box_and_mask_regions_validated():
    assert check_region([0.1, 0.2, 0.6, 0.9], "s") == (0.1, 0.2, 0.6, 0.9)
    for bad, words in (((0, 0, 512, 512), "looks like pixels"), ((0.5, 0, 0.5, 1), "is empty"),
                       ((-0.1, 0, 1, 1), "negative"), ((0, 0, 1), "four numbers"),
                       ((0, 0, float("nan"), 1), "finite")):
        with pytest.raises(InvalidInputError, match=words):
            check_region(bad, "subject 0")
    mask = np.zeros((16, 24), np.uint8)
    mask[:, :8] = 255
    assert region_pixels(check_region(mask, "s"), 16, 24, "s")[:, :8].all()
    with pytest.raises(InvalidInputError, match="region mask size 24x16 does not match the output size 32x32"):
        region_pixels(check_region(mask, "s"), 32, 32, "subject 0")
    with pytest.raises(InvalidInputError, match="region"):
        check_region(np.zeros((8, 8)), "subject 0")  # an all-background region mask
    prepared = prepare_subjects([Subject(noise_image(1), region=LEFT)])
    assert prepared[0].region == LEFT
    assert region_pixels((0.0, 0.0, 0.5, 1.0), 4, 4, "s").sum() == 8


@pytest.fixture(scope="module")
def sdxl():
    return tiny_pipe()


def _sdxl(pipe, subjects, **kw):
    return pipe("a red striped star and a blue dotted moon on sand", subjects=subjects, num_inference_steps=3,
                generator=torch.Generator().manual_seed(0), output_type="np", routing_background_bias=1.0, **kw)


def test_sdxl_region_mask_equals_box_and_wrong_size_refused(sdxl):
    """A mask region of the output size acts as the equal box; another size fails before any encoding."""
    h = w = sdxl.default_sample_size * sdxl.vae_scale_factor
    mask = region_pixels(LEFT, h, w, "s").astype(np.uint8) * 255
    by_box = _sdxl(sdxl, [Subject(noise_image(1), region=LEFT)]).images
    by_mask = _sdxl(sdxl, [Subject(noise_image(1), region=mask)]).images
    assert np.array_equal(by_box, by_mask)
    with pytest.raises(InvalidInputError, match="does not match the output size"):
        _sdxl(sdxl, [Subject(noise_image(1), region=mask[:, :-8])])


def test_sdxl_no_layer_applies_a_subject_outside_its_region(sdxl, monkeypatch):
    """Every reference-attention call (maps carried over from the previous step included) and every semantic
    gate sees each subject at zero outside its region, resized to that layer's grid: outside its region a
    subject's routed conditions are removed exactly (the routing guarantee)."""
    seen = []
    original = AnyStorySelfAttnProcessor.__call__

    def spy(self, attn, hidden_states, *args, **kw):
        if self.state.active and self.state.prev_map is not None:
            seen.append(self.state.prev_map.detach().clone())
        return original(self, attn, hidden_states, *args, **kw)

    monkeypatch.setattr(AnyStorySelfAttnProcessor, "__call__", spy)
    _sdxl(sdxl, [Subject(noise_image(1), region=LEFT), Subject(noise_image(2), region=(0.5, 0.5, 1.0, 1.0))])
    assert len(seen) > 3
    for m in seen:
        h, w = m.shape[-2:]
        assert not m[:, 0][:, ~torch.from_numpy(region_pixels(LEFT, h, w, "s"))].any()
        assert not m[:, 1][:, ~torch.from_numpy(region_pixels((0.5, 0.5, 1.0, 1.0), h, w, "s"))].any()
    assert any(m[:, 0].any() for m in seen) and any(m[:, 1].any() for m in seen)


@pytest.fixture(scope="module")
def flux():
    return make_pipe()


def test_flux_one_subject_region_turns_the_router_on(flux):
    """FLUX: a region turns the release's router on for one subject too: image tokens outside the region never
    get the subject, and the image differs from the call without the region; without the router, a region is
    refused. (Two subjects confined to their regions: ``tests/core/test_backbone_contract.py``, both backbones.)"""
    one = flux(PROMPT, subjects=[Subject(*subject_image(0), region=LEFT)], generator=gen(), return_routing_maps=True,
               **CALL)
    assert routed_outside(one.routing_maps, 0, LEFT) == 0 and float(one.routing_maps[-1][:, 0].max()) == 1
    free = flux(PROMPT, subjects=[Subject(*subject_image(0))], generator=gen(), **CALL).images
    assert np.abs(one.images - free).max() > 1e-6
    with pytest.raises(ValueError, match="regions need the router"):
        flux(PROMPT, subjects=[Subject(*subject_image(0), region=LEFT)], use_router=False, **CALL)


STORY = {"characters": [{"alias": "cat"}, {"alias": "dog"}],
         "shots": [{"prompt": "{cat} and {dog} play", "regions": {"cat": [0, 0, 0.5, 1]}}, "{dog} sleeps"]}


def test_storyboard_regions_per_character_per_shot():
    """A shot's regions reach only that shot's subjects, survive a YAML round trip, and bad ones name the shot."""
    script = parse_script(json.dumps(STORY))
    subs = {"cat": Subject(noise_image(1)), "dog": Subject(noise_image(2))}
    first = shot_subjects(script, 0, subs)
    assert first[0].region == (0.0, 0.0, 0.5, 1.0) and first[1].region is None
    assert subs["cat"].region is None, "the cast's own Subject is not changed"
    assert shot_subjects(script, 1, subs)[0].region is None
    again = parse_script(dump_script(script, "yaml"), "yaml")
    assert again.shots[0].regions == script.shots[0].regions
    for regions, words in (({"cat": [0, 0, 300, 200]}, "shot 1: 'cat'.*looks like pixels"),
                           ({"owl": [0, 0, 1, 1]}, "shot 1: a region is given for 'owl'"),
                           ({"cat": "left"}, "shot 1: region of 'cat' must be a box"),
                           ([0, 0, 1, 1], "shot 1: regions must map")):
        bad = json.loads(json.dumps(STORY))
        bad["shots"][0]["regions"] = regions
        with pytest.raises(ScriptError, match=words):
            parse_script(json.dumps(bad))


def test_routing_study_layout_arithmetic():
    """The layout section's overlap: IoU of a drawn object with its box (0 when nothing is drawn) and the share
    inside; the boxes are the held-out scene's placements."""
    from benchmarks.routing_study import held_out_pairs, layout_overlap, scene_boxes
    from anystory.data.synthetic import SyntheticWorld, WorldConfig

    obj = np.zeros((8, 8), bool)
    obj[0:4, 0:2] = True  # 8 pixels, 4 of them inside the left-top quarter box
    out = layout_overlap([obj, None], [(0.0, 0.0, 0.5, 0.25), (0, 0, 1, 1)], 8)
    assert out["iou"] == [4 / 12, 0.0] and out["inside"] == [0.5]
    world = SyntheticWorld(7, WorldConfig(image_size=64, reference_size=32))
    k, subjects, bg = held_out_pairs(world, 1)[0]
    scene = world.scene(k, identities=subjects, background_name=bg)
    for mask, box in zip(scene.masks, scene_boxes(world, k, subjects, bg)):
        assert (mask & ~region_pixels(box, 64, 64, "s")).sum() <= 0.02 * mask.sum()  # the object lies in its box


def test_app_region_field(tmp_path):
    """The app's per-subject region field: "x0, y0, x1, y1" in fractions reaches the Subject; a blank field is no
    region; pixel numbers or words are refused by the UI's error naming the subject."""
    from anystory.app.inputs import InputError, SubjectSlot, collect_subjects
    from anystory.app.generate_tab import SLOT_FIELDS, slots_from_values
    from anystory.subjects import AlphaOrWholeImageSegmenter

    path = tmp_path / "s.png"
    Image.fromarray(noise_image(1)).save(path)
    values = [str(path), None, None, "cat", 1.0, 1.0, "0, 0, 0.5, 1", None,
              str(path), None, None, "dog", 1.0, 1.0, " ", None]
    assert len(values) == 2 * len(SLOT_FIELDS)
    subs, _ = collect_subjects(slots_from_values(values), 4, AlphaOrWholeImageSegmenter())
    assert subs[0].region == (0.0, 0.0, 0.5, 1.0) and subs[1].region is None
    for text, words in (("0 0 512 512", "Subject 1 \\(cat\\).*looks like pixels"), ("left", "must be four numbers")):
        with pytest.raises(InputError, match=words):
            collect_subjects([SubjectSlot(str(path), name="cat", region=text)], 4, AlphaOrWholeImageSegmenter())
