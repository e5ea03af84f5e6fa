"""The synthetic world: deterministic, exact masks, varied poses, captions that name what is drawn."""
import numpy as np
import pytest

from anystory.data.object_finder import find_objects, foreground_mask
from anystory.data.synthetic import (ALL_IDENTITIES, BACKGROUNDS, COLOURS, IDENTITIES, SHADE, Identity,
                                     SyntheticWorld, WorldConfig, shape_mask)


def test_at_least_eight_distinct_named_identities():
    assert len(IDENTITIES) >= 8 and len(set(IDENTITIES)) == len(IDENTITIES)
    assert {i.shape for i in IDENTITIES} >= {"star", "moon", "square", "circle", "heart", "triangle", "diamond", "cross"}
    assert len(ALL_IDENTITIES) == 8 * 6 * 4
    assert Identity.parse("a red striped star").name == "red striped star"
    assert Identity.parse("yellow circle").texture == "solid"


def test_bad_names_are_refused():
    with pytest.raises(ValueError, match="colour"):
        Identity.parse("striped star")
    with pytest.raises(ValueError, match="unknown shape"):
        Identity("hexagon", "red", "solid")
    with pytest.raises(ValueError, match="identities"):
        WorldConfig(identities="some")


def test_scenes_are_deterministic_and_seeds_differ():
    a, b, other = SyntheticWorld(3).scene(17), SyntheticWorld(3).scene(17), SyntheticWorld(4).scene(17)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    assert not np.array_equal(a.image, other.image)


def test_masks_are_exact_and_disjoint():
    world = SyntheticWorld(0)
    for i in range(30):
        scene = world.scene(i)
        assert scene.masks.dtype == bool and scene.masks.shape[1:] == scene.image.shape[:2]
        assert (scene.masks.sum(axis=0) <= 1).all()
        target = scene.routing_target()
        assert np.array_equal(target.sum(axis=0), np.ones(scene.image.shape[:2], np.float32))
        for mask, place in zip(scene.masks, scene.placements):
            assert mask.sum() > 50
            base = np.asarray(COLOURS[place.identity.colour], np.float32)
            pixels = scene.image[mask].astype(np.float32)
            # every masked pixel is the subject's colour or its texture tone (+ render noise), nothing else
            err = np.minimum(np.abs(pixels - base).max(1), np.abs(pixels - base * SHADE).max(1))
            assert err.max() <= 16, f"scene {i}: a masked pixel is not {place.identity.colour}"
        outside = ~scene.masks.any(axis=0)
        assert (np.ptp(np.asarray(scene.image, np.float32)[outside], axis=1) < 65).mean() > 0.99


def test_texture_and_pose_vary_but_identity_reads_the_same():
    world = SyntheticWorld(1)
    star = Identity.parse("red striped star")
    refs = [world.reference(star, i) for i in range(6)]
    masks = [r.mask for r in refs]
    assert len({m.tobytes() for m in masks}) == 6, "poses should differ"
    for r in refs:
        rgb = np.asarray(r.image)[..., :3][r.mask].astype(np.float32)
        dark = (np.abs(rgb - np.asarray(COLOURS["red"]) * SHADE).max(1) < 16).mean()
        assert 0.25 < dark < 0.75, "stripes should cover about half of the subject"
    solid = world.reference(Identity.parse("red star"), 0)
    rgb = np.asarray(solid.image)[..., :3][solid.mask].astype(np.float32)
    assert (np.abs(rgb - np.asarray(COLOURS["red"])).max(1) < 16).all()


def test_scene_variety_counts_sizes_positions_backgrounds():
    world = SyntheticWorld(2)
    scenes = [world.scene(i) for i in range(60)]
    assert {len(s.placements) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    radii = [p.radius for s in scenes for p in s.placements]
    xs = [p.center[0] for s in scenes for p in s.placements]
    assert max(radii) - min(radii) > 3 and max(xs) - min(xs) > 25
    for s in scenes:
        colours = [p.identity.colour for p in s.placements]
        assert len(set(colours)) == len(colours)  # distinct colours by default


def test_captions_name_every_subject_and_the_background():
    scene = SyntheticWorld(0).scene(0, identities=[Identity.parse("red striped star"), Identity.parse("blue dotted moon")],
                                    background_name="sand")
    assert scene.caption == "a red striped star and a blue dotted moon on sand"
    assert scene.generic_caption == "two objects on sand"
    three = SyntheticWorld(0).scene(1, identities=IDENTITIES[3:6], background_name="snow")
    assert three.caption == "a yellow circle, a purple striped triangle and an orange dotted heart on snow"


def test_training_samples_pair_references_with_their_scene_subjects():
    world = SyntheticWorld(0)
    sample = world.sample(5)
    assert [r.identity for r in sample.references] == sample.scene.identities
    for ref, mask in zip(sample.references, sample.scene.masks):
        assert ref.image.mode == "RGBA" and ref.image.size == (64, 64)
        assert ref.mask.mean() > 0.12, "a reference shows the subject large"
        assert ref.mask.sum() > mask.sum()


def test_shapes_are_distinct_silhouettes():
    masks = {s: shape_mask(s, (64, 64), (32, 32), 24, 0.0) for s in
             ("circle", "square", "triangle", "star", "moon", "heart", "diamond", "cross")}
    names = list(masks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.85, f"{a} and {b} look alike (IoU {iou:.2f})"


def test_object_finder_recovers_rendered_subjects():
    world = SyntheticWorld(9)
    for i in range(40):
        scene = world.scene(i)
        found = find_objects(scene.image)
        assert len(found) == len(scene.masks)
        for mask in scene.masks:
            best = max((mask & f).sum() / (mask | f).sum() for f in found)
            assert best > 0.9
    assert not foreground_mask(np.full((64, 64, 3), 128, np.uint8)).any()


def test_max_rotation_bounds_scene_poses_only_and_keeps_the_rest_of_the_scene():
    free, upright = SyntheticWorld(0), SyntheticWorld(0, WorldConfig(max_rotation=15))
    assert SyntheticWorld(0, WorldConfig(max_rotation=180)).scene(5).placements == free.scene(5).placements
    turns = [p.rotation for i in range(40) for p in free.scene(i).placements]
    assert max(abs(t) for t in turns) > np.radians(90)
    for i in range(40):
        a, b = free.scene(i), upright.scene(i)
        assert [p.identity for p in a.placements] == [p.identity for p in b.placements]
        assert [p.center for p in a.placements] == [p.center for p in b.placements]
        assert all(abs(p.rotation) <= np.radians(15) for p in b.placements)
    ref_a, ref_b = free.reference(ALL_IDENTITIES[9], 3), upright.reference(ALL_IDENTITIES[9], 3)
    assert np.array_equal(np.asarray(ref_a.image), np.asarray(ref_b.image))  # references turn freely in both
    with pytest.raises(ValueError, match="max_rotation"):
        WorldConfig(max_rotation=200)
