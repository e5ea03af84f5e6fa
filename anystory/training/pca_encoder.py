"""A fixed, linear VAE encoder: ``AutoencoderKL``'s encoder weights set so that it computes PCA of 4x4 patches.

Training a small VAE from scratch is by far the slowest part of a CPU miniature (a GroupNorm autoencoder needs
thousands of steps before colours are right). The issue allows "a fixed down/up-sampler" instead; we keep the
real ``AutoencoderKL`` class (so the pipeline's code path is SDXL's) and *set* its encoder:

* ``conv_in`` copies RGB, every residual block is the identity (its last conv is zero), the first strided conv
  is a 2x2 space-to-depth, the second applies the PCA basis to the resulting 4x4 patch (48 values -> k codes);
* the encoder's closing GroupNorm would normalise each image's codes away. Each code therefore shares its
  group with an all-zero channel and is scaled far below the norm's epsilon, where GroupNorm is affine:
  ``(code - m) / sqrt(eps)`` for the code and ``-m / sqrt(eps)`` for its zero partner, so their difference,
  taken by ``conv_out``, is the code again, whatever the image. A large bias keeps SiLU in its linear range.

The decoder (upsampling by nearest + conv cannot do depth-to-space linearly) is trained against this encoder.
The basis comes from patches of the synthetic world; k = latent channels (8 keeps the textures; see the
trade-off in the training notes).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import AutoencoderKL

PATCH = 4
CODE_SCALE = 3e-5  # codes (whitened) enter the closing GroupNorm at this size: variance << its eps (1e-6)
SILU_SHIFT = 16.0  # SiLU(x) = x to float precision for x >= 16


def patches(images: np.ndarray) -> np.ndarray:
    """``[n, H, W, 3]`` -> ``[n * H/4 * W/4, 48]`` patch vectors, ordered (row, column, channel)."""
    n, h, w, c = images.shape
    x = images.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, PATCH * PATCH * c)


def fit_basis(images: np.ndarray, k: int) -> tuple:
    """(mean [48], basis [k, 48], std [k]) of 4x4 patches of ``images`` in [-1, 1]."""
    p = patches(images.astype(np.float64))
    mean = p.mean(0)
    _, s, vt = np.linalg.svd(p - mean, full_matrices=False)
    std = s[:k] / math.sqrt(len(p))
    return mean, vt[:k], std


def check_config(vae: AutoencoderKL, k: int) -> None:
    cfg = vae.config
    chans = list(cfg.block_out_channels)
    problems = []
    if len(chans) != 3:
        problems.append("3 levels (a 4x down-sampling)")
    if cfg.layers_per_block != 1:
        problems.append("layers_per_block 1")
    if cfg.latent_channels != k:
        problems.append(f"latent_channels == k ({k})")
    if cfg.norm_num_groups < k or chans[-1] // cfg.norm_num_groups < 2:
        problems.append("norm_num_groups >= latent channels with >= 2 channels per group at the last level")
    if chans[0] < 12 or chans[1] < 12:
        problems.append("at least 12 channels at the first two levels")
    if cfg.mid_block_add_attention:
        problems.append("mid_block_add_attention False")
    if problems:
        raise ValueError("a PCA encoder needs an AutoencoderKL with " + "; ".join(problems))


@torch.no_grad()
def set_pca_encoder(vae: AutoencoderKL, mean: np.ndarray, basis: np.ndarray, std: np.ndarray,
                    whiten: float = 0.0) -> None:
    """Overwrite ``vae``'s encoder (and quant_conv) so ``encode(x).latent_dist.mode()`` = PCA codes of 4x4 patches,
    each divided by ``std ** whiten`` (0: raw codes, 1: unit variance; in between evens out the channels)."""
    k = basis.shape[0]
    check_config(vae, k)
    enc = vae.encoder
    c0, c1, c2 = vae.config.block_out_channels
    group = c2 // vae.config.norm_num_groups
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
    s2d = enc.down_blocks[0].downsamplers[0].conv  # 2x2 space-to-depth: channel c*4 + dy*2 + dx
    for c in range(3):
        for dy in range(2):
            for dx in range(2):
                s2d.weight[c * 4 + dy * 2 + dx, c, dy, dx] = 1.0
    proj = enc.down_blocks[1].downsamplers[0].conv  # the 4x4 patch (2x2 of 2x2) -> whitened codes, tiny
    b = torch.from_numpy(basis / std[:, None]).float().view(k, PATCH, PATCH, 3)  # (row, column, channel)
    for m in range(k):
        for c in range(3):
            for dy1 in range(2):
                for dx1 in range(2):
                    for dy2 in range(2):
                        for dx2 in range(2):
                            proj.weight[m * group, c * 4 + dy1 * 2 + dx1, dy2, dx2] = (
                                CODE_SCALE * b[m, dy2 * 2 + dy1, dx2 * 2 + dx1, c])
        proj.bias[m * group] = -CODE_SCALE * float(np.dot(basis[m] / std[m], mean))
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


def pca_codes(images: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Reference implementation: ``[n, H, W, 3]`` in [-1, 1] -> ``[n, k, H/4, W/4]`` codes."""
    n, h, w, _ = images.shape
    codes = (patches(images.astype(np.float64)) - mean) @ basis.T
    return codes.reshape(n, h // PATCH, w // PATCH, -1).transpose(0, 3, 1, 2)
