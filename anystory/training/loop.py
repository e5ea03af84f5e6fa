"""What every stage's loop shares: accelerate, AdamW with warm-up + cosine, EMA, logging, resumable safetensors checkpoints.

A checkpoint is ``<stage dir>/checkpoint/``: ``trainable.safetensors`` (the parameters being trained),
``optimizer.safetensors`` (AdamW moments per parameter name), ``ema.safetensors`` when EMA is on, and
``state.json`` (step, done). Every random draw of step ``k`` is seeded by ``(seed, stage, k)``, so a resumed run
sees exactly the batches, noise and timesteps the uninterrupted run would have.

Many processes (``accelerate launch``): the stage hands its trained modules to ``accelerator.prepare`` (DDP,
FSDP or DeepSpeed, whichever the accelerate config picks), each process computes its rows of the step's global
batch (``batch_size`` per process x processes x ``gradient_accumulation`` micro-batches, see :meth:`rows`),
gradients are averaged by the wrapper, and only the main process writes checkpoints and logs.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from typing import Callable, Dict, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ..errors import StageStopped
from ..weights import load_tensors, save_tensors
from .config import stage_dir

STAGE_IDS = {"vae": 1, "clip": 2, "base": 3, "stage1": 4, "stage2": 5, "background": 6, "flux_subject": 7,
             "flux_router": 8, "flux_base": 9}


def make_accelerator(cfg: dict, stage: Optional[str] = None) -> Accelerator:
    """The stage's accelerator; with ``stage``, its experiment trackers (TensorBoard / W&B) are started."""
    from accelerate.utils import DistributedDataParallelKwargs

    from .tracking import tracker_names

    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(cfg.get("find_unused_parameters", True)))
    trackers = tracker_names(cfg) if stage else []
    precision = {"mixed_precision": cfg["mixed_precision"]} if cfg.get("mixed_precision") else {}  # else the launch's
    accumulation = int(cfg[stage].get("gradient_accumulation", 1)) if stage else 1
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp], log_with=trackers or None,
                      project_dir=os.path.join(cfg["work_dir"], "logs"), gradient_accumulation_steps=accumulation,
                      **precision)
    if trackers:
        from .tracking import flat_config

        acc.init_trackers(stage, config=flat_config(cfg, stage))
    return acc


class TrainedModules(torch.nn.Module):
    """The modules a stage trains, as one module whose forward is the stage's step: what ``accelerator.prepare``
    wraps (DDP, FSDP, DeepSpeed), so gradients are synchronised however the run is distributed."""

    def __init__(self, step: Callable, **modules: torch.nn.Module):
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)
        self._step = step

    def forward(self, *args, **kwargs):
        return self._step(*args, **kwargs)


def step_generator(cfg: dict, stage: str, step: int, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(int(cfg["seed"]) * 1_000_003 + STAGE_IDS[stage] * 100_003 + step)


def lr_factor(step: int, total: int, warmup_fraction: float = 0.05, floor: float = 0.1) -> float:
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class StageLoop:
    """Optimises the named ``params`` of one stage; the stage supplies the loss of each step."""

    def __init__(self, cfg: dict, stage: str, params: Dict[str, torch.nn.Parameter], accelerator: Accelerator,
                 log=print, module: Optional[TrainedModules] = None):
        scfg = cfg[stage]
        self.cfg, self.stage, self.accelerator = cfg, stage, accelerator
        self.print = log if accelerator.is_main_process else (lambda *_: None)
        self.params = {n: p for n, p in params.items() if p.requires_grad}
        if not self.params:
            raise ValueError(f"stage {stage}: nothing to train")
        self.total = int(scfg["steps"])
        self.stop_after = scfg.get("stop_after")
        self.base_lr = float(scfg["lr"])
        self.batch_size = int(scfg["batch_size"])
        self.accumulation = int(scfg.get("gradient_accumulation", 1))
        if self.accumulation < 1:
            raise ValueError(f"{stage}.gradient_accumulation must be >= 1, got {self.accumulation}")
        opt = torch.optim.AdamW(list(self.params.values()), lr=self.base_lr, weight_decay=float(scfg.get("weight_decay", 0.0)))
        if module is not None:
            self.module, self.optimizer = accelerator.prepare(module, opt)
        elif accelerator.num_processes > 1:
            raise ValueError(f"stage {stage} runs on one process only (it hands no module to accelerate)")
        else:
            self.module, self.optimizer = None, accelerator.prepare(opt)
        self.images = None  # set by the stage: called every ``sample_every`` steps to log sample images
        self.ema_decay = float(scfg.get("ema", 0.0) or 0.0)
        self.ema = {n: p.detach().clone() for n, p in self.params.items()} if self.ema_decay > 0 else None
        self.dir = stage_dir(cfg, stage)
        self.ckpt = os.path.join(self.dir, "checkpoint")
        os.makedirs(self.dir, exist_ok=True)
        self.step = 0
        self.done = False
        self.started = time.time()
        self.seconds_before = 0.0

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def resume(self) -> bool:
        state_file = os.path.join(self.ckpt, "state.json")
        if not os.path.isfile(state_file):
            return False
        with open(state_file) as f:
            state = json.load(f)
        weights = load_tensors(os.path.join(self.ckpt, "trainable.safetensors"), "checkpoint")
        missing = sorted(set(self.params) - set(weights))
        if missing:
            raise ValueError(f"stage {self.stage}: checkpoint {self.ckpt} lacks {missing[:5]} (config changed?)")
        if self.sharded:  # FSDP / DeepSpeed: their own sharded model and optimizer state, written beside ours
            self.accelerator.load_state(os.path.join(self.ckpt, "accelerate"))
        with torch.no_grad():
            for n, p in self.params.items():
                if not self.sharded:
                    p.copy_(weights[n])
        moments = {} if self.sharded else load_tensors(os.path.join(self.ckpt, "optimizer.safetensors"), "checkpoint")
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        for n, p in self.params.items():
            if f"{n}::exp_avg" in moments:
                opt.state[p] = {"step": moments[f"{n}::step"], "exp_avg": moments[f"{n}::exp_avg"].to(p.device),
                                "exp_avg_sq": moments[f"{n}::exp_avg_sq"].to(p.device)}
        if self.ema is not None:
            ema = load_tensors(os.path.join(self.ckpt, "ema.safetensors"), "checkpoint")
            self.ema = {n: ema[n].to(self.params[n].device) for n in self.params}
        self.step, self.done = int(state["step"]), bool(state.get("done", False))
        self.seconds_before = float(state.get("seconds", 0.0))
        self.print(f"[{self.stage}] resumed from {self.ckpt} at step {self.step}")
        return True

    @property
    def sharded(self) -> bool:
        """FSDP / DeepSpeed: parameters or optimizer state live in shards across processes."""
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def save(self) -> None:
        """Write the checkpoint (main process only; every process waits until it is complete).

        Under FSDP / DeepSpeed every process also writes its shard of the model and optimizer state
        (``accelerator.save_state``) and the full trainable weights are gathered for ``trainable.safetensors``."""
        tmp = self.ckpt + ".tmp"
        weights = None
        if self.sharded:
            if self.accelerator.is_main_process:
                os.makedirs(tmp, exist_ok=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(os.path.join(tmp, "accelerate"))
            full = self.accelerator.get_state_dict(self.module)
            weights = {n: full[n] for n in self.params}
        if self.accelerator.is_main_process:
            self._write_checkpoint(tmp, weights)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, tmp: str, weights: Optional[dict] = None) -> None:
        os.makedirs(self.ckpt, exist_ok=True)
        os.makedirs(tmp, exist_ok=True)
        weights = weights or {n: p.detach() for n, p in self.params.items()}
        save_tensors(weights, os.path.join(tmp, "trainable.safetensors"))
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        moments = {}
        for n, p in self.params.items():
            st = opt.state.get(p)
            if st:
                moments[f"{n}::step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(()).cpu()
                moments[f"{n}::exp_avg"] = st["exp_avg"].contiguous().cpu()
                moments[f"{n}::exp_avg_sq"] = st["exp_avg_sq"].contiguous().cpu()
        save_tensors(moments, os.path.join(tmp, "optimizer.safetensors"))
        if self.ema is not None:
            save_tensors(self.ema, os.path.join(tmp, "ema.safetensors"))
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"step": self.step, "done": self.done, "seconds": round(self.seconds, 1)}, f)
        # replace the previous checkpoint only once the new one is complete: a kill mid-save loses nothing
        if os.path.isdir(self.ckpt):
            old = self.ckpt + ".old"
            os.replace(self.ckpt, old)
            os.replace(tmp, self.ckpt)
            shutil.rmtree(old)
        else:
            os.replace(tmp, self.ckpt)

    @property
    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.started

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self, step: Optional[Callable[[], None]] = None, before: Optional[Callable[[], object]] = None,
            ema: bool = True):
        """The loop every stage runs: resume from the checkpoint, call ``step()`` (one optimizer step, ending in
        :meth:`update` or :meth:`train_step`) while steps remain, then, unless the checkpoint had already finished,
        copy in the EMA weights (``ema``) and finish. ``step`` None: the prepared module's step over
        ``gradient_accumulation`` micro-batches, each re-drawing the step's global noise and taking its own rows.
        ``before``: measured once on a fresh start (step 0, after resuming found nothing), its result returned;
        None on a resumed run."""
        if step is None:
            step = self.module_step
        self.resume()
        measured = before() if before is not None and self.step == 0 else None
        while self.running():
            step()
        if not self.done:
            if ema:
                self.use_ema()
            self.finish()
        return measured

    def module_step(self) -> None:
        """One optimizer step through the prepared module (``TrainedModules``), called as ``(step, micro, gen)``."""
        self.train_step(lambda micro: self.module(self.step, micro, self.generator()))

    # ---- steps -----------------------------------------------------------------------------------------------
    def running(self) -> bool:
        """True while steps remain; at ``stop_after`` saves and raises :class:`StageStopped`."""
        if self.done or self.step >= self.total:
            return False
        if self.stop_after is not None and self.step >= int(self.stop_after):
            self.save()
            raise StageStopped(f"[{self.stage}] stopped at step {self.step} of {self.total} (stop_after); "
                               f"run again without it to resume from {self.ckpt}")
        return True

    def generator(self, device="cpu") -> torch.Generator:
        """This step's generator; also re-seeds torch's global RNG (Gumbel noise draws from it)."""
        torch.manual_seed(step_generator(self.cfg, self.stage, self.step).initial_seed() + 1)
        return step_generator(self.cfg, self.stage, self.step, device)

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: ``batch_size`` per process x processes x ``gradient_accumulation``."""
        return self.batch_size * self.accelerator.num_processes * self.accumulation

    def rows(self, micro: int = 0) -> slice:
        """This process's rows of the step's global batch in micro-batch ``micro``: contiguous blocks of
        ``batch_size``, micro-batch-major, so 2 processes x batch b split exactly what 1 process x 2b computes."""
        start = (micro * self.accelerator.num_processes + self.accelerator.process_index) * self.batch_size
        return slice(start, start + self.batch_size)

    def train_step(self, compute: Callable[[int], Dict[str, torch.Tensor]]) -> None:
        """One optimizer step over ``gradient_accumulation`` micro-batches; ``compute(micro)`` returns this
        process's losses (``"loss"`` is optimised, the rest logged) and runs through the prepared module."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: Dict[str, torch.Tensor] = {}
        for micro in range(self.accumulation):
            # accumulate(): no gradient sync before the last micro-batch; backward() divides by the micro-batches
            with self.accelerator.accumulate(self.module) if self.module is not None else nullcontext():
                with self.accelerator.autocast():
                    out = compute(micro)
                self.accelerator.backward(out["loss"])
            for k, v in out.items():
                totals[k] = totals.get(k, 0.0) + v.detach().float() / self.accumulation
        names = sorted(totals)
        mean = self.accelerator.reduce(torch.stack([totals[k] for k in names]), reduction="mean")
        metrics = dict(zip(names, mean.tolist()))
        self._apply(metrics.pop("loss"), metrics)

    def update(self, loss: torch.Tensor, **metrics) -> None:
        """Backward, clip, step with the scheduled learning rate, EMA, log, checkpoint (one micro-batch)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        self._apply(loss.item(), metrics)

    def _apply(self, loss: float, metrics: dict) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = self.base_lr * lr_factor(self.step, self.total)
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            self.accelerator.clip_grad_norm_(list(self.params.values()), 1.0)  # sharded gradients
        else:  # whole, synchronised gradients: torch's own clip, bit for bit what one process computes
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), 1.0)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                decay = min(self.ema_decay, (1 + self.step) / (10 + self.step))
                for n, p in self.params.items():
                    self.ema[n].lerp_(p.detach(), 1 - decay)
        self.step += 1
        if not all(math.isfinite(float(v)) for v in metrics.values()) or not math.isfinite(loss):
            raise FloatingPointError(f"[{self.stage}] step {self.step}: non-finite loss {metrics}; "
                                     f"last good checkpoint: {self.ckpt}")
        every = int(self.cfg.get("log_every", 10))
        if self.step % every == 0 or self.step == self.total or self.step == 1:
            self.log(loss=loss, **metrics)
        sample_every = int(self.cfg.get("sample_every") or 0)
        if self.images is not None and sample_every and self.step % sample_every == 0 and self.accelerator.is_main_process:
            from .tracking import log_images

            log_images(self.accelerator, self.images(), self.step)
        if self.step % int(self.cfg.get("save_every", 100)) == 0 and self.step < self.total:
            self.save()

    def log(self, **metrics) -> None:
        """A row of ``log.jsonl`` and of the trackers (main process; metrics are already means over processes)."""
        if not self.accelerator.is_main_process:
            return
        row = {"step": self.step, "seconds": round(self.seconds, 1),
               "lr": self.optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in metrics.items()}}
        with open(os.path.join(self.dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=self.step)
        shown = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "seconds", "lr"))
        self.print(f"[{self.stage}] step {self.step}/{self.total} {shown} ({row['seconds']:.0f}s)")

    def finish(self) -> None:
        self.done = True
        self.save()
        for tracker in self.accelerator.trackers:  # not end_training(): it would end the process group too
            tracker.finish()

    def use_ema(self) -> None:
        """Copy the EMA weights into the live parameters (what gets exported)."""
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(self.ema[n])


def read_log(directory: str) -> list:
    path = os.path.join(directory, "log.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def named_trainable(prefix: str, module: torch.nn.Module, only: Optional[callable] = None) -> Dict[str, torch.nn.Parameter]:
    return {f"{prefix}.{n}": p for n, p in module.named_parameters() if only is None or only(n)}
