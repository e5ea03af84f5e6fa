"""Test-only ComfyUI nodes (linked into a scratch ``custom_nodes`` by the server test, never shipped): they load
the tiny files of ``tiny_models.py`` that ComfyUI's stock loaders cannot detect, and give a CONDITIONING without
T5 (impractical on a CPU). Each stands in for one stock node of the example workflows, with the same outputs."""
import hashlib
import os

import torch

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
import comfy.utils
import folder_paths
from comfy.ldm.flux.redux import ReduxImageEncoder

SERVER_UNET = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=32, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=[4, 6, 6],
                   theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


class TinyFluxUNETLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),),
                             "weight_dtype": (["default"],)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, unet_name, weight_dtype="default"):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("diffusion_models", unet_name))
        config = comfy.supported_models.Flux(dict(SERVER_UNET))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({})
        model.load_model_weights(sd, "")
        device = comfy.model_management.get_torch_device()
        return (comfy.model_patcher.ModelPatcher(model, load_device=device,
                                                 offload_device=comfy.model_management.unet_offload_device()),)


class TinyFluxConditioning:
    """CLIPTextEncode's stand-in: a CONDITIONING drawn from the text's hash (7 tokens of width 32, pooled 32)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text):
        g = torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16))
        return ([[torch.randn(1, 7, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]],)


class TinyCLIPVisionLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": (folder_paths.get_filename_list("clip_vision"),)}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name):
        path = folder_paths.get_full_path_or_raise("clip_vision", clip_name)
        clip = comfy.clip_vision.ClipVisionModel(os.path.join(os.path.dirname(path), "tiny_siglip.json"))
        clip.load_sd(comfy.utils.load_torch_file(path))
        return (clip,)


class TinyStyleModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"style_model_name": (folder_paths.get_filename_list("style_models"),)}}

    RETURN_TYPES = ("STYLE_MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, style_model_name):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("style_models", style_model_name))
        model = ReduxImageEncoder(redux_dim=16, txt_in_features=32)
        model.load_state_dict(sd)
        return (comfy.sd.StyleModel(model),)


class TinyAssertFinite:
    """Passes an IMAGE through; a NaN or infinity in it fails the workflow (SaveImage would store it as 0)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "check"
    CATEGORY = "testing"

    def check(self, images):
        if not torch.isfinite(images).all():
            raise ValueError(f"non-finite values in {int((~torch.isfinite(images)).sum())} of {images.numel()}")
        return (images,)


NODE_CLASS_MAPPINGS = {"TinyAssertFinite": TinyAssertFinite, "TinyFluxUNETLoader": TinyFluxUNETLoader, "TinyFluxConditioning": TinyFluxConditioning,
                       "TinyCLIPVisionLoader": TinyCLIPVisionLoader, "TinyStyleModelLoader": TinyStyleModelLoader}
