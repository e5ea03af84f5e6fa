"""The base's diffusion loss: uniform by default, latent cells covering subjects weighted up with
``base.object_weight``."""
import numpy as np
import torch

from anystory.data.synthetic import SyntheticWorld
from anystory.training.base import object_weights


def test_no_weights_without_object_weight():
    world = SyntheticWorld(0)
    assert object_weights([world.scene(1)], (16, 16), 0.0) is None


def test_weights_have_mean_one_and_follow_the_subjects():
    world = SyntheticWorld(0)
    scenes = [world.scene(i) for i in range(3)]
    weight = object_weights(scenes, (16, 16), 6.0)
    assert weight.shape == (3, 1, 16, 16)
    assert torch.allclose(weight.mean(dim=(1, 2, 3)), torch.ones(3))
    for scene, w in zip(scenes, weight[:, 0]):
        covered = torch.from_numpy(scene.masks.any(axis=0).reshape(16, 4, 16, 4).mean(axis=(1, 3)))
        assert float(w[covered == 1].min()) > 5.0 * float(w[covered == 0].max())
        assert np.allclose(w[covered == 0].numpy(), float(w[covered == 0][0]))
