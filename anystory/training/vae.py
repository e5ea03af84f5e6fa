"""Miniature stage "vae": a PCA encoder (fixed) and a small decoder trained to invert it.

The encoder of the ``AutoencoderKL`` is set, not trained (see :mod:`.pca_encoder`): PCA of 4x4 (or 2x2) patches of
synthetic scenes and reference views. Only the decoder learns, with an L1 loss on whole 64px images (the
GroupNorms make crops a different problem). ``scaling_factor`` = 1 / std of the latents, as in SDXL's config.

    python -m anystory.training.vae --config configs/miniature.yaml
"""
from __future__ import annotations

import numpy as np
import torch

from .data import images_to_tensor, indices, world_for
from .loop import StageLoop, make_accelerator
from .pca_encoder import fit_basis, patch_of, set_pca_encoder


def _batch(world, stage: str, step: int, batch: int) -> tuple:
    """(images, subject masks): scenes, and a quarter reference views (subjects large, on white)."""
    images, masks = [], []
    for k, i in enumerate(indices(stage, step, batch)):
        scene = world.scene(i)
        if k % 4 == 3:
            reference = world.reference(scene.placements[0].identity, i)
            images.append(np.asarray(reference.image.convert("RGB")))
            masks.append(reference.mask)
        else:
            images.append(scene.image)
            masks.append(scene.masks.any(axis=0))
    return images, masks


def _images(world, stage: str, step: int, batch: int) -> list:
    return _batch(world, stage, step, batch)[0]


def reconstruction_loss(decoded: torch.Tensor, x: torch.Tensor, masks: torch.Tensor, object_weight: float) -> torch.Tensor:
    """L1; with ``object_weight`` > 0, subject pixels (``masks`` ``[B, H, W]``) weigh ``1 + object_weight`` against
    the background's 1 (normalised to a weighted mean). Subjects cover a few percent of a scene, so a plain L1
    learns the backdrop first and a subject's edges and texture last."""
    error = (decoded.float() - x).abs()
    if not object_weight:
        return error.mean()
    weight = 1.0 + object_weight * masks.to(error.dtype)[:, None]
    return (error * weight).sum() / (weight.sum() * error.shape[1])


def fit_encoder(cfg: dict, vae) -> None:
    """Fit the PCA basis on ``vae.basis_images`` images of the training world and set the encoder."""
    scfg = cfg["vae"]
    world = world_for(cfg)
    count = int(scfg.get("basis_images", 512))
    images = np.concatenate([_images(world, "vae", 10_000 + k, 64) for k in range(max(1, count // 64))])
    mean, basis, std = fit_basis(images.astype(np.float32) / 127.5 - 1.0, vae.config.latent_channels, patch_of(vae))
    set_pca_encoder(vae, mean, basis, std, whiten=float(scfg.get("whiten", 0.5)))


def train_vae(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["vae"]
    acc = make_accelerator(cfg)
    vae = pipe.vae.to(acc.device)
    fit_encoder(cfg, vae)
    decoder = {f"vae.{n}": p for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
    for p in decoder.values():
        p.requires_grad_(True)
    vae.train()
    loop = StageLoop(cfg, "vae", decoder, acc, log)
    world = world_for(cfg)
    object_weight = float(scfg.get("object_weight", 0.0))

    def step():
        images, masks = _batch(world, "vae", loop.step, int(scfg["batch_size"]))
        x = images_to_tensor(images).to(acc.device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        with acc.autocast():
            l1 = reconstruction_loss(vae.decode(z).sample, x, torch.from_numpy(np.stack(masks)).to(acc.device),
                                     object_weight)
        loop.update(l1, l1=l1.item())

    loop.run(step, ema=False)  # the decoder is used as trained (EMA is not read here)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held = images_to_tensor([world_for(cfg, "heldout").scene(i).image for i in range(64)]).to(acc.device)
        z = vae.encode(held).latent_dist.mode()
        std = z.std().item()
        rec_l1 = (vae.decode(z).sample - held).abs().mean().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    log(f"[vae] held-out L1 {rec_l1:.4f} (on [-1, 1]); scaling_factor {1 / std:.4f}")
    return {"heldout_l1": rec_l1, "latent_std": std, "scaling_factor": 1.0 / std, "seconds": loop.seconds}


if __name__ == "__main__":
    from anystory.training.runner import run_stages

    raise SystemExit(run_stages(only=("vae",)))
