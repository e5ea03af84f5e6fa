"""A small CNN that names a synthetic subject from a crop: its shape, colour and texture.

It is the *judge* of subject fidelity in the routing study: "is the thing the model drew at B's place really
B?". It never sees generated images in training; it learns from exact renders of the synthetic world, with
augmentations that imitate what a small diffusion model gets wrong (blur, lost resolution, noise, colour
drift, a loose crop), and it is validated on renders of a held-out seed.

Three heads (shape 8, colour 6, texture 4) instead of one identity softmax, trained on every shape x colour x
texture combination: shape is then judged independently of colour, which the leakage measurement needs
("the star is purple" must still be read as a star). An identity's score is the product of its three head
probabilities; ``identify`` picks the best among candidate identities.

Command (writes the weights the routing study loads)::

    python -m anystory.data.identity_classifier --out assets/miniature/identity_classifier.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..cli_options import add_seed
from ..weights import load_tensors, read_metadata, save_tensors
from .synthetic import COLOURS, SHAPES, TEXTURES, Identity, SyntheticWorld

CROP_SIZE = 32
HEADS = {"shape": len(SHAPES), "colour": len(COLOURS), "texture": len(TEXTURES)}


def object_crop(image: np.ndarray, mask: np.ndarray, size: int = CROP_SIZE, expand: float = 1.3,
                jitter: Optional[np.random.Generator] = None) -> np.ndarray:
    """Square crop around ``mask`` (with its surroundings, not whited out), resized to ``size``: ``[size, size, 3]`` uint8.

    Surroundings are kept on purpose: masks of generated objects are imperfect, and the silhouette against
    the background is what tells shapes apart.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise ValueError("object_crop: the mask is empty")
    cy, cx = (ys.min() + ys.max() + 1) / 2.0, (xs.min() + xs.max() + 1) / 2.0
    side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * expand
    if jitter is not None:
        side *= jitter.uniform(0.9, 1.25)
        cy += jitter.uniform(-0.08, 0.08) * side
        cx += jitter.uniform(-0.08, 0.08) * side
    side = max(side, 4.0)
    pad = int(np.ceil(side))  # crops may run past the border: extend the edge pixels
    padded = np.pad(np.asarray(image, dtype=np.uint8)[..., :3], ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    box = (cx - side / 2 + pad, cy - side / 2 + pad, cx + side / 2 + pad, cy + side / 2 + pad)
    img = Image.fromarray(padded)
    return np.asarray(img.resize((size, size), Image.BILINEAR, box=box))


class IdentityClassifier(nn.Module):
    """``[B, 3, 32, 32]`` crops in [0, 1] -> logits per head."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.GELU(), nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * w * 16, 128), nn.GELU(), nn.Dropout(0.1),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(128, n) for k, n in HEADS.items()})
        self.width = width

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def probabilities(self, crops: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        """Per-head class probabilities for ``[32, 32, 3]`` uint8 crops."""
        self.eval()
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
        return {k: v.softmax(-1).numpy() for k, v in self(x).items()}

    def identity_scores(self, crops: Sequence[np.ndarray], candidates: Sequence[Identity]) -> np.ndarray:
        """``[len(crops), len(candidates)]``: P(shape) * P(colour) * P(texture) of each candidate identity."""
        p = self.probabilities(crops)
        labels = np.array([c.labels for c in candidates])
        return p["shape"][:, labels[:, 0]] * p["colour"][:, labels[:, 1]] * p["texture"][:, labels[:, 2]]

    def identify(self, crops: Sequence[np.ndarray], candidates: Sequence[Identity]) -> List[Identity]:
        scores = self.identity_scores(crops, candidates)
        return [candidates[i] for i in scores.argmax(axis=1)]

    def save(self, path: str, metrics: Optional[dict] = None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        meta = {"width": str(self.width), "metrics": json.dumps(metrics or {})}
        save_tensors(self.state_dict(), path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "IdentityClassifier":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"identity classifier weights not found at {path}; train them with "
                                    "`python -m anystory.data.identity_classifier --out <path>`")
        meta = read_metadata(path)
        model = cls(width=int(meta.get("width", 16)))
        model.load_state_dict(load_tensors(path, "identity classifier"))
        model.metrics = json.loads(meta.get("metrics", "{}"))
        return model.eval()


def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a small generator gets wrong: blur / lost resolution, noise, colour and contrast drift."""
    x = crop.astype(np.float32)
    if rng.random() < 0.4:
        small = int(rng.integers(18, 30))
        img = Image.fromarray(crop).resize((small, small), Image.BILINEAR).resize(crop.shape[:2][::-1], Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32)
    gray = x.mean(axis=-1, keepdims=True)
    x = gray + (x - gray) * rng.uniform(0.75, 1.15)  # saturation
    x = (x - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-15, 15)  # contrast, brightness
    x = x + rng.uniform(-10, 10, size=3)  # colour cast
    x = x + rng.normal(0, rng.uniform(0, 8), x.shape)
    if rng.random() < 0.5:
        x = x[:, ::-1]
    return np.clip(x, 0, 255).astype(np.uint8)


def make_crops(seed: int, count: int, augmented: bool, image_size: int = 64) -> tuple:
    """``count`` labelled crops from scenes of ``SyntheticWorld(seed)`` (every combination of attributes)."""
    world = SyntheticWorld(seed, image_size=image_size, identities="all", distinct_colours=False)
    rng = np.random.default_rng([seed, 7])
    crops, labels, index = [], [], 0
    while len(crops) < count:
        for image, mask, ident in world.subject_crops(index):
            crop = object_crop(image, mask, jitter=rng if augmented else None)
            crops.append(augment(crop, rng) if augmented else crop)
            labels.append(ident.labels)
        index += 1
    return np.stack(crops[:count]), np.array(labels[:count])


def _accuracy(model: IdentityClassifier, crops: np.ndarray, labels: np.ndarray) -> dict:
    p = model.probabilities(list(crops))
    pred = np.stack([p[k].argmax(1) for k in HEADS], 1)
    out = {k: float((pred[:, i] == labels[:, i]).mean()) for i, k in enumerate(HEADS)}
    out["identity"] = float((pred == labels).all(1).mean())
    return out


def train_identity_classifier(steps: int = 2500, batch_size: int = 64, seed: int = 0, pool: int = 10000,
                              lr: float = 2e-3, log=print) -> tuple:
    """Train on ``pool`` augmented render crops (seed ``seed``), validate on 1,000 clean crops of seed ``seed + 1000``."""
    torch.manual_seed(seed)
    t0 = time.time()
    crops, labels = make_crops(seed, pool, augmented=True)
    val_crops, val_labels = make_crops(seed + 1000, 1000, augmented=False)
    x_all = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    y_all = torch.from_numpy(labels).long()
    model = IdentityClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        model.train()
        idx = torch.randint(len(x_all), (batch_size,), generator=gen)
        logits = model(x_all[idx])
        loss = sum(F.cross_entropy(logits[k], y_all[idx, i]) for i, k in enumerate(HEADS))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 250 == 0 or step == steps - 1):
            log(f"identity classifier step {step} loss {loss.item():.3f}")
    metrics = _accuracy(model, val_crops, val_labels)
    metrics.update(train_seconds=round(time.time() - t0, 1), steps=steps, chance_identity=1.0 / len(SHAPES) /
                   len(COLOURS) / len(TEXTURES))
    return model.eval(), metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m anystory.data.identity_classifier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="assets/miniature/identity_classifier.safetensors")
    p.add_argument("--steps", type=int, default=2500)
    add_seed(p)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ANYSTORY_THREADS", "1")))  # oversubscribed threads are far slower on a shared CPU
    model, metrics = train_identity_classifier(steps=args.steps, seed=args.seed)
    model.save(args.out, metrics)
    print(json.dumps(metrics, indent=1))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
