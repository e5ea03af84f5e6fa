"""Shared pieces of the routing tests (no tests here): the tiny SDXL AnyStory pipeline, reference images, how far
a subject was routed outside its region, and the two guarantees every inference rule has to keep."""
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from anystory import AnyStorySDXLPipeline
from anystory.regions import region_pixels
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, tiny_sdxl_components


def tiny_pipe(components: Optional[dict] = None, **anystory) -> AnyStorySDXLPipeline:
    """Tiny SDXL components (``components``, else fresh ones of seed 0) with freshly initialised (untrained)
    AnyStory modules, seeded; ``anystory``: config values over the tiny ones (e.g. an inference rule)."""
    p = AnyStorySDXLPipeline(**(components or tiny_sdxl_components(seed=0)))
    p.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    p.init_anystory(**{**TINY_ANYSTORY_CONFIG, **anystory})
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


PROMPT = "a red striped star and a blue dotted moon on sand"


def run_routed(pipe, subjects, **kw):
    """Two steps with the learned (untrained) router and a background adjustment of 1, as numpy images."""
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(kw.pop("prompt", PROMPT), subjects=subjects, num_inference_steps=2, output_type="np",
                routing_background_bias=1.0, **kw)


def record_gates(monkeypatch) -> list:
    """Every cross-attention layer's gating map from now on, with its grid: ``[(gate, hw), ...]``."""
    from anystory.sdxl.attention_processors import AnyStoryCrossAttnProcessor

    seen = []
    original = AnyStoryCrossAttnProcessor._route

    def route(self, hidden, hw):
        gate = original(self, hidden, hw)
        seen.append((gate.clone(), hw))
        return gate

    monkeypatch.setattr(AnyStoryCrossAttnProcessor, "_route", route)
    return seen


def assert_routed_nowhere_changes_nothing(pipe, monkeypatch, latent: int = 32):
    """B allowed nowhere (``routing_regions``), A routed by the learned router under the pipeline's rule: the
    output equals the call with A alone, for any reference of B."""
    from anystory import Subject

    allowed = torch.zeros(2, latent, latent)
    allowed[0, :, :20] = 1
    original = pipe.anystory.start

    def start(conditioning=None):
        if conditioning is not None:
            conditioning = replace(conditioning, routing_regions=allowed[: conditioning.num_subjects])
        return original(conditioning)

    monkeypatch.setattr(pipe.anystory, "start", start)
    alone = run_routed(pipe, [Subject(noise_image(1))], return_routing_maps=True)
    assert torch.stack([m[0, 0] for m in alone.routing_maps]).mean() > 0.05, "A must hold part of the image"
    for b_seed in (2, 5):
        both = run_routed(pipe, [Subject(noise_image(1)), Subject(noise_image(b_seed), scale=2.0)],
                          return_routing_maps=True)
        assert all(m[:, 1].max() == 0 for m in both.routing_maps)
        assert np.abs(both.images - alone.images).max() <= 1e-6
