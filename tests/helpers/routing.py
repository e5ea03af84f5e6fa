"""Shared pieces of the routing tests (no tests here): the tiny SDXL AnyStory pipeline, reference images, and
how far a subject was routed outside its region."""
from typing import Optional

import numpy as np
import torch

from anystory import AnyStorySDXLPipeline
from anystory.regions import region_pixels
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components


def tiny_pipe(components: Optional[dict] = None) -> AnyStorySDXLPipeline:
    """Tiny SDXL components (``components``, else fresh ones of seed 0) with freshly initialised (untrained)
    AnyStory modules, seeded."""
    p = AnyStorySDXLPipeline(**(components or tiny_sdxl_components(seed=0)))
    p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    p.init_anystory(**TINY_ANYSTORY_CONFIG)
    return p


def noise_image(seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 255, (40, 48, 3)).astype(np.uint8)


def routed_outside(maps, channel: int, box) -> float:
    """Largest routed share of ``channel`` outside ``box`` over all steps (maps ``[B, N+1, h, w]``)."""
    worst = 0.0
    for m in maps:
        allowed = torch.from_numpy(region_pixels(box, *m.shape[-2:], "test"))
        worst = max(worst, float(m[:, channel][:, ~allowed].max()) if (~allowed).any() else 0.0)
    return worst
