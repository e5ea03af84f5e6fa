"""The VAE decoder's loss: a plain L1 by default, subject pixels weighted up with ``vae.object_weight``."""
import numpy as np
import torch

from anystory.data.synthetic import SyntheticWorld
from anystory.training.vae import _batch, _images, reconstruction_loss


def test_plain_l1_without_weight_and_the_subjects_mean_with_a_large_one():
    x = torch.zeros(2, 3, 4, 4)
    decoded = torch.ones(2, 3, 4, 4)
    decoded[:, :, :2] = 3.0  # error 3 on the top half, 1 elsewhere
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, :2] = True  # the subjects: the top half
    assert reconstruction_loss(decoded, x, masks, 0.0) == (decoded - x).abs().mean()
    assert torch.isclose(reconstruction_loss(decoded, x, masks, 1.0), torch.tensor((2 * 3 + 1) / 3))
    assert abs(float(reconstruction_loss(decoded, x, masks, 1e6)) - 3.0) < 1e-4


def test_batch_masks_are_the_subjects_of_its_images():
    world = SyntheticWorld(0, image_size=32, reference_size=32)
    images, masks = _batch(world, "vae", 3, 8)
    assert len(images) == len(masks) == 8 and all(m.shape == (32, 32) and m.any() for m in masks)
    assert all(np.array_equal(a, b) for a, b in zip(images, _images(world, "vae", 3, 8)))
    for image, mask in zip(images, masks):  # subjects are saturated, the backdrop (or white) is not
        chroma = image.max(-1).astype(int) - image.min(-1)
        assert chroma[mask].mean() > 80 > chroma[~mask].mean()
