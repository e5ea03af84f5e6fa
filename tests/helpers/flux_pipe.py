"""Shared pieces of the FLUX tests (no tests here): tiny pipelines, subject images, call settings."""
import numpy as np
import torch
from PIL import Image, ImageDraw

from anystory import Subject
from anystory.flux.tiny_flux import tiny_anystory_flux_pipeline

CALL = dict(height=32, width=32, num_inference_steps=3, max_sequence_length=16, output_type="np")
PROMPT = "a photo of two friends in a park"


def make_pipe(seed: int = 0, load: bool = True, single_blocks: int = 1):
    pipe = tiny_anystory_flux_pipeline(seed, load, single_blocks)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def subject_image(seed: int, size=(48, 40)) -> tuple:
    """A coloured ellipse on a textured background, and its mask."""
    rng = np.random.RandomState(seed)
    w, h = size
    img = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8))
    mask = Image.new("L", size, 0)
    box = (w // 6, h // 5, w - w // 5, h - h // 6)
    ImageDraw.Draw(img).ellipse(box, fill=tuple(int(c) for c in rng.randint(0, 255, 3)))
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return img, mask


def subjects(n: int, offset: int = 0) -> list:
    return [Subject(*subject_image(offset + i), name=f"s{i}") for i in range(n)]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
