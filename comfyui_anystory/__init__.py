"""AnyStory for ComfyUI: native nodes that patch ComfyUI's own FLUX model (see docs/comfyui.md).

The pack imports the ``anystory`` package of this repository: linked into ``ComfyUI/custom_nodes`` it finds it
beside itself; copied elsewhere, ``anystory`` must be importable (``pip install -r requirements.txt`` and the
repository on ``PYTHONPATH``).
"""
import os
import sys

try:
    import anystory  # noqa: F401
except ImportError:
    sys.path.append(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
