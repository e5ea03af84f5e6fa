"""ComfyUI in-process for the node pack's tests: the snapshot in ``../shared/comfyui`` on ``sys.path`` (CPU), and a
tiny FLUX built as ComfyUI builds one (``FluxSchnell``/``Flux`` from a ``unet_config``), since its stock loaders
only detect 3072-wide FLUX files."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFYUI = os.path.normpath(os.path.join(ROOT, "..", "shared", "comfyui"))

#: the shape of ``anystory.flux.tiny_flux.tiny_flux_components(single_blocks=2)`` in ComfyUI's terms
TINY_UNET = dict(image_model="flux", in_channels=4, out_channels=4, vec_in_dim=32, context_in_dim=32, hidden_size=32,
                 mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[4, 6, 6], theta=10000,
                 patch_size=2, qkv_bias=True, guidance_embed=True)


def import_comfy():
    """ComfyUI's ``comfy`` package from the snapshot, on the CPU; the test is skipped when the snapshot or its
    requirements are absent."""
    if not os.path.isfile(os.path.join(COMFYUI, "comfy", "model_patcher.py")):
        pytest.skip(f"ComfyUI snapshot not found at {COMFYUI}")
    if COMFYUI not in sys.path:
        # last: ComfyUI's top-level `app` package must not shadow the demo's app.py for the tests that follow
        sys.path.append(COMFYUI)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.supported_models  # noqa: F401
    except ImportError as e:
        pytest.skip(f"ComfyUI's requirements are not installed ({e})")
    return comfy


def comfy_flux(state_dict, unet_config=None, dtype=torch.float32):
    """A ComfyUI ``ModelPatcher`` holding a FLUX of ``unet_config`` with ``state_dict`` (ComfyUI layout)."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.Flux(dict(unet_config or TINY_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    missing, unexpected = model.diffusion_model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise KeyError(f"tiny FLUX: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.diffusion_model.to(dtype)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
