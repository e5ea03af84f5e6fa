"""Per-call AnyStory conditioning for an unmodified ``FluxTransformer2DModel``, fed through forward hooks.

A pre-hook on the transformer decides, for the current denoising step, which conditions are on (the
authors' schedule: redux tokens in ``[redux_start, redux_end)``, reference from ``ref_start`` to the end,
router whenever either is on and there are >= 2 subjects). When redux is on it appends the subjects' redux
tokens to the text tokens (position ids 0, like text). When the reference is first needed it runs the
reference pass: the same transformer, once, over every subject's reference latents (one batch row per
subject, so each subject attends only to itself), at timestep 0 with the ``anystory_ref`` adapter active and
no text; the processors keep each layer's reference keys/values, which every later step reuses. In a routed
step a hook on each block's modulation linear (the context side's) keeps its input and output, which the router
tokens reuse (``router_flux``).

Nothing here changes the transformer's code; with no subjects the hooks return at once and the processors
defer to diffusers' ``FluxAttnProcessor``.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..attention_layout import flux_blocks
from .adapter_scope import REF_ADAPTER, ROUTER_ADAPTER, adapter_scope
from .routed_attention_flux import ReferenceColumns, kept_columns, reference_columns


@dataclass(frozen=True)
class StepPlan:
    redux: bool
    ref: bool
    route: bool

    @property
    def any(self) -> bool:
        return self.redux or self.ref


def step_window(num_steps: int, start_at: float, end_at: float) -> Tuple[int, int]:
    """The authors' rounding of schedule fractions to step indices: ``[int(T*start+0.5), int(T*end+0.5))``."""
    return int(num_steps * start_at + 0.5), int(num_steps * end_at + 0.5)


def distinct_rows(pooled: torch.Tensor) -> Tuple[List[torch.Tensor], List[int]]:
    """Rows of the batch that share a prompt share the reference features, computed once: the distinct pooled
    rows, and each batch row's index among them."""
    distinct, index = [], []
    for row in pooled:
        for j, seen in enumerate(distinct):
            if torch.equal(row, seen):
                index.append(j)
                break
        else:
            distinct.append(row)
            index.append(len(distinct) - 1)
    return distinct, index


@dataclass(frozen=True)
class FluxConditioning:
    """One call's subjects as the hooks and processors use them (``AnyStoryFluxPipeline.conditioning_inputs``
    builds it, :meth:`AnyStoryFluxState.start` hands it to them)."""

    num_subjects: int
    redux_tokens: torch.Tensor  # [1, N*t, C] already scaled
    router_tokens: torch.Tensor  # [1, N*r, C]
    ref_latents: torch.Tensor  # [N, R, c] packed latents
    ref_ids: torch.Tensor  # [R, 3]
    ref_bias: torch.Tensor  # [N*R] additive logit bias of the reference columns
    ref_mask: Optional[torch.Tensor] = None  # [N*R] bool: the reference token is inside its subject's mask
    redux_window: Tuple[int, int] = (0, 0)  # steps [start, end) with the redux tokens
    ref_window: Tuple[int, int] = (0, 0)  # steps [start, end) with the reference
    use_router: bool = False
    forced_maps: Optional[torch.Tensor] = None  # [N, I] 0/1 at the image-token grid (a routing override)
    closed_regions: Optional[torch.Tensor] = None  # [1, N, I] bool: where a subject's region forbids it
    confine: bool = False  # confine_subjects
    record_maps: bool = False


class AnyStoryFluxState:
    """What the hooks and attention processors share during one pipeline call: the call's
    :class:`FluxConditioning` (its fields readable here by name) and what the forwards write (the step's plan,
    token counts, cached reference keys/values, the router tokens, recorded maps)."""

    def __init__(self):
        self.transformer = None
        self.ref_layers: list = []
        self.router_input_layers: list = []
        self._handles: list = []
        self.clear()
        self.ref_passes = 0
        self.ref_kv_writes = 0

    # ---- per call ----------------------------------------------------------------------------------------------
    def clear(self) -> None:
        self.active = False
        self.conditioning: Optional[FluxConditioning] = None
        self.num_subjects = 0
        self.redux_tokens: Optional[torch.Tensor] = None  # [1, N*t, C] already scaled
        self.router_tokens: Optional[torch.Tensor] = None  # [1, N*r, C]
        self.ref_latents: Optional[torch.Tensor] = None  # [N, R, c] packed latents
        self.ref_ids: Optional[torch.Tensor] = None  # [R, 3]
        self.ref_bias: Optional[torch.Tensor] = None  # [N*R] additive logit bias of the reference columns
        self.ref_mask: Optional[torch.Tensor] = None  # [N*R] bool: inside the subject's mask
        self.ref_kept = None  # per subject, its in-mask reference columns (``routed_attention_flux.kept_columns``)
        self.redux_window = (0, 0)
        self.ref_window = (0, 0)
        self.use_router = False
        self.forced_maps: Optional[torch.Tensor] = None  # [N, I] 0/1 at the image-token grid
        self.closed_regions: Optional[torch.Tensor] = None  # [1, N, I] bool: where a subject's region forbids it
        self.confine = False
        self.record_maps = False
        self.router_logits: Optional[list] = None  # a list: every routed block appends its logits (training)
        self.step = 0
        self.ref_kv: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.ref_columns: Dict[int, ReferenceColumns] = {}  # layer -> its cached keys laid out for the sparse form
        self.ref_index: Optional[torch.Tensor] = None
        self.in_ref_pass = False
        self.ref_group = 0  # subjects in the running reference pass
        self._ref_parts: Dict[int, list] = {}
        self._forward_reset()

    def _forward_reset(self) -> None:
        self.plan: Optional[StepPlan] = None
        self.batch = 0
        self.txt_len = self.redux_len = self.img_len = 0
        self.modulation: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (silu(temb), its linear's output)
        self.router_hidden = None
        self.layer_maps: List[torch.Tensor] = []

    def start(self, conditioning: FluxConditioning) -> None:
        self.clear()
        self.conditioning = conditioning
        for f in dataclasses.fields(conditioning):
            setattr(self, f.name, getattr(conditioning, f.name))
        if self.ref_mask is not None:
            self.ref_kept = kept_columns(self.ref_mask, self.num_subjects)
        self.active = True

    def plan_for(self, step: int) -> StepPlan:
        redux = self.redux_window[0] <= step < self.redux_window[1]
        ref = self.ref_window[0] <= step < self.ref_window[1]
        route = (redux or ref) and (self.forced_maps is not None or self.use_router)
        return StepPlan(redux, ref, route)

    # ---- hooks -------------------------------------------------------------------------------------------------
    def attach(self, transformer) -> None:
        self.detach()
        self.transformer = transformer
        self._signature = inspect.signature(type(transformer).forward)
        self._handles.append(transformer.register_forward_pre_hook(self._on_transformer, with_kwargs=True))
        for layer_id, block in enumerate(flux_blocks(transformer)):
            linear = block.norm1_context.linear if hasattr(block, "norm1_context") else block.norm.linear
            self._handles.append(linear.register_forward_hook(functools.partial(self._on_modulation, layer_id)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_modulation(self, layer_id: int, module, args, output) -> None:
        if self.active and not self.in_ref_pass and self.plan is not None and self.plan.route:
            self.modulation[layer_id] = (args[0], output)

    def _on_transformer(self, module, args, kwargs):
        if not self.active or self.in_ref_pass:
            return None
        if args:
            kwargs = dict(self._signature.bind(module, *args, **kwargs).arguments)
            kwargs.pop("self", None)
        self._forward_reset()
        self.plan = plan = self.plan_for(self.step)
        hidden = kwargs["hidden_states"]
        self.batch, self.img_len = hidden.shape[0], hidden.shape[1]
        text = kwargs["encoder_hidden_states"]
        self.txt_len = text.shape[1]
        if not plan.any:
            return (), kwargs
        if plan.ref and not self.ref_kv:
            self._reference_pass(module, kwargs)
        if plan.redux:
            tokens = self.redux_tokens.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)
            txt_ids = kwargs["txt_ids"]
            txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
            kwargs["encoder_hidden_states"] = torch.cat([text, tokens], dim=1)
            kwargs["txt_ids"] = torch.cat([txt_ids, txt_ids.new_zeros(tokens.shape[1], 3)], dim=0)
            self.redux_len = tokens.shape[1]
            self.txt_len += self.redux_len
        return (), kwargs

    # ---- reference pass ----------------------------------------------------------------------------------------
    def _reference_pass(self, transformer, kwargs) -> None:
        """Run the transformer once over the references; processors store each layer's keys/values."""
        pooled = kwargs["pooled_projections"]
        guidance = kwargs.get("guidance")
        distinct, index = distinct_rows(pooled)
        u, n = len(distinct), self.num_subjects
        hidden = kwargs["hidden_states"]
        text_dim = transformer.config.joint_attention_dim
        # all subjects in one batch, as the release; under confine_subjects one pass per subject, so a subject's
        # keys/values carry no float noise from the others' batch
        groups = [[i] for i in range(n)] if self.confine else [list(range(n))]
        self._ref_parts = {}
        self.in_ref_pass = True
        try:
            for group in groups:
                self.ref_group = len(group)
                latents = self.ref_latents[group].to(device=hidden.device, dtype=hidden.dtype).repeat(u, 1, 1)
                rows = u * len(group)  # latents: [u*g, R, c]
                with adapter_scope(self.ref_layers, REF_ADAPTER):
                    transformer(
                        hidden_states=latents,
                        encoder_hidden_states=latents.new_zeros(rows, 0, text_dim),
                        pooled_projections=torch.stack(distinct).repeat_interleave(len(group), dim=0),
                        timestep=latents.new_zeros(rows),
                        img_ids=self.ref_ids.to(device=hidden.device),
                        txt_ids=self.ref_ids.new_zeros(0, 3).to(device=hidden.device),
                        guidance=None if guidance is None else guidance[:1].expand(rows),
                        return_dict=False,
                    )
        finally:
            self.in_ref_pass = False
        self.end_reference(index, hidden.device)

    def end_reference(self, index: List[int], device) -> None:
        """Join the groups' stored keys/values per layer; ``index``: each batch row's distinct-prompt row."""
        self.ref_columns = {}
        self.ref_kv = {layer: (torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1))
                       for layer, parts in self._ref_parts.items()}
        self._ref_parts = {}
        self.ref_index = torch.tensor(index, device=device)
        self.ref_passes += 1

    def store_ref_kv(self, layer_id: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """key/value: ``[u*g, R, h, d]`` from a reference pass over a group of g subjects -> ``[u, g*R, h, d]``,
        joined with the other groups' into ``[u, N*R, h, d]`` when the pass ends."""
        g = self.ref_group
        self._ref_parts.setdefault(layer_id, []).append(
            (key.unflatten(0, (-1, g)).flatten(1, 2), value.unflatten(0, (-1, g)).flatten(1, 2)))
        self.ref_kv_writes += 1

    def ref_kv_for(self, layer_id: int, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
        key, value = self.ref_kv[layer_id]
        if key.shape[0] == 1:
            return key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        return key[self.ref_index], value[self.ref_index]

    def ref_columns_for(self, layer_id: int, batch: int, dtype) -> ReferenceColumns:
        """The layer's cached reference keys/values as the sparse routed attention reads them (only the columns
        that can take softmax mass, contiguous per head), laid out on first use and kept for the call's steps."""
        layout = self.ref_columns.get(layer_id)
        if layout is None or layout.keys.dtype != dtype:
            key, value = (x.to(dtype) for x in self.ref_kv[layer_id])
            layout = self.ref_columns[layer_id] = reference_columns(
                key, value, self.ref_bias.to(device=key.device, dtype=dtype), self.ref_kept, self.num_subjects)
        return layout.rows(None if layout.keys.shape[0] == 1 else self.ref_index, batch)

    # ---- router tokens -----------------------------------------------------------------------------------------
    def router_input(self, dtype) -> torch.Tensor:
        """Router tokens entering the first block of this forward (``context_embedder`` + router LoRA)."""
        if self.router_hidden is None:
            tokens = self.router_tokens.to(dtype=dtype).expand(self.batch, -1, -1)
            with adapter_scope(self.router_input_layers, ROUTER_ADAPTER):
                self.router_hidden = self.transformer.context_embedder(tokens)
        return self.router_hidden

    # ---- routing maps ------------------------------------------------------------------------------------------
    def record(self, maps: torch.Tensor) -> None:
        if self.record_maps:
            self.layer_maps.append(maps.detach().float())

    def take_step_maps(self, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
        """``[b, N+1, h, w]``: per subject, the share of layers in which each image token could attend to it
        (channel N: to none). Steps without a router: every subject everywhere, or (conditions off) none."""
        plan, n, b = self.plan, self.num_subjects, self.batch
        if plan is None or n == 0:
            return None
        tokens = grid[0] * grid[1]
        if self.layer_maps:
            subj = torch.stack(self.layer_maps).mean(dim=0).cpu()
            background = (1.0 - subj.sum(dim=1, keepdim=True)).clamp(min=0.0)
        elif plan.any:
            subj, background = torch.ones(b, n, tokens), torch.zeros(b, 1, tokens)
        else:
            subj, background = torch.zeros(b, n, tokens), torch.ones(b, 1, tokens)
        self.layer_maps = []
        return torch.cat([subj, background], dim=1).unflatten(2, grid)
