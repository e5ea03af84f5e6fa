"""Fixtures the SDXL tests share: the tiny components and the tiny AnyStory pipeline built on them, one per module
(a module's tests may change the pipeline's state; no other module sees it)."""
import pytest

from anystory.sdxl.tiny_sdxl import tiny_sdxl_components
from helpers.routing import tiny_pipe


@pytest.fixture(scope="module")
def components():
    return tiny_sdxl_components(seed=0)


@pytest.fixture(scope="module")
def pipe(components):
    return tiny_pipe(components)
