"""Tiny random weights for the ComfyUI server test, written into a ComfyUI base directory's ``models/`` (and test
photos into ``input/``): a FLUX of width 32 in ComfyUI's layout, ``anystory_flux.bin`` for it in the release's
layout, a SigLIP of width 16, a Redux projection, and a 16-channel TAESD that the stock VAELoader loads as
``taef1``. The FLUX, SigLIP and Redux files are read by the test-only nodes in ``tiny_nodes`` (the stock loaders
detect only full-size models). Untrained: images mean nothing; every code path of the real files runs.

    python tests/comfyui/tiny_models.py BASE_DIR
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMFYUI = os.path.normpath(os.path.join(ROOT, "..", "shared", "comfyui"))

#: the server model: the tiny FLUX of the equality test with FLUX's 16 latent channels
SERVER_UNET = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[4, 6, 6],
                   theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
SIGLIP = {"num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 16, "image_size": 54,
          "intermediate_size": 32, "model_type": "siglip_vision_model", "num_attention_heads": 2,
          "num_hidden_layers": 2, "patch_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
FILES = {"unet": "tiny_flux.safetensors", "anystory": "anystory_flux.bin", "clip_vision": "tiny_siglip.safetensors",
         "style_model": "tiny_redux.safetensors"}
PHOTOS = ["anystory_subject_1.png", "anystory_subject_2.png", "anystory_subject_3.png"]


def _random(sd: dict, g: torch.Generator, std: float = 0.1) -> dict:
    """Normal weights, and ones for norm scales (ComfyUI builds its modules uninitialised)."""
    def is_scale(k):
        return k.endswith(".scale") or ("norm" in k and k.endswith(".weight"))

    return {k: torch.ones(v.shape) if is_scale(k) else torch.randn(v.shape, generator=g) * std for k, v in sd.items()}


def write(base: str, seed: int = 0) -> dict:
    if COMFYUI not in sys.path:
        sys.path.insert(0, COMFYUI)
    sys.path.insert(0, ROOT)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.clip_vision
    import comfy.supported_models
    from comfy.taesd.taesd import TAESD

    from anystory.flux.tiny_flux import random_released_state_dict
    from comfyui_anystory.weights import diffusers_skeleton

    g = torch.Generator().manual_seed(seed)
    models = os.path.join(base, "models")
    paths = {}
    for kind, name in FILES.items():
        folder = os.path.join(models, {"unet": "diffusion_models"}.get(kind, kind + "s" if kind == "style_model"
                                                                         else kind))
        os.makedirs(folder, exist_ok=True)
        paths[kind] = os.path.join(folder, name)

    config = comfy.supported_models.Flux(dict(SERVER_UNET))
    config.set_inference_dtype(torch.float32, None)
    save_file(_random(config.get_model({}).diffusion_model.state_dict(), g), paths["unet"])
    torch.save(random_released_state_dict(diffusers_skeleton(SERVER_UNET), redux_dim=SIGLIP["hidden_size"],
                                          generator=g, lora_bias=True), paths["anystory"])
    config_path = os.path.join(os.path.dirname(paths["clip_vision"]), "tiny_siglip.json")
    with open(config_path, "w") as f:
        json.dump(SIGLIP, f)
    siglip = comfy.clip_vision.ClipVisionModel(config_path)
    save_file(_random(siglip.get_sd(), g), paths["clip_vision"])
    redux = {"redux_up.weight": (96, 16), "redux_up.bias": (96,), "redux_down.weight": (32, 96),
             "redux_down.bias": (32,)}
    save_file({k: torch.randn(s, generator=g) * 0.1 for k, s in redux.items()}, paths["style_model"])

    vae_dir = os.path.join(models, "vae_approx")
    os.makedirs(vae_dir, exist_ok=True)
    taesd = TAESD(latent_channels=16)  # ComfyUI's convolutions start uninitialised: fan-in scaled weights
    for part in ("encoder", "decoder"):
        sd = getattr(taesd, f"taesd_{part}").state_dict()
        save_file({k: torch.randn(v.shape, generator=g) / max(v[0].numel(), 1) ** 0.5 if v.dim() > 1
                   else torch.zeros(v.shape) for k, v in sd.items()},
                  os.path.join(vae_dir, f"taef1_{part}.safetensors"))

    inputs = os.path.join(base, "input")
    os.makedirs(inputs, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(PHOTOS):
        photo = np.full((48, 40, 4), 255, dtype=np.uint8)
        photo[..., :3] = rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)
        photo[:8, ..., 3] = 0  # LoadImage's MASK: 1 - alpha, so a subject mask with the top rows out
        Image.fromarray(photo, "RGBA").save(os.path.join(inputs, name))
    return paths


if __name__ == "__main__":
    print(json.dumps(write(sys.argv[1]), indent=1))
