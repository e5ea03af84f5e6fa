"""Where a routed FLUX step's extra time goes, per layer type (``python -m benchmarks.flux_step_layers``).

Times each block of a FLUX.1-dev transformer at its real widths (24 heads of 128, T5 length 512, 512 px: 1024
image and 1024 reference tokens per subject, rank-128 LoRAs; 1 double + 2 single blocks, so it fits a CPU, of
which the double and the first single block are timed: the transformer's last block updates no router token, and
57 blocks hold only one last one) in one run, the modes alternating within every round:

- ``bare``: no subjects (diffusers' processor);
- ``reference only``: N subjects' cached reference keys seen by every image token (the router off);
- ``routed, fixed maps``: the routing of ``routed`` without the router (a fixed map splitting the image among
  the subjects), so it isolates the routed attention;
- ``routed``: our default, the router tokens' pass through the block and the block's routing map included;
- ``routed, dense``: the same with the dense masked attention (the form accelerators take);
- ``routed, redux step``: ``routed`` plus the subjects' 81 redux tokens each (the release's [0.1, 0.3) window).

From the minima it prints per layer type the ratio to ``bare`` and the split of the extra time into routed
attention (``routed, fixed maps`` - ``bare``) and router (``routed`` - ``routed, fixed maps``), and the ratio of a
whole step at FLUX.1-dev's 19 double + 38 single blocks (the blocks only, not the embedders around them).
The reference pass runs once per call and is not timed here (``benchmarks.run`` reports it apart).
``--in-mask f``: the share of each subject's reference tokens inside its mask (1: an unmasked image; the demo's
segmented examples: 0.42-0.62); the routed attention leaves the others out.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext
from unittest import mock

import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

import anystory.flux.attention_processor_flux as processor_module
from anystory.cli_options import add_subject_count
from anystory.flux.conditioning_flux import FluxConditioning
from anystory.flux.pipeline_flux import AnyStoryFluxPipeline
from anystory.flux.tiny_flux import SIGLIP_HIDDEN, random_released_state_dict, tiny_flux_components

from .flux import FLUX_TRANSFORMER, RELEASE_RANK

MODES = ("bare", "reference only", "routed, fixed maps", "routed", "routed, dense", "routed, redux step")
TEXT_LEN, REDUX_TOKENS, ROUTER_TOKENS = 512, 81, 9
FULL_DEPTH = (FLUX_TRANSFORMER["num_layers"], FLUX_TRANSFORMER["num_single_layers"])
aten = torch.ops.aten


def real_width_transformer_pipeline(double: int = 1, single: int = 2, config: dict | None = None):
    """AnyStory FLUX with a transformer of FLUX.1-dev's widths (or ``config``) and random released weights;
    the other components are the tiny ones (nothing here runs them)."""
    torch.manual_seed(0)
    config = config or {**FLUX_TRANSFORMER, "num_layers": double, "num_single_layers": single}
    transformer = FluxTransformer2DModel(**config).eval()
    pipe = AnyStoryFluxPipeline(**{**tiny_flux_components(), "transformer": transformer})
    text_dim = transformer.config.joint_attention_dim
    pipe.load_anystory_weights(random_released_state_dict(transformer, rank=RELEASE_RANK, std=0.01),
                               redux_base=ReduxImageEncoder(redux_dim=SIGLIP_HIDDEN, txt_in_features=text_dim))
    return pipe


def conditioning(pipe, n: int, grid: int, ref_grid: int, mode: str, in_mask: float = 1.0) -> FluxConditioning:
    """Random state fields of the real shapes (a step's cost depends on shapes, not values); ``in_mask`` of each
    subject's reference tokens inside its mask."""
    cfg = pipe.transformer.config
    ref_ids = pipe._prepare_latent_image_ids(1, ref_grid, ref_grid, "cpu", torch.float32)
    ref_ids[:, 2] -= ref_grid
    forced = None
    if mode == "routed, fixed maps":
        owner = torch.arange(grid * grid) * n // (grid * grid)  # the image split in n bands, one per subject
        forced = torch.nn.functional.one_hot(owner, n).T.float()
    on = (0, 1 << 20)
    tokens = ref_grid * ref_grid
    inside = torch.zeros(n, tokens, dtype=torch.bool)
    inside[:, torch.randperm(tokens, generator=torch.Generator().manual_seed(0))[:round(in_mask * tokens)]] = True
    return FluxConditioning(num_subjects=n, redux_tokens=torch.randn(1, n * REDUX_TOKENS, cfg.joint_attention_dim),
                router_tokens=torch.randn(1, n * ROUTER_TOKENS, cfg.joint_attention_dim),
                ref_latents=torch.randn(n, ref_grid * ref_grid, cfg.in_channels), ref_ids=ref_ids,
                ref_bias=torch.where(inside, 0.0, -100.0).flatten(), ref_mask=inside.flatten(), redux_window=on if mode == "routed, redux step" else (0, 0),
                ref_window=on, use_router=mode != "reference only", forced_maps=forced)


def attention_form(mode: str):
    """``routed, dense``: the dense masked attention even on a CPU; otherwise the processor's own choice."""
    return mock.patch.object(processor_module, "sparse_pays", lambda q: False) if mode == "routed, dense" \
        else nullcontext()


def capture_blocks(t, state, call: dict, blocks: dict) -> dict:
    """One transformer forward; per block, the arguments it got and the shared state as it entered it."""
    seen, handles = {}, []
    for kind, block in blocks.items():
        def grab(module, args, kwargs, kind=kind):
            seen[kind] = (args, kwargs, dict(vars(state)))
        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
    try:
        with torch.no_grad():
            t(**call)
    finally:
        for h in handles:
            h.remove()
    return seen


class WorkCounter(TorchDispatchMode):
    """Counts what a forward computes, whatever the machine's load: attention FLOPs (SDPA), matrix-product FLOPs,
    and the weight bytes read by matrix products of at most ``SMALL_ROWS`` rows (the router tokens' products,
    whose cost on a CPU is reading the weights, not the arithmetic)."""

    SMALL_ROWS = 64

    def __init__(self):
        super().__init__()
        self.attention = self.matmul = self.small_weight_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
                      aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_attention_math):
            q, k = args[0], args[1]
            self.attention += 4 * q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1]
        elif packet in (aten.mm, aten.addmm):
            a, w = (args[1], args[2]) if packet is aten.addmm else (args[0], args[1])
            self.matmul += 2 * a.shape[0] * a.shape[1] * w.shape[1]
            if a.shape[0] <= self.SMALL_ROWS:
                self.small_weight_bytes += w.numel() * w.element_size()
        elif packet is aten.bmm:
            a, b = args[0], args[1]
            self.matmul += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        return func(*args, **kwargs)


def _captured(pipe, subjects: int, grid: int, ref_grid: int, text_len: int, modes, in_mask: float = 1.0):
    """Per mode and block type, the block's inputs and the shared state as it entered it (one forward per mode)."""
    t, state = pipe.transformer, pipe.anystory_state
    g = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(1, grid * grid, t.config.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text_len, t.config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, t.config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([0.7]), guidance=torch.tensor([3.5]),
                img_ids=pipe._prepare_latent_image_ids(1, grid, grid, "cpu", torch.float32),
                txt_ids=torch.zeros(text_len, 3), return_dict=False)
    blocks = {"double": t.transformer_blocks[0], "single": t.single_transformer_blocks[0]}
    inputs = {}
    for mode in modes:  # the reference pass runs once per mode (once per call in a pipeline), its cache is kept
        if mode != "bare":
            pipe.start_anystory_call(conditioning(pipe, subjects, grid, ref_grid, mode, in_mask))
        with attention_form(mode):
            inputs[mode] = capture_blocks(t, state, call, blocks)
        pipe.start_anystory_call()
    return blocks, inputs


def count(subjects: int = 2, grid: int = 32, ref_grid: int = 32, pipe=None, text_len: int = TEXT_LEN,
          modes=MODES, in_mask: float = 1.0) -> pd.DataFrame:
    """Per block type and mode, what one forward of the block computes (:class:`WorkCounter`), and its ratio to
    ``bare``: a breakdown that the machine's load does not move (times do)."""
    pipe = pipe or real_width_transformer_pipeline()
    state = pipe.anystory_state
    blocks, inputs = _captured(pipe, subjects, grid, ref_grid, text_len, modes, in_mask)
    rows = []
    try:
        for kind, block in blocks.items():
            for mode in modes:
                args, kwargs, snapshot = inputs[mode][kind]
                vars(state).update(snapshot)
                with torch.no_grad(), attention_form(mode), WorkCounter() as work:
                    block(*args, **kwargs)
                rows.append({"block": kind, "mode": mode, "attention_gflop": work.attention / 1e9,
                             "matmul_gflop": work.matmul / 1e9, "small_matmul_weights_mb": work.small_weight_bytes / 2**20})
    finally:
        pipe.start_anystory_call()
    table = pd.DataFrame(rows)
    bare = table[table["mode"] == "bare"].set_index("block")
    for column in ("attention_gflop", "matmul_gflop"):
        table[column.replace("_gflop", "_ratio")] = table[column] / table["block"].map(bare[column])
    return table


def run(subjects: int = 2, repeats: int = 5, grid: int = 32, ref_grid: int = 32, pipe=None,
        text_len: int = TEXT_LEN, modes=MODES, in_mask: float = 1.0) -> pd.DataFrame:
    """``grid`` / ``ref_grid``: image / reference tokens per side (32: 512 px on FLUX.1-dev).

    Each block is re-run on its captured inputs (a few seconds per timing, so the modes alternate quickly), after
    one warm-up round; per mode and block the minimum over ``repeats`` rounds (on a shared machine other processes
    only ever add time)."""
    pipe = pipe or real_width_transformer_pipeline()
    state = pipe.anystory_state
    blocks, inputs = _captured(pipe, subjects, grid, ref_grid, text_len, modes, in_mask)
    times = {(mode, kind): [] for mode in modes for kind in blocks}
    try:
        for r in range(repeats + 1):  # round 0 warms up
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                for kind, block in blocks.items():
                    args, kwargs, snapshot = inputs[mode][kind]
                    vars(state).update(snapshot)
                    with torch.no_grad(), attention_form(mode):
                        start = time.perf_counter()
                        block(*args, **kwargs)
                        elapsed = time.perf_counter() - start
                    if r:
                        times[(mode, kind)].append(elapsed)
    finally:
        pipe.start_anystory_call()
    rows = []
    for kind in blocks:
        base = min(times[("bare", kind)])
        for mode in modes:
            best = min(times[(mode, kind)])
            rows.append({"block": kind, "mode": mode, "subjects": 0 if mode == "bare" else subjects,
                         "ms": 1000 * best, "ratio": best / base,
                         "median_ms": 1000 * statistics.median(times[(mode, kind)])})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> list:
    """Lines: per layer type, the extra time of ``routed`` split into attention and router; the full-depth step."""
    ms = table.set_index(["block", "mode"])["ms"]
    lines, full = [], {}
    for kind in ("double", "single"):
        bare, fixed, routed = (ms[(kind, m)] for m in ("bare", "routed, fixed maps", "routed"))
        full[kind] = (bare, routed)
        lines.append(f"{kind} block: routed {routed / bare:.3f}x bare ({routed - bare:+.0f} ms of {bare:.0f}): "
                     f"routed attention {fixed - bare:+.0f} ms, router tokens + map {routed - fixed:+.0f} ms")
    bare = FULL_DEPTH[0] * full["double"][0] + FULL_DEPTH[1] * full["single"][0]
    ours = FULL_DEPTH[0] * full["double"][1] + FULL_DEPTH[1] * full["single"][1]
    lines.append(f"FLUX.1-dev's 19 double + 38 single blocks, routed: {ours / bare:.3f}x bare")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flux_step_layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_count(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default=";".join(MODES),
                   help="modes to run, separated by ';' (their names hold commas); the summary needs bare, "
                        "'routed, fixed maps' and routed")
    p.add_argument("--count", action="store_true",
                   help="count each block's work per mode (attention and matrix-product FLOPs, weights read by the "
                        "router's few-row products) instead of timing it: independent of the machine's load")
    p.add_argument("--in-mask", type=float, default=1.0,
                   help="share of each subject's reference tokens inside its mask, in (0, 1] (default 1: unmasked)")
    args = p.parse_args(argv)
    if not 0 < args.in_mask <= 1:
        p.error(f"--in-mask must be in (0, 1], got {args.in_mask}")
    modes = tuple(m.strip() for m in args.modes.split(";") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or "bare" not in modes:
        p.error(f"--modes: bare and some of {MODES}, got {args.modes!r}")
    table = (count(args.subjects, modes=modes, in_mask=args.in_mask) if args.count
             else run(args.subjects, args.repeats, modes=modes, in_mask=args.in_mask))
    with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    if not args.count and {"routed, fixed maps", "routed"} <= set(modes):
        print("\n".join(summary(table)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
