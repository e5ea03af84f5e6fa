"""The subject stages' diffusion loss: uniform by default, latent cells covering subjects weighted up with
``stage1.object_weight`` / ``stage2.object_weight`` (the base stage's rule, read from the routing ground truth)."""
import numpy as np
import torch

from anystory.data.synthetic import SyntheticWorld
from anystory.training.base import object_weights
from anystory.training.subject_step import target_weights


def _targets(scenes):
    return torch.from_numpy(np.stack([s.routing_target() for s in scenes]))


def test_no_weights_without_object_weight():
    assert target_weights(_targets([SyntheticWorld(0).scene(1)]), (16, 16), 0.0) is None


def test_weights_equal_the_base_stages_for_the_same_scenes_whatever_the_subject_count():
    world = SyntheticWorld(0)
    for count in (1, 2, 3):
        scenes = [world.scene(i, count=count) for i in range(4)]
        assert all(s.masks.shape[0] == count for s in scenes)
        weight = target_weights(_targets(scenes), (16, 16), 6.0)
        assert weight.shape == (4, 1, 16, 16)
        assert torch.allclose(weight.mean(dim=(1, 2, 3)), torch.ones(4))
        assert torch.allclose(weight, object_weights(scenes, (16, 16), 6.0))
        assert (weight.amax(dim=(1, 2, 3)) > 2 * weight.amin(dim=(1, 2, 3))).all()
