"""The miniature figure: one row per scene with 1, 2 and 3 subjects, references beside outputs and routing maps."""
import numpy as np
from PIL import Image

from anystory.data.synthetic import SyntheticWorld, WorldConfig
from benchmarks.miniature_figure import CELL, main, scene_subjects
from benchmarks.routing_study import STUDY_SEED


def test_scene_subjects_differ_in_shape_and_colour_and_are_reproducible():
    world = SyntheticWorld(STUDY_SEED, WorldConfig())
    for count in (1, 2, 3):
        subjects, backdrop = scene_subjects(world, 50_000 + count, count)
        assert len(subjects) == count and backdrop in world.config.backgrounds
        assert len({s.shape for s in subjects}) == len({s.colour for s in subjects}) == count
        assert scene_subjects(world, 50_000 + count, count) == (subjects, backdrop)


def test_figure_has_a_row_per_scene_with_references_outputs_and_maps(tmp_path):
    out = tmp_path / "figure.png"
    assert main(["--rows", "1", "--steps", "2", "--out", str(out)]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape[1] == 6 * CELL + 5 * 4  # 3 reference slots, output, overlay, routing map
    assert image.shape[0] == 3 * (14 + CELL) + 2 * 6
