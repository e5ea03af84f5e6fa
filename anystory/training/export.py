"""Write the trained miniature as a diffusers-format folder that the *real* SDXL code path loads.

``<export_dir>/`` gets ``model_index.json`` + one folder per component (``save_pretrained``), then
``anystory.safetensors`` + ``anystory_config.json`` (``save_anystory_weights``). Loading it is exactly
``AnyStorySDXLPipeline.from_pretrained(dir)`` + ``load_anystory_weights(dir)``. Float tensors are stored in
``save_dtype`` (float16 by default: it halves the size; loading with ``torch_dtype=torch.float32`` upcasts).
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from ..sdxl.pipeline_sdxl import AnyStorySDXLPipeline
from ..weights import cast_floats

SIZE_LIMIT_MB = 25.0
COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler",
              "image_encoder", "feature_extractor")


def folder_size_mb(directory: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs) / 2**20


def _drop_load_paths(directory: str) -> None:
    """diffusers records in each model's config the folder it was loaded from (``_name_or_path``): in a written
    model that is a path on the training machine, and it would make two rebuilds in different folders differ.
    Loading sets it again, so nothing reads it from the file."""
    for folder, _, names in os.walk(directory):
        for name in (n for n in names if n.endswith(".json")):
            path = os.path.join(folder, name)
            with open(path) as f:
                config = json.load(f)
            if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
                with open(path, "w") as f:
                    f.write(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_base_pipeline(pipe: AnyStorySDXLPipeline, directory: str) -> None:
    """The SDXL components alone (no ``anystory`` component), via diffusers' ``save_pretrained``."""
    bare = AnyStorySDXLPipeline(**{k: getattr(pipe, k) for k in COMPONENTS})
    bare.save_pretrained(directory, safe_serialization=True)
    _drop_load_paths(directory)


def export_miniature(cfg: dict, pipe: AnyStorySDXLPipeline, summary: dict, log=print) -> dict:
    out = cfg["export_dir"]
    if pipe.anystory is None:
        raise ValueError("nothing to export: the pipeline has no AnyStory weights")
    keep = {}
    classifier = os.path.join(out, "identity_classifier.safetensors")
    if os.path.isfile(classifier):  # trained separately; survive the rewrite of the folder
        with open(classifier, "rb") as f:
            keep["identity_classifier.safetensors"] = f.read()
    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_base_pipeline(pipe, tmp)
    pipe.save_anystory_weights(tmp)
    cast_floats(tmp, getattr(torch, cfg["model"]["save_dtype"]))
    for name, data in keep.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    with open(os.path.join(tmp, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    size = folder_size_mb(tmp)
    if size > SIZE_LIMIT_MB:
        raise ValueError(f"the miniature is {size:.1f} MB, over the {SIZE_LIMIT_MB} MB limit; "
                         f"left in {tmp}, {out} untouched")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"[export] wrote {out} ({size:.1f} MB)")
    return {"size_mb": round(size, 2)}  # no folder: the summary ships with the model
