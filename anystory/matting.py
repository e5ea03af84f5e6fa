"""Automatic matting for subjects given without a mask: BiRefNet by hub id, loaded on first use.

The authors cut every reference out with BiRefNet (``ZhengPeng7/BiRefNet``, loaded through transformers'
``AutoModelForImageSegmentation`` with the model's own code). It is large and may be absent (offline, no cache),
so :class:`LazyBiRefNetSegmenter` only tries to load it when a mask is actually needed and otherwise falls back
to :class:`~anystory.subjects.AlphaOrWholeImageSegmenter`, saying so in ``status`` for the UI.

No silent hub waits: without a local copy, whether the hub can be reached is probed once per endpoint
(:func:`hub_reachable`, one HTTP request bounded by a thread deadline, default 1.5 s, so a DNS lookup cannot stall
it) and remembered. An unreachable hub means "absent" at once (no download attempt with its retries); a cached
copy then loads with ``local_files_only``.
An image that already carries a cut-out in its alpha channel keeps it, as in the authors' demo.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from .hub import BIREFNET as BIREFNET_ID
from .hub import HUB_PROBE_SECONDS, hub_endpoint, hub_offline, hub_reachable  # noqa: F401 (re-exported)
from .subjects import AlphaOrWholeImageSegmenter, Segmenter, to_rgb

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_birefnet(model_id: str = BIREFNET_ID, device: str = "cpu", local_files_only: Optional[bool] = None):
    """BiRefNet by hub id or local folder; raises whatever transformers raises when it cannot be had."""
    from transformers import AutoModelForImageSegmentation

    local = hub_offline() if local_files_only is None else local_files_only
    model = AutoModelForImageSegmentation.from_pretrained(model_id, trust_remote_code=True, local_files_only=local)
    return model.to(device).eval()


class BiRefNetSegmenter(Segmenter):
    """Foreground mask from a BiRefNet-style model: ImageNet-normalised square input, last output's sigmoid."""

    def __init__(self, model: torch.nn.Module, resolution: int = 1024, threshold: float = 0.5,
                 model_id: str = BIREFNET_ID):
        self.model = model
        self.resolution = resolution
        self.threshold = threshold
        self.name = f"BiRefNet ({model_id})"

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> np.ndarray:
        alpha = AlphaOrWholeImageSegmenter()(image)
        if not alpha.all():  # a real cut-out: trust it
            self.last_source = "alpha"
            return alpha
        rgb = to_rgb(image).resize((self.resolution, self.resolution), Image.BILINEAR)
        x = (np.asarray(rgb, dtype=np.float32) / 255.0 - _MEAN) / _STD
        param = next(self.model.parameters(), None)
        x = torch.from_numpy(x).permute(2, 0, 1)[None].to(device=param.device if param is not None else "cpu",
                                                            dtype=param.dtype if param is not None else torch.float32)
        out = self.model(x)
        logits = out[-1] if isinstance(out, (list, tuple)) else out
        prob = logits.float().sigmoid()[0, 0].cpu().numpy()
        prob = np.asarray(Image.fromarray(prob).resize(image.size, Image.BILINEAR))
        self.last_source = self.name
        return prob > self.threshold


class LazyBiRefNetSegmenter(Segmenter):
    """BiRefNet when it can be loaded (tried once, on first use), else the alpha-or-whole-image fallback."""

    def __init__(self, model_id: str = BIREFNET_ID, device: str = "cpu",
                 loader: Optional[Callable[[str, str], torch.nn.Module]] = None,
                 probe: Callable[[], bool] = hub_reachable):
        self.model_id = model_id
        self.device = device
        self._loader = loader
        self._probe = probe
        self._lock = threading.Lock()
        self._inner: Optional[Segmenter] = None
        self.error: Optional[str] = None

    def _hub(self) -> str:
        """"off" (HF_HUB_OFFLINE), "unreachable" (probed) or "reachable"."""
        if hub_offline():
            return "off"
        return "reachable" if self._probe() else "unreachable"

    @property
    def name(self) -> str:
        return self._inner.name if self._inner is not None else f"BiRefNet ({self.model_id}), not loaded yet"

    def _cached(self) -> bool:
        if os.path.isdir(self.model_id):
            return True
        try:
            from huggingface_hub import try_to_load_from_cache

            return isinstance(try_to_load_from_cache(self.model_id, "config.json"), str)
        except Exception:
            return False

    @property
    def status(self) -> str:
        """One line for the UI: which matting is in use, and why."""
        if self._inner is None:
            if self._cached():
                return f"Automatic matting: BiRefNet (`{self.model_id}`), loaded on first use when a subject has no mask."
            hub = self._hub()
            if hub != "reachable":
                why = ("the hub is off (HF_HUB_OFFLINE=1)" if hub == "off"
                       else f"the hub ({hub_endpoint()}) is unreachable")
                return (f"Automatic matting: BiRefNet (`{self.model_id}`) is not in the local cache and {why}, "
                        "so masks come from the image's alpha channel, else the whole image is "
                        "the subject. Upload or draw a mask for better results.")
            return (f"Automatic matting: BiRefNet (`{self.model_id}`), downloaded and loaded on first use when a "
                    "subject has no mask.")
        if self.error is None:
            return f"Automatic matting: BiRefNet (`{self.model_id}`)."
        return (f"Automatic matting: BiRefNet (`{self.model_id}`) is unavailable ({self.error}); "
                "masks come from the image's alpha channel, else the whole image is the subject. "
                "Upload or draw a mask for better results.")

    def _ensure(self) -> Segmenter:
        with self._lock:
            if self._inner is None:
                cached, hub = self._cached(), self._hub()
                loader = self._loader or functools.partial(load_birefnet, local_files_only=hub != "reachable")
                if not cached and hub != "reachable":  # nothing to load, and no waiting on the hub to learn it
                    self.error = ("not in the local cache and the hub is off" if hub == "off"
                                  else f"not in the local cache and the hub ({hub_endpoint()}) is unreachable")
                    self._inner = AlphaOrWholeImageSegmenter()
                    return self._inner
                try:
                    self._inner = BiRefNetSegmenter(loader(self.model_id, self.device), model_id=self.model_id)
                except Exception as e:  # offline, not cached, remote code missing: all mean "absent"
                    self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no details'}"
                    self._inner = AlphaOrWholeImageSegmenter()
            return self._inner

    def __call__(self, image: Image.Image) -> np.ndarray:
        inner = self._ensure()
        mask = inner(image)
        self.last_source = getattr(inner, "last_source", None) or inner.name
        return mask
