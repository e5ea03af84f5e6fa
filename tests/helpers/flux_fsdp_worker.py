"""Train a few steps of a FLUX stage on the tiny components, plainly or under torch's FSDP2 (``fully_shard``) on
the processes of ``torchrun`` (gloo on a CPU); writes the losses and the full trained tensors (main process).

    torchrun --nproc_per_node 2 tests/helpers/flux_fsdp_worker.py <stage> <steps> <out.safetensors>
"""
import json
import sys

import torch

from anystory.training.config import load_config
from anystory.training.data import source_for
from anystory.training.flux_config import trained_parts
from anystory.training.flux_stages import freeze_all, load_stage_input, trainable_parameters
from anystory.training.flux_step import DATA_STAGE, flux_step
from anystory.training.loop import TrainedModules, step_generator
from anystory.weights import save_tensors

BATCH = 2


def train(stage: str, steps: int, out: str, sharded: bool) -> list:
    import torch.distributed as dist

    torch.set_num_threads(1)
    cfg = load_config("configs/flux_tiny.yaml", {"work_dir": out + ".unused"})
    pipe = load_stage_input(cfg, stage)
    freeze_all(pipe)
    names = list(trainable_parameters(pipe, trained_parts(cfg[stage]["train"])))
    for p in trainable_parameters(pipe, trained_parts(cfg[stage]["train"])).values():
        p.requires_grad_(True)
    world, rank = (dist.get_world_size(), dist.get_rank()) if sharded else (1, 0)
    per = BATCH // world
    source = source_for(cfg, DATA_STAGE[stage])
    module = TrainedModules(lambda k: flux_step(cfg, stage, pipe, source, k, BATCH, step_generator(cfg, stage, k),
                                                rows=slice(rank * per, (rank + 1) * per)),
                            transformer=pipe.transformer, redux_embedder=pipe.redux_embedder,
                            router_embedder=pipe.router_embedder)
    if sharded:
        from torch.distributed.fsdp import fully_shard

        fully_shard(module)
    named = dict(module.named_parameters())
    opt = torch.optim.AdamW([named[n] for n in names], lr=1e-3)
    losses = []
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = module(k)["loss"]
        loss.backward()
        opt.step()
        value = loss.detach().reshape(1)
        if sharded:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    full = {n: (named[n].full_tensor() if hasattr(named[n], "full_tensor") else named[n]).detach().contiguous()
            for n in names}
    if rank == 0:
        save_tensors(full, out)
        with open(out + ".json", "w") as f:
            json.dump({"losses": losses, "sharded": sharded, "processes": world,
                       "shards": sorted({type(named[n]).__name__ for n in names})}, f)
    return losses


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    train(sys.argv[1], int(sys.argv[2]), sys.argv[3], sharded=True)
    dist.destroy_process_group()
