"""Fixtures the app tests share: the app's handle around the tiny untrained pipeline."""
import pytest

from anystory.app.environment import Environment
from anystory.app.models import load_model


@pytest.fixture(scope="session")
def handle():
    """``--model tiny``: every app code path in seconds (random weights; tests that patch it restore it)."""
    return load_model(Environment(), "tiny")
