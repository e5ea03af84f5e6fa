"""Decide once, before any model loads, whether the hub may be asked at all, and make every loader obey.

huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported (``eval.run`` imports it through diffusers), so
setting the variable later changes nothing: each file a metric asks for then goes through the hub client's retry
loop (``Retrying in 8s [Retry 5/5]``), about 20 s per file with no network. Here the client's own switch is turned
too, so timm, open_clip, diffusers and transformers read the local cache only and fail at once on an absent file.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from anystory.hub import hub_endpoint, hub_offline, hub_reachable


def force_offline() -> None:
    """Local files only from now on, in this process and the processes it starts."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants

    huggingface_hub.constants.HF_HUB_OFFLINE = True


def settle_hub(probe: Callable[[], bool] = hub_reachable) -> Optional[str]:
    """``None`` when the hub answers; else why models come from local files only (after switching the hub off)."""
    if hub_offline():
        note = "HF_HUB_OFFLINE is set; models load from local files and caches only"
    elif probe():
        return None
    else:
        note = f"{hub_endpoint()} is unreachable; models load from local files and caches only"
    force_offline()
    return note
