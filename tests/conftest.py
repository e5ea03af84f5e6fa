import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared builders in tests/helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from helpers import DREAMBENCH  # noqa: E402


@pytest.fixture
def dreambench_dir():
    if not os.path.isdir(DREAMBENCH):
        pytest.skip(f"DreamBench data not found at {DREAMBENCH}")
    return DREAMBENCH
