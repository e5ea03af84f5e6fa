"""Estimated GPU memory per process for SDXL-scale AnyStory training, from parameter counts (not a measurement).

    python -m benchmarks.training_memory --gpus 8

SDXL's real modules are built on the meta device (no weights, no memory) and counted. Per process, the
parameter-held state is: frozen components in ``frozen_dtype`` (2 bytes: bf16), AnyStory's module in fp32
(4 bytes; in stage 2 the ReferenceNet is frozen but stays fp32), and for the trained parameters an fp32 gradient
(4) and AdamW's two fp32 moments (8). DDP holds all of it on every GPU, plus its gradient buckets (4 bytes per
trained parameter); ZeRO-2 (DeepSpeed) and FSDP SHARD_GRAD_OP split gradients and moments over the GPUs.
Activations are not counted: they scale with batch and resolution (measure them); gradient checkpointing keeps
roughly one block's activations plus every block's input.
"""
from __future__ import annotations

import argparse

import torch

GIB = 2**30


def count_parameters() -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    from anystory.sdxl.adapter_sdxl import AnyStorySDXLAdapter, cross_attention_layers
    from anystory.training.stage1 import stage1_parameters
    from anystory.training.stage2 import stage2_parameters

    from .sdxl import SDXL_UNET, SDXL_VAE

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        frozen = {
            "unet": unet,
            "vae": AutoencoderKL(**SDXL_VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                         num_hidden_layers=12, projection_dim=768)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                projection_dim=1280)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(
                hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                image_size=224, patch_size=14, projection_dim=1024)),
        }
        adapter = AnyStorySDXLAdapter(dict(unet.config), cross_attention_layers(unet), image_embed_dim=1280)
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in frozen.items()}
    counts["anystory"] = sum(p.numel() for p in adapter.parameters())
    counts["stage1_trained"] = sum(p.numel() for p in stage1_parameters(adapter).values())
    counts["stage2_trained"] = sum(p.numel() for p in stage2_parameters(adapter).values())
    return counts


def estimate(counts: dict, gpus: int) -> list:
    frozen = sum(counts[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2", "image_encoder"))
    rows = []
    for stage in ("stage1", "stage2"):
        trained = counts[f"{stage}_trained"]
        weights = 2 * frozen + 4 * counts["anystory"]
        for strategy, per_trained in (("DDP", 4 + 8 + 4), ("ZeRO-2 / FSDP SHARD_GRAD_OP", (4 + 8) / gpus)):
            rows.append({"stage": stage, "strategy": strategy, "trained_params": trained,
                         "weights_gib": weights / GIB, "train_state_gib": per_trained * trained / GIB,
                         "total_gib": (weights + per_trained * trained) / GIB})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=8)
    args = p.parse_args(argv)
    counts = count_parameters()
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in counts.items()))
    print(f"| stage | strategy ({args.gpus} GPUs) | trained params | weights (GiB) | grads + AdamW (GiB) | total, "
          f"without activations (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in estimate(counts, args.gpus):
        print(f"| {r['stage']} | {r['strategy']} | {r['trained_params'] / 1e9:.2f}B | {r['weights_gib']:.1f} | "
              f"{r['train_state_gib']:.1f} | {r['total_gib']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
