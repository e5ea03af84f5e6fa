"""Options of SDXL-scale runs on the smoke model: gradient accumulation and gradient checkpointing change memory,
not the result; bf16 autocast trains; TensorBoard receives losses, router mIoU, learning rate and sample images."""
import os

import numpy as np
import pytest
import torch

from anystory import AnyStorySDXLPipeline
from anystory.training.components import build_components
from anystory.training.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")


def _cfg(tmp_path, **over):
    base = {"work_dir": str(tmp_path), "log_every": 1, "trackers": []}
    base.update(over)
    return load_config(SMOKE, base)


def _stage1(cfg):
    from anystory.training.stage1 import train_stage1

    torch.set_num_threads(1)
    torch.manual_seed(0)
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.set_progress_bar_config(disable=True)
    train_stage1(cfg, pipe, log=lambda *_: None)
    return pipe


def _log(cfg, stage):
    from anystory.training.loop import read_log

    return read_log(os.path.join(cfg["work_dir"], stage))


def _max_diff(a, b):
    sa, sb = a.anystory.state_dict(), b.anystory.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_accumulating_two_micro_batches_equals_one_batch_twice_as_large(tmp_path):
    whole = _cfg(tmp_path / "a", stage1={"steps": 2, "batch_size": 4})
    split = _cfg(tmp_path / "b", stage1={"steps": 2, "batch_size": 2, "gradient_accumulation": 2})
    a, b = _stage1(whole), _stage1(split)
    for x, y in zip(_log(whole, "stage1"), _log(split, "stage1")):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert _max_diff(a, b) < 1e-4  # float summation order; Adam's normalised step magnifies it for tiny gradients


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain = _cfg(tmp_path / "a", stage1={"steps": 2, "batch_size": 2})
    ckpt = _cfg(tmp_path / "b", stage1={"steps": 2, "batch_size": 2}, gradient_checkpointing=True)
    a, b = _stage1(plain), _stage1(ckpt)
    assert b.unet.is_gradient_checkpointing and b.anystory.reference_net.unet.is_gradient_checkpointing
    assert not a.unet.is_gradient_checkpointing
    assert _max_diff(a, b) < 1e-6


def test_bf16_autocast_trains(tmp_path):
    from accelerate.state import AcceleratorState

    cfg = _cfg(tmp_path, stage1={"steps": 2, "batch_size": 2}, mixed_precision="bf16", frozen_dtype="bf16",
               gradient_checkpointing=True)
    AcceleratorState._reset_state(True)  # one precision per process: this test's differs from the others'
    try:
        pipe = _stage1(cfg)
        assert AcceleratorState().mixed_precision == "bf16"
        assert pipe.unet.dtype == pipe.vae.dtype == torch.bfloat16 and pipe.anystory.dtype == torch.float32
    finally:
        AcceleratorState._reset_state(True)
    rows = _log(cfg, "stage1")
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)


def test_gradient_checkpointing_keeps_stage2_routing(tmp_path):
    """Stage 2 re-runs routed layers in backward: each from the routing state it saw (Gumbel noise included)."""
    from anystory.training.components import anystory_config
    from anystory.training.stage2 import train_stage2

    pipes = []
    for name, on in (("a", False), ("b", True)):
        cfg = _cfg(tmp_path / name, stage2={"steps": 2, "batch_size": 2}, gradient_checkpointing=on)
        torch.manual_seed(0)
        pipe = AnyStorySDXLPipeline(**build_components(cfg))
        pipe.set_progress_bar_config(disable=True)
        pipe.init_anystory(**anystory_config(cfg))
        train_stage2(cfg, pipe, log=lambda *_: None)
        pipes.append(pipe)
    assert _max_diff(*pipes) < 1e-6


def test_tensorboard_gets_losses_miou_lr_and_routing_samples(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from anystory.training.components import anystory_config
    from anystory.training.stage2 import train_stage2

    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, trackers=["tensorboard"], sample_every=2, stage2={"steps": 2, "batch_size": 2})
    torch.manual_seed(0)
    pipe = AnyStorySDXLPipeline(**build_components(cfg))
    pipe.set_progress_bar_config(disable=True)
    pipe.init_anystory(**anystory_config(cfg))
    train_stage2(cfg, pipe, log=lambda *_: None)
    logs = os.path.join(cfg["work_dir"], "logs", "stage2")
    events = EventAccumulator(logs, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "diffusion", "routing", "miou", "lr"} <= scalars, scalars
    assert [e.step for e in events.Scalars("miou")] == [1, 2]
    assert events.Scalars("lr")[0].value == pytest.approx(_log(cfg, "stage2")[0]["lr"])
    images = sorted(events.Tags()["images"])
    assert images == ["stage2/sample_1_subjects", "stage2/sample_3_subjects"], images
    shot = events.Images(images[-1])[0]
    assert shot.step == 2 and shot.width > 2 * shot.height  # the generated image beside its routing map


def test_unknown_tracker_is_named(tmp_path):
    from anystory.training.tracking import tracker_names

    with pytest.raises(ValueError, match="unknown"):
        tracker_names({"trackers": ["mlflowz"]})
    assert tracker_names({"trackers": []}) == []


def test_scale_configs_load_and_name_their_strategy():
    import yaml

    cfg = load_config(os.path.join(ROOT, "configs", "sdxl.yaml"))
    assert cfg["mixed_precision"] == "bf16" and cfg["frozen_dtype"] == "bf16" and cfg["gradient_checkpointing"]
    assert cfg["stage1"]["gradient_accumulation"] > 1 and cfg["data"]["stage1"]
    kinds = {}
    for name in ("ddp", "deepspeed_zero2", "fsdp"):
        with open(os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml")) as f:
            launch = yaml.safe_load(f)
        assert launch["mixed_precision"] == "bf16" and launch["num_processes"] == 8
        kinds[name] = launch["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "fsdp": "FSDP"}
