"""Per-model generation presets: steps, guidance and output size, and the demo's size limits, one table.

The CLI (``anystory.generate``), the app (``anystory/app``), the pipelines' call defaults and eval's pipeline
methods all read it, so a model runs with the same settings wherever it is called. ``flux`` is the authors'
release setting; ``sdxl`` diffusers' SDXL size with the paper's guidance; ``miniature`` what the shipped miniature
was tuned with (docs/experiments/miniature.md); ``tiny`` the app's untrained wiring-test pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Preset:
    """One model's defaults (``steps``, ``guidance``, ``size``: the output's side in pixels) and the demo's size
    sliders (``min_size``, ``max_size``, ``size_step``)."""

    steps: int
    guidance: float
    size: int
    min_size: int
    max_size: int
    size_step: int

    def call(self) -> dict:
        """The pipeline keywords of the denoising settings (the size is the pipeline's own unless asked for)."""
        return {"num_inference_steps": self.steps, "guidance_scale": self.guidance}


PRESETS = {
    "flux": Preset(steps=25, guidance=3.5, size=512, min_size=256, max_size=1024, size_step=64),
    "sdxl": Preset(steps=30, guidance=5.0, size=1024, min_size=512, max_size=1536, size_step=64),
    "miniature": Preset(steps=20, guidance=3.0, size=128, min_size=64, max_size=256, size_step=32),
    "tiny": Preset(steps=4, guidance=3.0, size=64, min_size=32, max_size=128, size_step=32),
}

FLUX, SDXL, MINIATURE = PRESETS["flux"], PRESETS["sdxl"], PRESETS["miniature"]


def preset(kind: str) -> Preset:
    """The preset of ``kind`` (``flux``, ``sdxl``, ``miniature``, ``tiny``)."""
    if kind not in PRESETS:
        raise KeyError(f"no preset for model kind {kind!r}: one of {', '.join(PRESETS)}")
    return PRESETS[kind]


def preset_for(kind: str, pipe) -> Preset:
    """The kind's preset; SDXL-shaped small models (miniature, tiny) take their size and limits from the pipeline
    itself (native size, the UNet's stride), so a rebuilt miniature of another size needs no edit here."""
    d = preset(kind)
    unet = getattr(pipe, "unet", None)
    if kind in ("miniature", "tiny") and unet is not None and hasattr(pipe, "default_sample_size"):
        factor = int(pipe.vae_scale_factor)
        native = int(pipe.default_sample_size) * factor
        step = factor * 2 ** (len(unet.config.block_out_channels) - 1)
        d = replace(d, size=native, min_size=max(step, native // 2), max_size=native * 2, size_step=step)
    return d
