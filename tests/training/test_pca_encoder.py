"""The fixed PCA encoder: the VAE's encoder computes exactly the PCA codes of its patches (4x4 with three levels,
2x2 with two), whitened as asked, and refuses a VAE it cannot be written into."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from anystory.training.pca_encoder import fit_basis, patch_of, pca_codes, set_pca_encoder


def _vae(channels, k):
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=k, block_out_channels=tuple(channels),
                         down_block_types=("DownEncoderBlock2D",) * len(channels),
                         up_block_types=("UpDecoderBlock2D",) * len(channels), norm_num_groups=8, sample_size=32, mid_block_add_attention=False)


@pytest.mark.parametrize("channels, k, patch", [((16, 32, 32), 8, 4), ((32, 32), 6, 2)])
def test_encoder_computes_the_codes_of_its_patches(channels, k, patch):
    rng = np.random.default_rng(0)
    smooth = rng.uniform(-1, 1, (24, 4, 4, 3)).repeat(8, 1).repeat(8, 2)  # blocky images: patches have structure
    images = np.clip(smooth + 0.2 * rng.standard_normal(smooth.shape), -1, 1)
    vae = _vae(channels, k)
    assert patch_of(vae) == patch
    mean, basis, std = fit_basis(images, k, patch)
    set_pca_encoder(vae, mean, basis, std, whiten=0.5)
    x = torch.from_numpy(images[:4]).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        got = vae.encode(x).latent_dist.mode().numpy()
    want = pca_codes(images[:4], mean, basis, patch) / (std ** 0.5)[None, :, None, None]
    assert got.shape == (4, k, 32 // patch, 32 // patch)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()


def test_a_vae_without_room_for_the_codes_is_refused():
    vae = _vae((16, 32), 6)  # 6 codes x 4 channels a group do not fit in the 16 channels before the last level
    mean, basis, std = fit_basis(np.zeros((2, 8, 8, 3)) + np.arange(3) / 3, 6, 2)
    with pytest.raises(ValueError, match="room for k codes"):
        set_pca_encoder(vae, mean, basis, std)
