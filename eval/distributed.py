"""Generation spread over the processes ``accelerate launch -m eval.run ...`` starts (one per GPU, or CPUs).

Each expected image ``k`` of the entry at benchmark position ``i`` belongs to process
``(i * images_per_prompt + k) % world`` (UNO's rule): a fixed assignment, so no image is made twice or skipped
whatever the others have already written, and a resumed run keeps it. The main process alone checks and
records the run folder (before anyone generates) and, after everyone has finished generating, scores and
writes the tables once. Not launched (no ``WORLD_SIZE`` > 1), everything runs in this one process and
``torch.distributed`` is never touched.
"""
from __future__ import annotations

import os
from typing import Any, List


class Processes:
    """``device="cpu"`` joins the processes over gloo (CPU-only machines, or GPUs left idle), ``cuda`` over NCCL."""

    def __init__(self, device: str = "cpu"):
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        self.world, self.rank, self.local_rank, self.state = 1, 0, 0, None
        if launched > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=device == "cpu")
            self.rank, self.local_rank = self.state.process_index, self.state.local_process_index
            self.world = self.state.num_processes
            if self.world != launched:
                raise RuntimeError(f"launched as {launched} processes but accelerate joined {self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, entry_index: int, k: int, images_per_prompt: int) -> bool:
        return (entry_index * images_per_prompt + k) % self.world == self.rank

    def device(self, device: str) -> str:
        """``cuda`` means this process's own GPU."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device

    def gather(self, obj: Any) -> List[Any]:
        """Every process's ``obj``, in rank order (a barrier too)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj: Any) -> Any:
        """The main process's ``obj`` (a barrier too)."""
        return self.gather(obj)[0]
