"""DINO: subject fidelity as cosine of DINO ViT CLS embeddings (DreamBooth's preferred metric).

Default ViT-S/16 (DreamBooth, UNO); ViT-S/8 (``vit_small_patch8_224.dino``, alias ``vits8``) as DreamBench++.

Self-supervised DINO features separate instances of one class (two different dogs) better than CLIP.
Model ``vit_small_patch16_224.dino`` from timm (hub id ``timm/vit_small_patch16_224.dino``, or
``<weights_dir>/dino/vit_small_patch16_224.dino.{safetensors,bin,pth}``); embedding = the CLS token after the
final norm (``num_classes=0``, token pooling), as DINO's own backbone outputs. Preprocessing as DreamBooth /
UNO: bicubic resize of the short side to 256, centre crop 224, ImageNet mean/std.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from .base import RANDOM_INIT, Embedder, EmbeddingMetric, MetricUnavailable, l2_normalise

DEFAULT_DINO_MODEL = "vit_small_patch16_224.dino"

PREPROCESS = transforms.Compose([
    transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])


def local_dino_checkpoint(weights_dir: Optional[str], model: str) -> Optional[str]:
    if not weights_dir:
        return None
    for ext in (".safetensors", ".bin", ".pth"):
        path = os.path.join(weights_dir, "dino", model + ext)
        if os.path.isfile(path):
            return path
    return None


class DinoEmbedder(Embedder):
    """``pretrained=False`` builds the architecture with random weights - for tests only, and labelled so."""

    def __init__(self, model: str = DEFAULT_DINO_MODEL, pretrained: bool = True, device: str = "cpu",
                 weights_dir: Optional[str] = None, batch_size: int = 16):
        self.model_name, self.pretrained, self.device, self.batch_size = model, pretrained, device, batch_size
        self.local = local_dino_checkpoint(weights_dir, model) if pretrained else None
        self.weights_dir = weights_dir
        self.key = f"timm:{model}:{self.local or pretrained}"
        self.model = None
        self._failure: Optional[MetricUnavailable] = None  # DINO and its copy-paste share one attempt

    def load(self) -> None:
        if self.model is not None:
            return
        if self._failure is not None:
            raise self._failure
        try:
            import timm
        except ImportError as e:
            self.remedy = "pip install timm"
            self._failure = MetricUnavailable(f"DINO needs timm, which is not installed ({e}): {self.remedy}")
            raise self._failure from e
        kwargs = {"pretrained_cfg_overlay": {"file": self.local}} if self.local else {}
        try:
            model = timm.create_model(self.model_name, pretrained=self.pretrained, num_classes=0, **kwargs)
        except Exception as e:
            folder = os.path.join(self.weights_dir or "<weights-dir>", "dino")
            self.remedy = (f"put model.safetensors of hf.co/timm/{self.model_name} at "
                           f"{folder}/{self.model_name}.safetensors")
            self._failure = MetricUnavailable(
                f"DINO {self.model_name} weights could not be loaded ({type(e).__name__}: {str(e)[:200]}); run once "
                f"with internet access to fill the hub cache, or {self.remedy} and pass --weights-dir")
            raise self._failure from e
        if getattr(model, "global_pool", "token") != "token":
            raise MetricUnavailable(f"{self.model_name} does not pool the CLS token; DINO needs a ViT with one")
        self.model = model.to(self.device).eval()

    def describe(self) -> Dict[str, str]:
        weights = (self.local or f"timm/{self.model_name}") if self.pretrained else RANDOM_INIT
        label = self.model_name + ("" if self.pretrained else " RANDOM-INIT")
        return {"model": f"timm {self.model_name} (CLS)", "weights": weights, "label": label}

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.load()
        out: List[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([PREPROCESS(im) for im in images[start:start + self.batch_size]])
            out.append(self.model(batch.to(self.device)).float().cpu().numpy())
        return l2_normalise(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)


class DinoMetric(EmbeddingMetric):
    def __init__(self, embedder: DinoEmbedder, batch_size: int = 16):
        super().__init__("dino", embedder, batch_size)
