"""The FLUX stages' configuration: the defaults ``config.DEFAULTS`` takes in, and the stage names.

``backbone: flux`` in a training config runs :data:`FLUX_STAGES` instead of the SDXL stages (``configs/flux.yaml``,
``configs/flux_tiny.yaml``). ``train`` lists what a stage trains (:data:`PARTS`); everything else stays frozen.
"""
from __future__ import annotations

FLUX_STAGES = ("flux_subject", "flux_router")

#: trainable parts of the released weights; "router" names its three parts at once
PARTS = ("ref", "redux", "router_lora", "router_embedder", "routing_map")
ALIASES = {"router": ("router_lora", "router_embedder", "routing_map")}

_STAGE = {"batch_size": 1, "lr": 1e-4, "redux_scale": 1.0, "guidance": 3.5, "generic_caption": 0.3,
          "drop_text": 0.1, "ema": 0.0, "gradient_accumulation": 1, "weight_decay": 0.0,
          "heldout_batches": 4}  # held-out batches of 4 measured before and after the stage

FLUX_DEFAULTS = {
    "backbone": "sdxl",  # "flux": the FLUX stages
    "flux": {
        "base": "black-forest-labs/FLUX.1-dev",  # a diffusers folder / hub id, or "tiny" (built in code, tests)
        "redux": "black-forest-labs/FLUX.1-Redux-dev",  # SigLIP and the Redux projection the release builds on
        "init_from": None,  # a released anystory_flux.bin (file, folder or hub id) to fine-tune; None = fresh start
        "rank": 128,  # the release's rank (fresh start only; a loaded file keeps its own)
        "lora_bias": False,  # fresh start: lora_B biases on the two transformer LoRAs
        "dtype": "float32",  # the whole pipeline's dtype ("bfloat16" at full size; trained weights stay float32)
        "save_dtype": "float32",
        "max_sequence_length": 512,
        "reference_size": 512,  # the release's reference resolution (base "tiny": its own, 32)
        "single_blocks": 2,  # base "tiny" only: single blocks of the tiny transformer
    },
    # the subject path: reference LoRA and Redux projection; one subject mostly, several routed by the masks
    "flux_subject": {**_STAGE, "steps": 1000, "subjects": [0.6, 0.3, 0.1], "train": ["ref", "redux"],
                     "routing_weight": 0.0},
    # the router: its LoRA, token embedder and routing-map projections; several subjects, routed by the router
    "flux_router": {**_STAGE, "steps": 1000, "subjects": [0.0, 0.6, 0.4], "train": ["router"],
                    "routing_weight": 1.0},
}


def trained_parts(names) -> tuple:
    """The config's ``train`` list, aliases expanded; unknown names are an error naming the known ones."""
    out = []
    for name in names or ():
        for part in ALIASES.get(name, (name,)):
            if part not in PARTS:
                raise ValueError(f"unknown trainable part {name!r}; choose from {', '.join(PARTS + tuple(ALIASES))}")
            if part not in out:
                out.append(part)
    return tuple(out)
