"""One open_clip model shared by CLIP-I and CLIP-T (image and text towers of the same checkpoint).

Default ViT-B-32 with the ``openai`` weights (DreamBooth / UNO protocol); ViT-L-14 ``openai`` as UNO and
XVerse report. ``pretrained`` is an open_clip tag (fetched through the hub and its cache) or a checkpoint
file. With ``weights_dir`` a local file ``<weights_dir>/open_clip/<model>-<tag>.{safetensors,bin,pt}`` wins.
Preprocessing is open_clip's own for the checkpoint (bicubic resize of the short side, centre crop).

OpenAI's CLIP was trained with QuickGELU, while open_clip's plain ``ViT-B-32`` config builds GELU (it only warns
on the tag route, and not at all for a file): the same weights then give other CLIP-I / CLIP-T (docs/evaluation.md).
So the activation is decided here, never left to open_clip: ``activation="auto"`` runs OpenAI weights (tag
``openai``, or a file whose name carries it) with QuickGELU and other tags as open_clip records them; a file
whose weights cannot be told is refused until ``activation`` says ``quickgelu`` or ``gelu``. The label names the
architecture actually built (``ViT-B-32-quickgelu openai``).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .base import RANDOM_INIT, Embedder, MetricUnavailable, l2_normalise

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_PRETRAINED = "openai"


ACTIVATIONS = ("auto", "quickgelu", "gelu")
QUICKGELU_SUFFIX = "-quickgelu"


def local_clip_checkpoint(weights_dir: Optional[str], model: str, tag: str) -> Optional[str]:
    if not weights_dir:
        return None
    for ext in (".safetensors", ".bin", ".pt"):
        path = os.path.join(weights_dir, "open_clip", f"{model}-{tag}{ext}")
        if os.path.isfile(path):
            return path
    return None


def tag_in_file_name(model: str, path: str) -> Optional[str]:
    """The open_clip tag a checkpoint's file name carries (``ViT-B-32-openai.bin`` -> ``openai``), if any."""
    import open_clip

    name = os.path.basename(path).lower()
    tags = [t for t in open_clip.list_pretrained_tags_by_model(model) + ["openai"] if t.lower() in name]
    return max(tags, key=len) if tags else None


def tag_uses_quick_gelu(model: str, tag: str) -> bool:
    """OpenAI's weights always; any other tag as open_clip's pretrained config records it."""
    import open_clip

    return "openai" in tag.lower() or bool((open_clip.get_pretrained_cfg(model, tag) or {}).get("quick_gelu"))


class OpenClipEmbedder(Embedder):
    """``pretrained=None`` builds the architecture with random weights - for tests only, and labelled so."""

    def __init__(self, model: str = DEFAULT_CLIP_MODEL, pretrained: Optional[str] = DEFAULT_CLIP_PRETRAINED,
                 device: str = "cpu", weights_dir: Optional[str] = None, batch_size: int = 16,
                 activation: str = "auto"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"CLIP activation must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
        self.model_name, self.pretrained, self.device, self.batch_size = model, pretrained, device, batch_size
        self.weights_dir = weights_dir
        is_file = pretrained is not None and os.path.isfile(pretrained)
        self.tag = (tag_in_file_name(model, pretrained) if is_file else pretrained)
        self.source = None if pretrained is None else (pretrained if is_file else (
            local_clip_checkpoint(weights_dir, model, pretrained) or pretrained))
        self.quick_gelu = self._quick_gelu(activation)
        self.architecture = model if model.endswith(QUICKGELU_SUFFIX) or not self.quick_gelu \
            else model + QUICKGELU_SUFFIX
        self.key = f"open_clip:{self.architecture}:{self.source}"
        self.model = self.preprocess = self.tokenizer = None
        self._failure: Optional[MetricUnavailable] = None  # CLIP-I, CLIP-T and copy-paste share one attempt
        self._text_cache: Dict[str, np.ndarray] = {}

    def _quick_gelu(self, activation: str) -> Optional[bool]:
        """True / False, or None when the weights cannot be told (a file without a tag in its name)."""
        built_quick = self.model_name.endswith(QUICKGELU_SUFFIX)
        if activation == "gelu" and built_quick:
            raise ValueError(f"{self.model_name} is a QuickGELU architecture; activation 'gelu' contradicts it")
        if activation != "auto":
            return activation == "quickgelu"
        if built_quick or self.pretrained is None:
            return built_quick
        return None if self.tag is None else tag_uses_quick_gelu(self.model_name, self.tag)

    def load(self) -> None:
        if self.model is not None:
            return
        if self._failure is not None:
            raise self._failure
        try:
            import open_clip
        except ImportError as e:
            self.remedy = "pip install open_clip_torch"
            self._failure = MetricUnavailable(f"CLIP needs open_clip, which is not installed ({e}): {self.remedy}")
            raise self._failure from e
        if self.quick_gelu is None:
            self._failure = MetricUnavailable(
                f"cannot tell whether {self.source} holds OpenAI CLIP weights (QuickGELU) or others (GELU): its name "
                "carries no open_clip tag; name it <model>-<tag>.<ext> or pass --clip-activation quickgelu|gelu")
            raise self._failure
        try:
            if self.source is not None and not os.path.isfile(self.source):
                # fetch (or find in the cache) before building the model: an absent checkpoint fails in
                # milliseconds instead of after a full random initialisation
                cfg = open_clip.get_pretrained_cfg(self.model_name, self.source)
                if not cfg:
                    raise ValueError(f"open_clip knows no weights '{self.source}' for {self.model_name} "
                                     f"(choices: {open_clip.list_pretrained_tags_by_model(self.model_name)})")
                open_clip.download_pretrained(cfg)
            model, _, preprocess = open_clip.create_model_and_transforms(self.model_name, pretrained=self.source,
                                                                         force_quick_gelu=self.quick_gelu)
        except Exception as e:
            self.remedy = self._where_to_put(open_clip)
            self._failure = MetricUnavailable(
                f"open_clip {self.model_name} weights '{self.source}' could not be loaded ({type(e).__name__}: "
                f"{str(e)[:200]}); run once with internet access to fill the hub cache, or {self.remedy} and pass "
                "--weights-dir")
            raise self._failure from e
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(self.model_name)

    def _where_to_put(self, open_clip) -> str:
        """Which file to fetch (on the hub) and where ``local_clip_checkpoint`` will find it."""
        hub = ((open_clip.get_pretrained_cfg(self.model_name, self.tag or "") or {}).get("hf_hub") or "").strip("/")
        origin = f"open_clip_model.safetensors of hf.co/{hub}" if hub else "the checkpoint"
        folder = os.path.join(self.weights_dir or "<weights-dir>", "open_clip")
        return f"put {origin} at {folder}/{self.model_name}-{self.tag or self.pretrained}.safetensors"

    def describe(self) -> Dict[str, str]:
        weights = "RANDOM-INIT" if self.pretrained is None else (self.tag or os.path.basename(self.source))
        return {"model": f"open_clip {self.architecture}", "label": f"{self.architecture} {weights}",
                "activation": {True: "QuickGELU", False: "GELU"}.get(self.quick_gelu, "undetermined"),
                "weights": RANDOM_INIT if self.source is None else str(self.source)}

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.load()
        out: List[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + self.batch_size]])
            out.append(self.model.encode_image(batch.to(self.device)).float().cpu().numpy())
        return l2_normalise(np.concatenate(out)) if out else np.zeros((0, 1), np.float32)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Cached per prompt: a benchmark repeats each prompt for every sample."""
        self.load()
        todo = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if todo:
            features = self.model.encode_text(self.tokenizer(todo).to(self.device)).float().cpu().numpy()
            for text, v in zip(todo, l2_normalise(features)):
                self._text_cache[text] = v
        return np.stack([self._text_cache[t] for t in texts])
