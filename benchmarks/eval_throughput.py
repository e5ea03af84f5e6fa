"""``python -m benchmarks.eval_throughput [--device cpu|cuda] [--images N]``: images/s of each eval metric.

Times ``metric.score`` on N 512x512 images (preprocessing + model + similarities; reference photos are embedded
beforehand, as the harness caches them). CLIP and DINO are the real architectures (ViT-B/32, ViT-S/16) with
random weights - speed does not depend on weight values, and no weights can be downloaded here; SFace is the
real model. ``copy_paste`` is timed with its base's embeddings already computed (the harness shares them), so
it is the marginal cost.
"""
from __future__ import annotations

import argparse
import time
from typing import List

import numpy as np
import torch
from PIL import Image

from anystory.cli_options import DEVICES, add_device


def _images(n: int) -> List[Image.Image]:
    from skimage import data

    base = Image.fromarray(data.astronaut()).resize((512, 512))
    rng = np.random.RandomState(0)
    out = []
    for _ in range(n):  # distinct images (a small shift each) so no cache can help
        dx, dy = rng.randint(0, 24, 2)
        out.append(base.transform((512, 512), Image.AFFINE, (1, 0, int(dx), 0, 1, int(dy))))
    return out


def measure_eval_throughput(device: str = "cpu", n_images: int = 16, batch_size: int = 8) -> List[dict]:
    """One row per metric: ``metric``, ``model``, ``weights``, ``device``, ``images``, ``seconds``, ``images_per_s``."""
    import os
    import tempfile

    from eval.loaders.base import SubjectRef
    from eval.metrics import (BatchContext, ClipImageMetric, ClipTextMetric, CopyPasteMetric, DinoEmbedder,
                              DinoMetric, FaceIdMetric, OpenClipEmbedder, ScoreItem)
    from eval.metrics.face_id import SFaceEmbedder

    torch.manual_seed(0)
    clip = OpenClipEmbedder("ViT-B-32", None, device=device, batch_size=batch_size)
    dino = DinoEmbedder(pretrained=False, device=device, batch_size=batch_size)
    clip_i, dino_m = ClipImageMetric(clip, batch_size), DinoMetric(dino, batch_size)
    face = FaceIdMetric(SFaceEmbedder(), batch_size)
    metrics = [clip_i, ClipTextMetric(clip), dino_m, face]
    images = _images(n_images + 2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = []
        for i, im in enumerate(images[:2]):
            photos.append(os.path.join(tmp, f"{i:02d}.png"))
            im.save(photos[-1])
        subject = SubjectRef("astronaut", "person", photos[0], tuple(photos))
        items = [ScoreItem(im, im, "a photo of an astronaut", subject) for im in images[2:]]
        for metric in metrics:
            metric.load()
            metric.score(items[:2], BatchContext())  # warm-up; caches the reference photos
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            metric.score(items, BatchContext())
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            rows.append(_row(metric, device, n_images, time.perf_counter() - start))
        ctx = BatchContext()
        dino_m.score(items, ctx)
        copy_paste = CopyPasteMetric(dino_m)
        start = time.perf_counter()
        copy_paste.score(items, ctx)
        rows.append(_row(copy_paste, device, n_images, time.perf_counter() - start, note="marginal, given DINO"))
    return rows


def _row(metric, device: str, n: int, seconds: float, note: str = "") -> dict:
    d = metric.describe()
    weights = "random (speed only)" if "RANDOM" in str(d.get("weights")) else "real"
    return {"metric": metric.name, "model": d.get("label", d.get("model")), "weights": weights, "device": device,
            "images": n, "seconds": round(seconds, 4), "images_per_s": round(n / seconds, 2) if seconds else float("inf"),
            "note": note}


def main(argv=None) -> int:
    import pandas as pd

    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device(p, "cpu", DEVICES)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    rows = measure_eval_throughput(args.device, args.images, args.batch_size)
    print(f"eval metric throughput ({args.device}, {torch.get_num_threads()} threads):")
    print(pd.DataFrame(rows).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
