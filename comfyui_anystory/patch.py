"""What the apply node adds to a ComfyUI FLUX MODEL: a diffusion-model wrapper and one replacement per block.

The wrapper (``WrappersMP.DIFFUSION_MODEL``) sees each model evaluation: it finds the step in the run's sigmas,
decides the step's plan (the diffusers pipeline's schedule, ``AnyStoryFluxState.plan_for``), runs the reference
pass when the reference first acts, appends the redux tokens to the text, embeds the router tokens, and hands the
state to the blocks through ``transformer_options``. A block replacement (``patches_replace["dit"]``) runs
AnyStory's block (``blocks.py``) in steps where the reference or the router acts, and ComfyUI's own block
otherwise, so with no subject, and outside sampling, the patched model is ComfyUI's to the bit.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import comfy.patcher_extension

from anystory.flux.conditioning_flux import AnyStoryFluxState

from .blocks import double_block, single_block
from .conditioning import Settings, SubjectSet, run_conditioning
from .reference import reference_pass
from .weights import FluxAnyStoryWeights

STATE_KEY = "anystory_state"
PATCH_KEY = "anystory_patch"


def step_index(sample_sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """The step whose interval ``[sigmas[i], sigmas[i+1])`` holds ``sigma`` (a sampler's midpoints included)."""
    now = float(sigma.flatten()[0])
    later = sample_sigmas[:-1].float().cpu() >= now - 1e-5 * max(abs(now), 1.0)
    return max(int(later.sum()) - 1, 0)


class AnyStoryFluxPatch:
    """One apply node's subjects and weights on one model; shared (never deep-copied) by the model's clones."""

    def __init__(self, weights: FluxAnyStoryWeights, subjects: SubjectSet, settings: Settings):
        self.weights, self.subjects, self.settings = weights, subjects, settings.check()
        self.state = AnyStoryFluxState()
        self.maps: List[torch.Tensor] = []  # per step of the last run: [b, N+1, h, w] routing shares
        self.grid: Optional[Tuple[int, int]] = None
        self._run = None
        self._refs: list = []

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; the run state must stay one object

    # ---- installing --------------------------------------------------------------------------------------------
    def apply_to(self, model_patcher):
        m = model_patcher.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PATCH_KEY, self.wrapper)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, PATCH_KEY, self.new_run)
        unet = m.model.model_config.unet_config
        for i in range(unet["depth"]):
            m.set_model_patch_replace(functools.partial(self.double, i), "dit", "double_block", i)
        for j in range(unet["depth_single_blocks"]):
            m.set_model_patch_replace(functools.partial(self.single, j), "dit", "single_block", j)
        m.model_options["transformer_options"][PATCH_KEY] = self
        return m

    # ---- per evaluation ----------------------------------------------------------------------------------------
    def new_run(self, model_patcher=None) -> None:
        """A sampling run starts (ComfyUI's pre-run callback): its first evaluation starts the run's state, so
        neither the reference cache nor the routing maps carry over from an earlier run."""
        self._run = None

    def _start_run(self, sample_sigmas: torch.Tensor, grid: Tuple[int, int]) -> None:
        key = (sample_sigmas.data_ptr(), tuple(sample_sigmas.shape), grid)
        if key != self._run:
            self._run, self._refs, self.maps, self.grid = key, [], [], grid
            steps = sample_sigmas.shape[0] - 1
            self.state.start(run_conditioning(self.subjects, self.settings, steps, grid))

    def _reference(self, model, y, guidance, dtype, device) -> None:
        state = self.state
        for seen_y, seen_g, kv, index in self._refs:
            if torch.equal(seen_y, y) and (seen_g is None) == (guidance is None) and (
                    guidance is None or torch.equal(seen_g, guidance)):
                state.ref_kv, state.ref_index = kv, index
                return
        reference_pass(model, state, self.weights.ref, y, guidance, dtype, device)
        self._refs.append((y, guidance, state.ref_kv, state.ref_index))

    def wrapper(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options={}, **kwargs):
        sample_sigmas, sigma = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
        if not self.subjects.subjects or sample_sigmas is None or sigma is None:
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        if ref_latents is not None:
            raise ValueError("AnyStory cannot run with reference latents (Kontext-style ReferenceLatent) on the same "
                             "model: both append image tokens the other does not expect")
        if kwargs.get("attention_mask") is not None:
            raise ValueError("AnyStory cannot run with an attention mask on the conditioning (e.g. 'Apply Style "
                             "Model' with strength_type attn_bias): its blocks would have to drop that mask")
        model = executor.class_obj
        patch = model.patch_size
        grid = ((x.shape[-2] + patch // 2) // patch, (x.shape[-1] + patch // 2) // patch)
        self._start_run(sample_sigmas, grid)
        state = self.state
        state._forward_reset()
        state.plan = plan = state.plan_for(step_index(sample_sigmas, sigma))
        state.batch, state.img_len, state.txt_len = x.shape[0], grid[0] * grid[1], context.shape[1]
        state.diffusion_blocks = (model.double_blocks, model.single_blocks)
        if plan.any:
            b = x.shape[0]
            if plan.ref:
                self._reference(model, y, guidance, x.dtype, x.device)
            if plan.redux:
                redux = state.redux_tokens.to(device=context.device, dtype=context.dtype).expand(b, -1, -1)
                context = torch.cat([context, redux], dim=1)
                state.redux_len = redux.shape[1]
                state.txt_len += state.redux_len
            if plan.route:
                tokens = state.router_tokens.to(device=x.device, dtype=x.dtype).expand(b, -1, -1)
                state.router_hidden = self.weights.router("txt_in", model.txt_in, tokens)
            transformer_options = {**transformer_options, STATE_KEY: state}
        out = executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        maps = state.take_step_maps(grid)
        if maps is not None:
            self.maps.append(maps)
        return out

    # ---- block replacements ------------------------------------------------------------------------------------
    @staticmethod
    def _acting(args) -> Optional[AnyStoryFluxState]:
        state = (args.get("transformer_options") or {}).get(STATE_KEY)
        if state is None or state.in_ref_pass or state.plan is None or not (state.plan.ref or state.plan.route):
            return None
        return state

    def double(self, index: int, args, extra):
        state = self._acting(args)
        if state is None:
            return extra["original_block"](args)
        block = state.diffusion_blocks[0][index]
        img, txt = double_block(block, index, args["img"], args["txt"], args["vec"], args["pe"], state, self.weights)
        return {"img": img, "txt": txt}

    def single(self, index: int, args, extra):
        state = self._acting(args)
        if state is None:
            return extra["original_block"](args)
        doubles, singles = state.diffusion_blocks
        layer = len(doubles) + index
        img = single_block(singles[index], index, layer, args["img"], args["vec"], args["pe"], state, self.weights,
                           last=index == len(singles) - 1)
        return {"img": img}
