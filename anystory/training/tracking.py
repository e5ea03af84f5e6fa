"""Experiment tracking through accelerate's trackers: TensorBoard, and Weights & Biases when it is set up.

``trackers:`` in the config: ``auto`` (default: TensorBoard when ``tensorboard`` is installed, W&B as well when
``wandb`` is installed and ``WANDB_API_KEY`` or ``WANDB_MODE`` is set, so an unconfigured machine never
prompts), a list (``[tensorboard, wandb]``) or ``[]``. Event files go to ``<work_dir>/logs/<stage>/``.
Every logged row (losses, router mIoU, learning rate) goes to the trackers as well as ``log.jsonl``; every
``sample_every`` steps stage 2 (and stage 1) log a held-out sample: the generated image beside its routing map.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, List

import numpy as np

KNOWN = ("tensorboard", "wandb")


def tracker_names(cfg: dict) -> List[str]:
    wanted = cfg.get("trackers", "auto")
    if wanted == "auto":
        names = ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
        if importlib.util.find_spec("wandb") and (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
            names.append("wandb")
        return names
    names = [wanted] if isinstance(wanted, str) else list(wanted or [])
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"trackers: unknown {unknown}; choose from {list(KNOWN)} or 'auto'")
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ValueError(f"trackers {missing} are not installed (pip install {' '.join(missing)})")
    return names


def flat_config(cfg: dict, stage: str) -> Dict[str, object]:
    """The stage's hyper-parameters as scalars (trackers store flat key/value pairs)."""
    out = {k: v for k, v in cfg.items() if isinstance(v, (int, float, str, bool))}
    for k, v in cfg[stage].items():
        out[f"{stage}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def log_images(accelerator, images: Dict[str, np.ndarray], step: int) -> None:
    """``{tag: uint8 [H, W, 3]}`` to every tracker that takes images."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for tag, image in images.items():
                tracker.writer.add_image(tag, image, global_step=step, dataformats="HWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(image) for tag, image in images.items()}, step=step)


def routing_sample(pipe, record, steps: int = 10, seed: int = 0) -> np.ndarray:
    """A held-out record generated with its references, beside the last step's routing map (uint8 ``[H, 2W, 3]``)."""
    import torch

    from ..visualize import routing_colormap, side_by_side

    adapter = pipe.anystory
    was_training = adapter.training
    adapter.eval()
    try:
        with torch.no_grad():
            out = pipe(record.caption, subjects=record.references, num_inference_steps=steps,
                       height=record.image.shape[0], width=record.image.shape[1],
                       generator=torch.Generator().manual_seed(seed), return_routing_maps=True)
    finally:
        adapter.train(was_training)
    image = out.images[0]
    maps = routing_colormap(out.routing_maps[-1][0], size=image.size)
    return np.asarray(side_by_side([image, maps]).convert("RGB"))
