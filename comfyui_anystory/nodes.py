"""The AnyStory nodes: load the release, describe subjects (chained, 1-4), patch a FLUX MODEL, read routing maps."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import folder_paths
import comfy.latent_formats

from anystory.flux.weights_flux import read_released_file

from .conditioning import MAX_SUBJECTS, Settings, SubjectSet
from .encode import encode_subject
from .patch import PATCH_KEY, AnyStoryFluxPatch
from .weights import projection_encoders, resolve_for_model

FOLDER = "anystory"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".bin", ".pt"})

CATEGORY = "AnyStory"
ROUTER = ["auto", "on", "off"]
COLOURS = torch.tensor([[0.90, 0.25, 0.20], [0.20, 0.55, 0.90], [0.25, 0.75, 0.30], [0.95, 0.75, 0.15],
                        [0.15, 0.15, 0.15]])


@dataclass
class AnyStoryModel:
    """What the loader gives: the file (resolved against a FLUX model when applied), its projections, SigLIP."""

    state: dict
    redux: torch.nn.Module
    router: torch.nn.Module
    clip_vision: object
    dtype: torch.dtype = torch.float32
    latent_format: object = comfy.latent_formats.Flux()


class AnyStoryLoader:
    DESCRIPTION = ("Loads anystory_flux.bin (models/anystory/) with FLUX.1 Redux's SigLIP (CLIP_VISION) and, unless the "
                   "file carries them, FLUX.1 Redux's projection (STYLE_MODEL from 'Load Style Model').")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"anystory_name": (folder_paths.get_filename_list(FOLDER),),
                             "clip_vision": ("CLIP_VISION",)},
                "optional": {"style_model": ("STYLE_MODEL",)}}

    RETURN_TYPES = ("ANYSTORY",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, anystory_name, clip_vision, style_model=None):
        state = read_released_file(folder_paths.get_full_path_or_raise(FOLDER, anystory_name))
        base = None if style_model is None else style_model.model.state_dict()
        redux, router = projection_encoders(state, base)
        return (AnyStoryModel(state, redux.float(), router.float(), clip_vision),)


class AnyStorySubject:
    DESCRIPTION = ("One subject: its photo, an optional mask of the subject in the photo, and where it may appear "
                   "in the output (a box in fractions of the output, or a region MASK of the output). Chain up to "
                   f"{MAX_SUBJECTS} subjects through 'subjects'.")

    @classmethod
    def INPUT_TYPES(cls):
        frac = {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}
        return {"required": {"anystory": ("ANYSTORY",), "vae": ("VAE",), "image": ("IMAGE",),
                             "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                                    "tooltip": "multiplies this subject's redux tokens"}),
                             "reference_strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0, "step": 0.05,
                                                              "tooltip": "weight of its reference attention"}),
                             "box_x": ("FLOAT", frac), "box_y": ("FLOAT", frac),
                             "box_width": ("FLOAT", frac), "box_height": ("FLOAT", frac),
                             "reference_size": ("INT", {"default": 512, "min": 16, "max": 1024, "step": 16})},
                "optional": {"subject_mask": ("MASK",), "region": ("MASK",), "subjects": ("ANYSTORY_SUBJECTS",)}}

    RETURN_TYPES = ("ANYSTORY_SUBJECTS",)
    FUNCTION = "add"
    CATEGORY = CATEGORY

    def add(self, anystory, vae, image, strength, reference_strength, box_x, box_y, box_width, box_height,
            reference_size=512, subject_mask=None, region=None, subjects=None):
        place = None
        if region is not None:
            place = region[0].float()
        elif box_width > 0 and box_height > 0:
            place = (box_x, box_y, min(box_x + box_width, 1.0), min(box_y + box_height, 1.0))
        subject = encode_subject(anystory, vae, image, subject_mask, reference_size, strength=strength,
                                 reference_strength=reference_strength, region=place)
        return ((subjects or SubjectSet()).plus(subject),)


class AnyStoryApply:
    DESCRIPTION = ("Patches a FLUX MODEL with AnyStory's subjects (ComfyUI's own model: checkpoint, fp8, GGUF and "
                   "LoRA loaders combine). Schedule values are fractions of the sampling run; ref_start -1 is the "
                   "authors' default (0, or 0.09 with several subjects).")

    @classmethod
    def INPUT_TYPES(cls):
        frac = lambda v: ("FLOAT", {"default": v, "min": 0.0, "max": 1.0, "step": 0.01})  # noqa: E731
        return {"required": {"model": ("MODEL",), "anystory": ("ANYSTORY",), "subjects": ("ANYSTORY_SUBJECTS",),
                             "use_router": (ROUTER, {"default": "auto"}),
                             "redux_scale": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 4.0, "step": 0.05}),
                             "redux_start": frac(0.1), "redux_end": frac(0.3),
                             "ref_start": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01}),
                             "ref_end": frac(1.0)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, anystory, subjects, use_router, redux_scale, redux_start, redux_end, ref_start, ref_end):
        unet = model.model.model_config.unet_config
        if unet.get("image_model") != "flux":
            raise ValueError(f"AnyStory patches FLUX models; this MODEL is '{unet.get('image_model')}'")
        weights = resolve_for_model(anystory.state, unet)
        settings = Settings(redux_scale=redux_scale, redux_start=redux_start, redux_end=redux_end,
                            ref_start=None if ref_start < 0 else ref_start, ref_end=ref_end,
                            use_router={"auto": None, "on": True, "off": False}[use_router])
        return (AnyStoryFluxPatch(weights, subjects, settings).apply_to(model),)


class AnyStoryRoutingMaps:
    DESCRIPTION = ("The router's decisions of the last run of an AnyStory MODEL, averaged over its steps and "
                   "layers: one MASK per subject and a colour IMAGE (one colour per subject, dark: none). Connect "
                   "the sampler's LATENT so it runs after sampling.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "samples": ("LATENT",)}}

    RETURN_TYPES = ("MASK", "IMAGE")
    FUNCTION = "maps"
    CATEGORY = CATEGORY

    def maps(self, model, samples):
        patch = model.model_options["transformer_options"].get(PATCH_KEY)
        if patch is None:
            raise ValueError("this MODEL has no AnyStory patch: connect the output of 'Apply AnyStory (FLUX)'")
        if not patch.maps:
            raise ValueError("no routing maps yet: sample with this MODEL first (connect the sampler's LATENT)")
        shares = torch.stack(patch.maps).mean(dim=0)[0]  # [N+1, h, w] of the first image
        h, w = samples["samples"].shape[-2:]
        shares = F.interpolate(shares[None], size=(h * 8, w * 8), mode="nearest")[0]
        n = shares.shape[0] - 1
        colours = torch.cat([COLOURS[:n], COLOURS[-1:]])
        image = torch.einsum("khw,kc->hwc", shares, colours).clamp(0, 1)[None]
        return shares[:n], image


NODE_CLASS_MAPPINGS = {"AnyStoryLoader": AnyStoryLoader, "AnyStorySubject": AnyStorySubject,
                       "AnyStoryApply": AnyStoryApply, "AnyStoryRoutingMaps": AnyStoryRoutingMaps}
NODE_DISPLAY_NAME_MAPPINGS = {"AnyStoryLoader": "Load AnyStory (FLUX)", "AnyStorySubject": "AnyStory Subject",
                              "AnyStoryApply": "Apply AnyStory (FLUX)", "AnyStoryRoutingMaps": "AnyStory Routing Maps"}
