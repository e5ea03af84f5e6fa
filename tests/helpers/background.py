"""Shared piece of the background-reference tests (no tests here)."""
import torch

from anystory import Subject
from anystory.sdxl.background import background_tensors, encode_background, read_background, with_background
from anystory.subjects import prepare_subjects
from helpers.routing import noise_image


def subject_and_background(pipe) -> dict:
    """The conditions of one subject (noise image 1) followed by a background reference (noise image 7)."""
    size = pipe.anystory.config.reference_size
    subjects = pipe.encode_subjects(**pipe.subject_tensors(prepare_subjects([Subject(noise_image(1))]), "cpu",
                                                           torch.float32))
    background = encode_background(pipe, **background_tensors(pipe, read_background(noise_image(7), size), "cpu",
                                                              torch.float32))
    return with_background(subjects, background)


def miniature_with_background():
    """The shipped miniature, skipping the test where it is not installed or ships no background weights."""
    import pytest

    from anystory.sdxl.miniature import load_miniature, miniature_available

    if not miniature_available():
        pytest.skip("the miniature is not installed (assets/miniature)")
    pipe = load_miniature()
    if pipe.anystory.background is None:
        pytest.skip("the installed miniature has no background reference weights")
    return pipe
