"""Every hub id AnyStory loads from, and the one check of whether the hub is switched off
or unreachable.

Defined here once so the app, the CLI, eval, training and the pipelines cannot drift apart. Nothing here imports
torch or diffusers: the app reads it before it decides which model to load.
"""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from typing import Dict

#: SDXL base model (the paper's backbone).
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
#: IP-Adapter's ViT-H/14 image encoder, the paper's CLIP (penultimate layer, 257 tokens): (repo, subfolder).
SDXL_IMAGE_ENCODER = ("h94/IP-Adapter", "models/image_encoder")
#: The FLUX backbone and the Redux model whose SigLIP and image embedder the release builds on.
FLUX_BASE = "black-forest-labs/FLUX.1-dev"
FLUX_REDUX = "black-forest-labs/FLUX.1-Redux-dev"
#: The authors' released FLUX weights.
FLUX_ANYSTORY_REPO = "Junjie96/AnyStory"
FLUX_ANYSTORY_FILE = "anystory_flux.bin"
#: Matting for subjects given without a mask, as the authors cut their references out.
BIREFNET = "ZhengPeng7/BiRefNet"

_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the user switched the hub off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read at call time."""
    return any(os.environ.get(k, "0").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


#: Seconds the hub probe may take in all (connection, DNS, first byte).
HUB_PROBE_SECONDS = 1.5
_probed: Dict[str, bool] = {}
_probe_lock = threading.Lock()


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub answers at all (any HTTP status counts), probed once per endpoint and remembered."""
    if hub_offline():
        return False
    endpoint = hub_endpoint()
    with _probe_lock:
        if endpoint in _probed:
            return _probed[endpoint]
        answer = []

        def probe():
            try:
                urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                                       timeout=timeout)
                answer.append(True)
            except urllib.error.HTTPError:  # an HTTP answer, even an error, means the hub is there
                answer.append(True)
            except Exception:
                answer.append(False)

        worker = threading.Thread(target=probe, daemon=True)
        worker.start()
        worker.join(timeout)  # urlopen's timeout does not cover name resolution: the deadline is ours
        _probed[endpoint] = bool(answer and answer[0])
        return _probed[endpoint]
