"""The shipped miniature's background reference acts: a night backdrop (dark, starred) as the reference darkens the
backdrop of held-out scenes whose prompt names no backdrop. (How far it carries a backdrop's colour is measured,
not asserted: docs/experiments/background-reference.md.)"""
import numpy as np
import pytest
import torch

from anystory import Subject
from anystory.data.object_finder import foreground_mask
from anystory.data.synthetic import IDENTITIES, SyntheticWorld, WorldConfig
from anystory.sdxl.miniature import load_miniature, miniature_available


@pytest.fixture(scope="module")
def pipe():
    if not miniature_available():
        pytest.skip("the miniature is not installed (assets/miniature)")
    p = load_miniature()
    p.set_progress_bar_config(disable=True)
    if p.anystory.background is None:
        pytest.skip("the installed miniature has no background reference weights")
    return p


def _backdrop_brightness(image: np.ndarray) -> float:
    return float(image[~foreground_mask(image)].mean())


def test_night_reference_darkens_the_backdrop(pipe):
    torch.set_num_threads(1)
    world = SyntheticWorld(424242, WorldConfig(image_size=64, reference_size=64))
    darker = []
    for k, (a, b) in enumerate(((0, 1), (3, 4))):
        refs = [Subject(world.reference(IDENTITIES[i], k, slot).image) for slot, i in enumerate((a, b))]
        images = [pipe("two objects", subjects=refs, background=background, num_inference_steps=20,
                       guidance_scale=3.0, generator=torch.Generator().manual_seed(k), output_type="np").images[0]
                  for background in (None, world.background_reference("night", k))]
        plain, night = [(np.clip(i, 0, 1) * 255).round().astype(np.uint8) for i in images]
        darker.append(_backdrop_brightness(plain) - _backdrop_brightness(night))
    assert np.mean(darker) > 15 and min(darker) > 5, f"backdrop brightness drops by {darker} (0-255) with a night reference"
