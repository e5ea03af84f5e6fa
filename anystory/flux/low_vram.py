"""AnyStory-FLUX on the GPUs people have (16-40 GB): quantization of the two big models, and offloading.

FLUX.1-dev's transformer is 11.9 B parameters (23.8 GB in bfloat16) and its T5-XXL encoder 4.8 B (9.5 GB). Two
levers, both diffusers' own:

- ``quantization`` (at load time, :func:`quantization_config`): the transformer and T5 (``text_encoder_2``)
  through diffusers' ``PipelineQuantizationConfig``. ``"int8"``: torchao int8 weight-only (runs on CPUs too,
  which is how the tests check it); ``"bnb-8bit"`` / ``"bnb-4bit"``: bitsandbytes LLM.int8 / NF4 (CUDA only).
  The AnyStory LoRAs load as PEFT adapters on the quantized layers (PEFT's torchao / bitsandbytes LoRA
  layers); the router's own low-rank layers and the Redux embedders stay in the compute dtype.
- ``offload`` (after loading, :func:`apply_offload`): ``"none"`` (all on the GPU), ``"model"`` (one model at a
  time: ``enable_model_cpu_offload``), ``"group"`` (``enable_group_offload``, block by block with CUDA
  streams), ``"sequential"`` (``enable_sequential_cpu_offload``, layer by layer: smallest, slowest).

A ``vram`` preset (``--vram auto|16|24|40`` in the CLI and the app) picks both (:func:`plan_for_vram`); the
memory table in docs/flux.md says what each mode needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

QUANTIZATION = ("none", "int8", "bnb-8bit", "bnb-4bit")
OFFLOAD = ("none", "model", "group", "sequential")
VRAM = ("auto", "16", "24", "40")
QUANTIZED_COMPONENTS = ("transformer", "text_encoder_2")

#: preset -> (quantization, offload); see the memory table in docs/flux.md for the estimated peaks
PRESETS = {"40": ("none", "none"), "24": ("bnb-8bit", "model"), "16": ("bnb-4bit", "model")}


def _check(value: str, allowed, what: str) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def quantization_config(quantization: str, compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' ``PipelineQuantizationConfig`` for the transformer and T5, or ``None`` for ``"none"``."""
    _check(quantization, QUANTIZATION, "quantization")
    if quantization == "none":
        return None
    import diffusers
    import transformers
    from diffusers import PipelineQuantizationConfig

    if quantization == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        configs = (diffusers.TorchAoConfig(Int8WeightOnlyConfig()), transformers.TorchAoConfig(Int8WeightOnlyConfig()))
    else:
        if quantization == "bnb-8bit":
            kwargs = {"load_in_8bit": True}
        else:
            kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute_dtype}
        configs = (diffusers.BitsAndBytesConfig(**kwargs), transformers.BitsAndBytesConfig(**kwargs))
    return PipelineQuantizationConfig(quant_mapping=dict(zip(QUANTIZED_COMPONENTS, configs)))


def apply_offload(pipe, offload: str, device="cuda") -> None:
    """Place ``pipe`` for inference on ``device`` by ``offload`` (after the AnyStory weights are loaded)."""
    _check(offload, OFFLOAD, "offload")
    device = torch.device(device)
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"),
                                  offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=device.type == "cuda")
    else:
        pipe.enable_sequential_cpu_offload(device=device)


@dataclass(frozen=True)
class VramPlan:
    vram: str  # the preset used ("16", "24", "40"), or "cpu"
    quantization: str
    offload: str
    reason: str

    def describe(self) -> str:
        quant = {"none": "bfloat16", "int8": "int8 (torchao)", "bnb-8bit": "8-bit (bitsandbytes)",
                 "bnb-4bit": "4-bit NF4 (bitsandbytes)"}[self.quantization]
        place = {"none": "all on the GPU", "model": "model CPU offload", "group": "group offload",
                 "sequential": "sequential CPU offload"}[self.offload]
        return f"FLUX {quant} transformer and T5, {place} ({self.reason})"


def cuda_memory_gb(device=None) -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device or 0).total_memory / 1024 ** 3


def plan_for_vram(vram: str = "auto", device="cuda", total_gb: Optional[float] = None) -> VramPlan:
    """The quantization and offload for a GPU of ``vram`` GB (``"auto"``: ``total_gb``, else read from the
    device: >= 38 GB -> "40", >= 22 GB -> "24", else "16")."""
    _check(str(vram), VRAM, "vram")
    vram = str(vram)
    if torch.device(device).type != "cuda":
        return VramPlan("cpu", "none", "none", f"device {device}: no GPU memory limit")
    reason = f"--vram {vram}"
    if vram == "auto":
        total = total_gb if total_gb is not None else cuda_memory_gb(torch.device(device))
        if total is None:
            return VramPlan("cpu", "none", "none", "no CUDA device")
        vram = "40" if total >= 38 else "24" if total >= 22 else "16"
        reason = f"--vram auto: the GPU has {total:.0f} GB"
    quantization, offload = PRESETS[vram]
    return VramPlan(vram, quantization, offload, reason)
