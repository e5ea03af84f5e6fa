"""Builders the tests share (tiny pipelines, reference images, eval data); not tests themselves."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: The DreamBench photos beside the repository (``../shared/data/dreambench``); tests using them skip without it.
DREAMBENCH = os.path.join(os.path.dirname(ROOT), "shared", "data", "dreambench")
