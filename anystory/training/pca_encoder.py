"""A fixed, linear VAE encoder: ``AutoencoderKL``'s encoder weights set so that it computes PCA of image patches.

Training a small VAE from scratch is by far the slowest part of a CPU miniature (a GroupNorm autoencoder needs
thousands of steps before colours are right). The issue allows "a fixed down/up-sampler" instead; we keep the
real ``AutoencoderKL`` class (so the pipeline's code path is SDXL's) and *set* its encoder. The patch is the
VAE's down-sampling factor: 4x4 with three levels, 2x2 with two.

* ``conv_in`` copies RGB, every residual block is the identity (its last conv is zero); with three levels the
  first strided conv is a 2x2 space-to-depth; the last strided conv applies the PCA basis to the patch
  (48 or 12 values -> k codes);
* the encoder's closing GroupNorm would normalise each image's codes away. Each code therefore shares its
  group with an all-zero channel and is scaled far below the norm's epsilon, where GroupNorm is affine:
  ``(code - m) / sqrt(eps)`` for the code and ``-m / sqrt(eps)`` for its zero partner, so their difference,
  taken by ``conv_out``, is the code again, whatever the image. A large bias keeps SiLU in its linear range.

The decoder (upsampling by nearest + conv cannot do depth-to-space linearly) is trained against this encoder.
The basis comes from patches of the synthetic world; k = latent channels (8 of a 4x4 patch keep the textures;
see the trade-off in the training notes).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKL

PATCH = 4  # the shipped miniature's patch (three levels)
CODE_SCALE = 3e-5  # codes (whitened) enter the closing GroupNorm at this size: variance << its eps (1e-6)
SILU_SHIFT = 16.0  # SiLU(x) = x to float precision for x >= 16


def patch_of(vae: AutoencoderKL) -> int:
    """The VAE's down-sampling factor: the side of the patch one latent cell encodes."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def patches(images: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """``[n, H, W, 3]`` -> ``[n * H/p * W/p, p * p * 3]`` patch vectors, ordered (row, column, channel)."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, patch * patch * c)


def fit_basis(images: np.ndarray, k: int, patch: int = PATCH) -> tuple:
    """(mean [p*p*3], basis [k, p*p*3], std [k]) of ``patch`` x ``patch`` patches of ``images`` in [-1, 1]."""
    p = patches(images.astype(np.float64), patch)
    mean = p.mean(0)
    _, s, vt = np.linalg.svd(p - mean, full_matrices=False)
    std = s[:k] / math.sqrt(len(p))
    return mean, vt[:k], std


def check_config(vae: AutoencoderKL, k: int) -> None:
    cfg = vae.config
    chans = list(cfg.block_out_channels)
    problems = []
    if len(chans) not in (2, 3):
        problems.append("2 or 3 levels (a 2x or 4x down-sampling)")
    if cfg.layers_per_block != 1:
        problems.append("layers_per_block 1")
    if cfg.latent_channels != k:
        problems.append(f"latent_channels == k ({k})")
    if cfg.norm_num_groups < k or chans[-1] // cfg.norm_num_groups < 2:
        problems.append("norm_num_groups >= latent channels with >= 2 channels per group at the last level")
    if len(chans) == 3 and (chans[0] < 12 or chans[1] < 12):
        problems.append("at least 12 channels at the first two levels")
    if k * (chans[-1] // max(1, cfg.norm_num_groups)) > chans[-2]:
        problems.append("room for k codes, one per group of the last level, in the level before it")
    if cfg.mid_block_add_attention:
        problems.append("mid_block_add_attention False")
    if problems:
        raise ValueError("a PCA encoder needs an AutoencoderKL with " + "; ".join(problems))


def _set_projection(vae: AutoencoderKL, mean: np.ndarray, basis: np.ndarray, std: np.ndarray, group: int) -> None:
    """The last strided conv computes code m (tiny, shifted by its mean) into channel ``m * group``; with three
    levels the first one gathers each 2x2 block into channels (space-to-depth), so the last sees a 4x4 patch."""
    enc, k, patch = vae.encoder, basis.shape[0], patch_of(vae)
    b = torch.from_numpy(basis / std[:, None]).float().view(k, patch, patch, 3)  # (row, column, channel)
    proj = enc.down_blocks[-2].downsamplers[0].conv
    if patch == 2:
        for m, c, dy, dx in np.ndindex(k, 3, 2, 2):
            proj.weight[m * group, c, dy, dx] = CODE_SCALE * b[m, dy, dx, c]
    else:
        s2d = enc.down_blocks[0].downsamplers[0].conv  # 2x2 space-to-depth: channel c*4 + dy*2 + dx
        for c, dy, dx in np.ndindex(3, 2, 2):
            s2d.weight[c * 4 + dy * 2 + dx, c, dy, dx] = 1.0
        for m, c, dy1, dx1, dy2, dx2 in np.ndindex(k, 3, 2, 2, 2, 2):  # the 4x4 patch as 2x2 of 2x2
            proj.weight[m * group, c * 4 + dy1 * 2 + dx1, dy2, dx2] = CODE_SCALE * b[m, dy2 * 2 + dy1, dx2 * 2 + dx1, c]
    for m in range(k):
        proj.bias[m * group] = -CODE_SCALE * float(np.dot(basis[m] / std[m], mean))


@torch.no_grad()
def set_pca_encoder(vae: AutoencoderKL, mean: np.ndarray, basis: np.ndarray, std: np.ndarray,
                    whiten: float = 0.0) -> None:
    """Overwrite ``vae``'s encoder (and quant_conv) so ``encode(x).latent_dist.mode()`` = PCA codes of its patches,
    each divided by ``std ** whiten`` (0: raw codes, 1: unit variance; in between evens out the channels)."""
    k = basis.shape[0]
    check_config(vae, k)
    enc = vae.encoder
    group = vae.config.block_out_channels[-1] // vae.config.norm_num_groups
    for module in enc.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.weight.zero_()
            if module.bias is not None:
                module.bias.zero_()
    for block in list(enc.down_blocks) + [enc.mid_block]:
        for res in block.resnets:  # residual branch off: conv2 = 0 (done above); shortcuts copy channels
            if res.conv_shortcut is not None:
                n = min(res.conv_shortcut.in_channels, res.conv_shortcut.out_channels)
                res.conv_shortcut.weight[torch.arange(n), torch.arange(n), 0, 0] = 1.0
    for c in range(3):
        enc.conv_in.weight[c, c, 1, 1] = 1.0
    _set_projection(vae, mean, basis, std, group)
    enc.conv_norm_out.weight.fill_(1.0)
    enc.conv_norm_out.bias.fill_(SILU_SHIFT)
    gain = math.sqrt(enc.conv_norm_out.eps) / CODE_SCALE
    for m in range(k):
        out_gain = gain * float(std[m]) ** (1.0 - whiten)
        enc.conv_out.weight[m, m * group, 1, 1] = out_gain
        enc.conv_out.weight[m, m * group + 1, 1, 1] = -out_gain
        enc.conv_out.bias[k + m] = -20.0  # log-variance: a near-deterministic posterior
    if vae.quant_conv is not None:
        vae.quant_conv.weight.zero_()
        vae.quant_conv.bias.zero_()
        vae.quant_conv.weight[torch.arange(2 * k), torch.arange(2 * k), 0, 0] = 1.0
    enc.requires_grad_(False)


def pca_codes(images: np.ndarray, mean: np.ndarray, basis: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Reference implementation: ``[n, H, W, 3]`` in [-1, 1] -> ``[n, k, H/p, W/p]`` codes."""
    n, h, w, _ = images.shape
    codes = (patches(images.astype(np.float64), patch) - mean) @ basis.T
    return codes.reshape(n, h // patch, w // patch, -1).transpose(0, 3, 1, 2)
