"""Miniature stage "vae": train the small ``AutoencoderKL`` on crops of synthetic scenes and references.

Fully convolutional (no mid-block attention), so small crops train it as well as whole images at a fraction
of the cost. The posterior mean is decoded during training (the KL term only keeps the latents tame); the
``scaling_factor`` is then set to 1 / std of the latents, as SDXL's VAE config does for its own.

    python -m anystory.training.vae --config configs/tiny.yaml
"""
from __future__ import annotations

import numpy as np
import torch

from .data import images_to_tensor, indices, world_for
from .loop import StageLoop, make_accelerator


def _batch(world, step: int, batch: int, crop: int, gen: torch.Generator) -> torch.Tensor:
    images = []
    for k, i in enumerate(indices("vae", step, batch)):
        if k % 4 == 3:  # a quarter reference views: subjects large, on white
            ident = world.scene(i).placements[0].identity
            images.append(np.asarray(world.reference(ident, i).image.convert("RGB")))
        else:
            images.append(world.scene(i).image)
    x = images_to_tensor(images)
    size = x.shape[-1]
    if crop and crop < size:
        out = []
        for img in x:
            i, j = torch.randint(0, size - crop + 1, (2,), generator=gen).tolist()
            out.append(img[:, i:i + crop, j:j + crop])
        x = torch.stack(out)
    return x


def train_vae(cfg: dict, pipe, log=print) -> dict:
    scfg = cfg["vae"]
    acc = make_accelerator(cfg)
    vae = pipe.vae.to(acc.device)
    vae.requires_grad_(True).train()
    loop = StageLoop(cfg, "vae", {f"vae.{n}": p for n, p in vae.named_parameters()}, acc, log)
    loop.resume()
    world = world_for(cfg)
    while loop.step < loop.total and not loop.done:
        gen = loop.generator()
        x = _batch(world, loop.step, int(scfg["batch_size"]), int(scfg["crop"]), gen).to(acc.device)
        with acc.autocast():
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.mode()).sample
            l1 = (rec.float() - x).abs().mean()
            kl = post.kl().mean()
            loss = l1 + float(scfg["kl_weight"]) * kl
        loop.update(loss, l1=l1.item(), kl=kl.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        held = images_to_tensor([world_for(cfg, "heldout").scene(i).image for i in range(64)]).to(acc.device)
        post = vae.encode(held).latent_dist
        std = post.mode().std().item()
        rec_l1 = (vae.decode(post.mode()).sample - held).abs().mean().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    if not loop.done:
        loop.finish()
    metrics = {"heldout_l1": rec_l1, "latent_std": std, "scaling_factor": 1.0 / std, "seconds": loop.seconds}
    log(f"[vae] held-out L1 {rec_l1:.4f} (on [-1, 1]); scaling_factor {1 / std:.4f}")
    return metrics


def main(argv=None) -> int:
    from .__main__ import run_stages

    return run_stages(argv, only=("vae",))


if __name__ == "__main__":
    raise SystemExit(main())
