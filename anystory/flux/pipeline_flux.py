"""``AnyStoryFluxPipeline``: FLUX.1-dev with the authors' released AnyStory weights, diffusers-native.

diffusers' ``FluxPipeline`` plus three optional components (SigLIP ``image_encoder`` / ``feature_extractor``
from FLUX.1-Redux-dev, and the ``redux_embedder`` / ``router_embedder`` of the release), two PEFT adapters on
the transformer (``anystory_ref``, ``anystory_router``) and one attention processor per block. ``__call__``
validates and encodes the subjects, hands them to the hooks/processors (``conditioning_flux``), and runs the
parent's denoising loop unchanged. With no subjects the output is ``FluxPipeline``'s own.

Per subject (as the release): the segmented square crop is (a) masked and encoded by SigLIP at its
resolution, then pooled by the gated Redux projection to 9x9 = 81 text-space tokens (x ``redux_scale`` x
``Subject.scale``, on in ``[redux_start_at, redux_end_at)`` of the schedule) and to 3x3 = 9 router tokens;
(b) masked, resized to ``reference_size`` (512) and VAE-encoded; its packed latents form the reference stream,
placed left of the image in RoPE (columns shifted by the reference width), with reference tokens outside the
mask biased by -100. Reference keys/values are computed once per call and reused. With >= 2 subjects the
router picks, per block and image token, the one subject whose redux/reference tokens that token may see.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Union

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

from ..attention_layout import flux_blocks
from ..errors import InvalidInputError, check_number
from ..hub import FLUX_BASE as DEFAULT_FLUX
from ..hub import FLUX_REDUX as DEFAULT_REDUX
from ..pipeline_mixin import AnyStoryPipelineMixin, AnyStoryPipelineOutput
from ..presets import FLUX
from ..regions import closed_at_grid, routing_regions
from ..subjects import MAX_SUBJECTS, PreparedSubject, Segmenter, Subject
from .adapter_scope import ANYSTORY_ADAPTERS, REF_ADAPTER, ROUTER_ADAPTER, deactivate_anystory_adapters, \
    layers_with_adapter
from .attention_processor_flux import AnyStoryFluxAttnProcessor
from .conditioning_flux import AnyStoryFluxState, FluxConditioning, step_window
from .low_vram import quantization_config
from .redux import AnyStoryReduxEncoder, released_embedder
from .router_flux import RouterModules
from .release_inputs import encoder_mask_values, prepare_release_subjects
from .weights_flux import RELEASE_FILENAME, RELEASE_REPO, FluxAnyStorySnapshot, block_names, read_released_file, \
    resolve_released_state_dict

REDUX_GRID = 9  # 9x9 = 81 redux tokens per subject
ROUTER_GRID = 3  # 3x3 = 9 router tokens per subject
MULTI_SUBJECT_REF_START = 0.09  # the authors' demo starts the reference later when routing several subjects
REFERENCE_NOISE = ("call", "release")


#: The output class both pipelines return (kept by this name for FLUX callers).
AnyStoryFluxPipelineOutput = AnyStoryPipelineOutput


class AnyStoryFluxPipeline(AnyStoryPipelineMixin, FluxPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->image_encoder->redux_embedder->router_embedder->transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor", "redux_embedder", "router_embedder"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None, redux_embedder: Optional[AnyStoryReduxEncoder] = None,
                 router_embedder: Optional[AnyStoryReduxEncoder] = None, segmenter: Optional[Segmenter] = None,
                 reference_size: int = 512):
        super().__init__(scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                         image_encoder, feature_extractor)
        self.register_modules(redux_embedder=redux_embedder, router_embedder=router_embedder)
        self.segmenter = segmenter
        self.reference_size = reference_size
        self._anystory = AnyStoryFluxState()
        self._routing_override: Optional[torch.Tensor] = None

    @property
    def max_subjects(self) -> int:
        return MAX_SUBJECTS

    @property
    def anystory_loaded(self) -> bool:
        return self._anystory.transformer is not None

    @property
    def _anystory_denoiser(self):
        return self.transformer

    def _remove_anystory_modules(self) -> None:
        """Hooks, PEFT adapters and embedders go; the user's own LoRAs stay."""
        self._anystory.detach()
        self._anystory = AnyStoryFluxState()
        loaded = [a for a in ANYSTORY_ADAPTERS if a in getattr(self.transformer, "peft_config", {})]
        if loaded:
            self.transformer.delete_adapters(loaded)
        self.register_modules(redux_embedder=None, router_embedder=None)

    @property
    def anystory_state(self) -> AnyStoryFluxState:
        """The call state the hooks and processors share: ``.conditioning`` (the running call's immutable
        ``FluxConditioning``, None between calls) and what the forwards write; counters ``ref_passes`` /
        ``ref_kv_writes`` for benchmarks and tests."""
        return self._anystory

    def start_anystory_call(self, conditioning: Optional[FluxConditioning] = None) -> AnyStoryFluxState:
        """The call state started for ``conditioning`` (None: cleared, nothing conditioned); the hooks and
        processors hold this one state object, so starting refills it."""
        if conditioning is None:
            self._anystory.clear()
        else:
            self._anystory.start(conditioning)
        return self._anystory

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_released(cls, flux: str = DEFAULT_FLUX, redux: str = DEFAULT_REDUX, anystory: str = RELEASE_REPO,
                      torch_dtype: torch.dtype = torch.bfloat16, quantization: str = "none",
                      **kwargs) -> "AnyStoryFluxPipeline":
        """FLUX.1-dev + FLUX.1-Redux-dev's SigLIP and image embedder + ``anystory_flux.bin`` (hub ids or local
        paths), as the authors' demo loads them. ``quantization``: ``"none"``, ``"int8"`` (torchao),
        ``"bnb-8bit"`` or ``"bnb-4bit"`` (CUDA) for the transformer and T5, the AnyStory LoRAs on top (see
        ``low_vram``). ``kwargs`` go to ``from_pretrained`` of the FLUX pipeline."""
        from transformers import SiglipImageProcessor, SiglipVisionModel

        config = quantization_config(quantization, torch_dtype)
        if config is not None:
            kwargs["quantization_config"] = config
        encoder = SiglipVisionModel.from_pretrained(redux, subfolder="image_encoder", dtype=torch_dtype)
        size = encoder.config.image_size
        pipe = cls.from_pretrained(flux, image_encoder=encoder, dtype=torch_dtype,
                                   feature_extractor=SiglipImageProcessor(size={"height": size, "width": size}),
                                   **kwargs)
        pipe.load_anystory_weights(anystory, redux_base=redux)
        return pipe

    def _redux_base(self, source) -> dict:
        """``redux_up`` / ``redux_down`` of FLUX.1-Redux-dev's ``image_embedder``, which the release builds on."""
        if isinstance(source, torch.nn.Module):
            sd = source.state_dict()
        elif source is None or (self.redux_embedder is not None and source == DEFAULT_REDUX):
            if self.redux_embedder is None:
                raise ValueError("the released 'redux' group has no redux_up/redux_down weights: pass redux_base "
                                 f"(FLUX.1-Redux-dev, e.g. '{DEFAULT_REDUX}', or its ReduxImageEncoder)")
            sd = self.redux_embedder.state_dict()
        else:
            sd = ReduxImageEncoder.from_pretrained(source, subfolder="image_embedder").state_dict()
        return {k: v for k, v in sd.items() if k.split(".")[0] in ("redux_up", "redux_down")}

    def load_anystory_weights(self, weights: Union[str, dict] = RELEASE_REPO, redux_base=DEFAULT_REDUX,
                              filename: str = RELEASE_FILENAME, **hub_kwargs) -> None:
        """Load the authors' release: a path to ``anystory_flux.bin``, a folder holding it, a hub repo id, or the
        already-loaded dict. The file is checked against the released layout first (``weights_flux``); a
        mismatch raises ``AnyStoryWeightsError`` naming the keys.

        ``redux_base``: FLUX.1-Redux-dev (hub id / folder, or its ``ReduxImageEncoder``) for the Redux projection
        the release adds to; not needed when this pipeline already has a ``redux_embedder``.

        Every file the release's loader accepts loads here with the same meaning (see ``weights_flux``): keys it
        ignores are dropped with an ``AnyStoryWeightsWarning`` listing them, keys it needs are required.

        Built first, swapped after: the embedders and processors are built before the pipeline is touched, and
        if the swap itself fails (an adapter that does not load, a device move), the AnyStory the pipeline had
        before (or none) is put back: a failed load leaves the pipeline as it was."""
        state = weights if isinstance(weights, dict) else read_released_file(weights, filename, **hub_kwargs)
        if self.image_encoder is None or self.feature_extractor is None:
            raise ValueError("AnyStory FLUX needs the SigLIP image_encoder and feature_extractor of FLUX.1-Redux-dev "
                             "(SiglipVisionModel / SiglipImageProcessor): pass them to the pipeline first")
        released = resolve_released_state_dict(state, self.transformer, self.image_encoder.config.hidden_size)
        self._refuse_beside_ip_adapter()
        built = self._build_anystory(released, redux_base)
        before = FluxAnyStorySnapshot.take(self)
        try:
            self._swap_in_anystory(released, built)
        except BaseException:
            before.restore(self)
            raise

    def _build_anystory(self, released, redux_base) -> dict:
        """The new embedders and attention processors, on the transformer's device and dtype; the pipeline is not
        touched."""
        transformer = self.transformer
        dtype, device = transformer.dtype, transformer.device
        base_cache = {}

        def base():
            if "sd" not in base_cache:
                base_cache["sd"] = self._redux_base(redux_base)
            return base_cache["sd"]

        embedders = {"redux_embedder": released_embedder(released.redux, REDUX_GRID, base),
                     "router_embedder": released_embedder(released.router_embedder, ROUTER_GRID, base)}
        for embedder in embedders.values():
            # torch's own ``to``: ModelMixin.to warns about fp32-kept modules, and these have none
            torch.nn.Module.to(embedder, device=device, dtype=dtype)
        hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        processors = []
        for layer_id, name in enumerate(block_names(transformer)):
            prefix = f"transformer.{name}.attn.processor."
            sd = {k[len(prefix):]: v for k, v in released.processors.items() if k.startswith(prefix)}
            proc = AnyStoryFluxAttnProcessor(hidden, sd["to_q_routing_map_lora_A.weight"].shape[0], True, layer_id)
            proc.load_state_dict(sd, strict=True)
            processors.append(proc.to(device=device, dtype=dtype))
        return {"embedders": {k: v.eval() for k, v in embedders.items()}, "processors": processors}

    def _swap_in_anystory(self, released, built: dict) -> None:
        """Replace whatever AnyStory the transformer has with the built one: adapters, processors, hooks."""
        self._before_attach()
        offload_device = getattr(self, "_offload_device", None) if getattr(self, "_all_hooks", None) else None
        if offload_device is not None:
            self.remove_all_hooks()
        transformer = self.transformer
        self._anystory.detach()
        loaded = [a for a in ANYSTORY_ADAPTERS if a in getattr(transformer, "peft_config", {})]
        if loaded:
            transformer.delete_adapters(loaded)
        with warnings.catch_warnings():  # two adapters on one model is the design, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for adapter, sd, alphas, inactive in (
                    (REF_ADAPTER, released.ref, released.ref_alphas, released.ref_inactive),
                    (ROUTER_ADAPTER, released.router_lora, released.router_alphas, released.router_inactive)):
                transformer.load_lora_adapter(dict(sd), network_alphas=alphas or None, prefix="transformer",
                                              adapter_name=adapter)
                modules = dict(transformer.named_modules())
                for name in inactive:  # loaded as the release loads them; it never switches them on
                    modules[name].delete_adapter(adapter)
        deactivate_anystory_adapters(transformer)

        state = AnyStoryFluxState()
        blocks = flux_blocks(transformer)
        for layer_id, (block, proc) in enumerate(zip(blocks, built["processors"])):
            proc.bind(state, RouterModules.of_block(block, last=layer_id == len(blocks) - 1))
            block.attn.set_processor(proc)
        state.ref_layers = layers_with_adapter(transformer, REF_ADAPTER)
        state.router_input_layers = layers_with_adapter(transformer.context_embedder, ROUTER_ADAPTER)
        state.attach(transformer)
        self._anystory = state
        self.register_modules(**built["embedders"])
        if offload_device is not None:
            self.enable_model_cpu_offload(device=offload_device)

    def save_anystory_weights(self, directory: str, dtype: Optional[torch.dtype] = None) -> str:
        """Write the loaded AnyStory weights as ``<directory>/anystory_flux.bin`` in the release's layout (what
        :meth:`load_anystory_weights` and the authors' loader read); returns the file's path."""
        from .release_export import save_released

        return save_released(self, directory, dtype)

    # ---- routing override (test / debug hook; set_routing_override is the mixin's) ------------------------------
    def _forced_maps(self, n: int, grid, device) -> Optional[torch.Tensor]:
        maps = self._routing_override_for(n)
        if maps is None:
            return None
        small = F.interpolate(maps[None].float(), size=grid, mode="nearest")[0]
        return (small[:n] > 0.5).float().flatten(1).to(device)

    # ---- subjects ----------------------------------------------------------------------------------------------
    _anystory_load_hint = "load_anystory_weights(path) (the authors' anystory_flux.bin)"

    def _prepare_subjects(self, subjects: Optional[Sequence[Subject]],
                          preprocessing: str = "app") -> List[PreparedSubject]:
        """Subjects prepared as the release prepares them (``release_inputs``: ``"app"`` = the authors' demo,
        ``"none"`` = their ``generate()``: image and soft mask as given); ``check_subjects`` is the mixin's."""
        return prepare_release_subjects(subjects, self.max_subjects, self.segmenter, preprocessing)

    def encode_subjects(self, prepared: Sequence[PreparedSubject], device, generator=None,
                        reference_noise: str = "call") -> dict:
        """Redux tokens ``[N, 81, C]``, router tokens ``[N, 9, C]``, packed reference latents ``[N, R, c]``, their
        position ids ``[R, 3]`` and reference-token masks ``[N, R]``. As the release: one subject at a time, masks
        as ``encode_redux_maybe_with_router_condition`` / ``encode_ref_condition`` compute them (soft values
        included).

        The reference latent is a sample of the VAE posterior. ``reference_noise="call"``: its noise comes from
        a CPU generator seeded with the call generator's seed (the same on every device). ``"release"``: as the
        release's ``generate()``, ``torch.manual_seed(seed)`` (the global RNGs, as it does) and the global RNG
        of the VAE's device, so a GPU run draws the release's noise."""
        if reference_noise not in REFERENCE_NOISE:
            raise InvalidInputError(f"reference_noise must be one of {REFERENCE_NOISE}, got {reference_noise!r}")
        first = generator[0] if isinstance(generator, list) else generator
        sampler = None
        if reference_noise == "call" and first is not None:
            sampler = torch.Generator("cpu").manual_seed(first.initial_seed())
        elif first is not None:
            torch.manual_seed(first.initial_seed())
        fe, enc, size = self.feature_extractor, self.image_encoder, self.reference_size
        grid = enc.config.image_size // enc.config.patch_size
        out = {"redux": [], "router": [], "ref_latents": [], "ref_mask": []}
        for p, values in zip(prepared, encoder_mask_values(prepared)):
            mask_image = PIL.Image.fromarray(values)
            # SigLIP: normalised pixels times the mask (nearest-resized by the SigLIP processor, in [0, 1])
            pixels = fe.preprocess(images=p.image, return_tensors="pt").pixel_values
            mask = fe.preprocess(images=mask_image.convert("RGB"), resample=0, do_normalize=False,
                                 return_tensors="pt").pixel_values
            feats = enc((pixels * mask).to(device=device, dtype=enc.dtype)).last_hidden_state
            mask = mask.mean(dim=1, keepdim=True)
            patch_mask = (F.adaptive_avg_pool2d(mask, (grid, grid)) > 0).flatten(2).transpose(1, 2).to(device)
            out["redux"].append(self.redux_embedder(feats.to(self.redux_embedder.dtype), patch_mask))
            out["router"].append(self.router_embedder(feats.to(self.router_embedder.dtype), patch_mask))

            # reference: masked, resized, VAE-encoded
            ref_pixels = self.image_processor.preprocess(p.image, height=size, width=size)
            ref_mask = self._reference_mask(values, size)
            x = (ref_pixels * ref_mask).to(device=device, dtype=self.vae.dtype)
            latents = self.vae.encode(x).latent_dist.sample(generator=sampler)
            latents = (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor
            _, c, h, w = latents.shape
            out["ref_latents"].append(self._pack_latents(latents, 1, c, h, w))
            out["ref_mask"].append((F.adaptive_avg_pool2d(ref_mask, (h // 2, w // 2)) > 0).flatten(1).to(device))
        ids = self._prepare_latent_image_ids(1, h // 2, w // 2, device, latents.dtype)
        ids[:, 2] -= w // 2  # the release's position shift: the reference sits left of the image
        return {**{k: torch.cat(v) for k, v in out.items()}, "ref_ids": ids}

    def conditioning_inputs(self, prepared: Sequence[PreparedSubject], device, generator=None, *, steps: int, grid,
                            redux_scale: float = 0.6, redux_start_at: float = 0.1, redux_end_at: float = 0.3,
                            ref_start_at: float = 0.0, ref_end_at: float = 1.0, use_router: Optional[bool] = None,
                            confine_subjects: bool = False, record_maps: bool = False,
                            reference_noise: str = "call", regions: Optional[torch.Tensor] = None
                            ) -> FluxConditioning:
        """Encode the subjects and lay out one call's conditioning (``AnyStoryFluxState.start`` takes it).
        ``regions``: ``[N, H, W]`` from :func:`anystory.regions.routing_regions`; they need the router, so they turn
        it on for one subject too."""
        n = len(prepared)
        if regions is not None and use_router is False:
            raise InvalidInputError("subject regions need the router: use_router=False cannot confine a subject to "
                                    "its region")
        enc = self.encode_subjects(prepared, device, generator, reference_noise)
        # one Python-float multiply per subject, as the release does (``tokens * redux_scale``): a scale tensor in
        # bfloat16 would round 0.6 to 0.6015625
        redux = torch.cat([enc["redux"][i:i + 1] * (redux_scale * p.scale) for i, p in enumerate(prepared)])
        ref_scale = torch.tensor([p.reference_scale for p in prepared], device=device)
        log_scale = torch.where(ref_scale > 0, ref_scale.clamp(min=1e-30).log(),
                                torch.full_like(ref_scale, float("-inf")))
        ref_bias = torch.where(enc["ref_mask"], 0.0, -100.0) + log_scale[:, None]
        return FluxConditioning(
            num_subjects=n, redux_tokens=redux.flatten(0, 1)[None], router_tokens=enc["router"].flatten(0, 1)[None],
            ref_latents=enc["ref_latents"], ref_ids=enc["ref_ids"], ref_bias=ref_bias.flatten(),
            ref_mask=enc["ref_mask"].flatten(),
            redux_window=step_window(steps, redux_start_at, redux_end_at),
            ref_window=step_window(steps, ref_start_at, ref_end_at),
            use_router=(n > 1 or regions is not None) if use_router is None else bool(use_router),
            closed_regions=None if regions is None else closed_at_grid(regions, grid).to(device),
            forced_maps=self._forced_maps(n, grid, device), confine=bool(confine_subjects), record_maps=record_maps)

    # ---- call --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, subjects: Optional[Sequence[Subject]] = None, *, height: Optional[int] = FLUX.size,
                 width: Optional[int] = FLUX.size, num_inference_steps: int = FLUX.steps,
                 guidance_scale: float = FLUX.guidance,
                 redux_scale: float = 0.6, redux_start_at: float = 0.1, redux_end_at: float = 0.3,
                 ref_start_at: Optional[float] = None, ref_end_at: float = 1.0, use_router: Optional[bool] = None,
                 confine_subjects: bool = False, num_images_per_prompt: int = 1, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True,
                 callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Optional[List[str]] = None, return_routing_maps: bool = False,
                 subject_preprocessing: str = "app", reference_noise: str = "call", **kwargs):
        """Generate. ``subjects``: up to ``max_subjects`` :class:`Subject` (``scale`` multiplies the subject's redux
        tokens, ``reference_scale`` its reference attention weights). Defaults are the authors': steps, guidance
        and size of ``presets.FLUX``, redux 0.6 in [0.1, 0.3) of the schedule, reference from the start (from 0.09
        with >= 2 subjects) to the end, router on for >= 2 subjects. ``confine_subjects``: see
        ``attention_processor_flux`` (not in the release). ``subject_preprocessing``: ``"app"`` (the authors'
        demo: mask > 200, their square crop) or ``"none"`` (their ``generate()``: image and soft mask as given);
        see ``release_inputs``. ``reference_noise``: ``"call"`` or ``"release"`` (the global RNG of the VAE's
        device, seeded as the release seeds it); see :meth:`encode_subjects`. Other arguments are
        ``FluxPipeline``'s."""
        if kwargs.pop("background", None) is not None:  # the release's router has no background class to route it to
            raise InvalidInputError("background: the background reference is SDXL-only (the released FLUX router has "
                                    "no background class to route it to)")
        if reference_noise not in REFERENCE_NOISE:
            raise InvalidInputError(f"reference_noise must be one of {REFERENCE_NOISE}, got {reference_noise!r}")
        height, width = height or FLUX.size, width or FLUX.size  # None: the authors' size
        prepared = self.check_subjects(subjects, subject_preprocessing)
        n = len(prepared)
        redux_scale = check_number(redux_scale, "redux_scale", 0.0)
        if ref_start_at is None:
            ref_start_at = MULTI_SUBJECT_REF_START if n > 1 else 0.0
        fractions = {name: check_number(value, name, 0.0, 1.0) for name, value in (
            ("redux_start_at", redux_start_at), ("redux_end_at", redux_end_at), ("ref_start_at", ref_start_at),
            ("ref_end_at", ref_end_at))}
        for a, b in (("redux_start_at", "redux_end_at"), ("ref_start_at", "ref_end_at")):
            if fractions[a] > fractions[b]:
                raise InvalidInputError(f"{a} ({fractions[a]}) must not exceed {b} ({fractions[b]})")
        if n and kwargs.get("true_cfg_scale", 1.0) > 1 and (kwargs.get("negative_prompt") is not None
                                                             or kwargs.get("negative_prompt_embeds") is not None):
            raise InvalidInputError("true CFG (true_cfg_scale > 1 with a negative prompt) is not supported with "
                                    "subjects: FLUX.1-dev is guidance-distilled; use guidance_scale")

        grid = (int(height) // (self.vae_scale_factor * 2), int(width) // (self.vae_scale_factor * 2))
        regions = None
        if n:
            self._forced_maps(n, grid, "cpu")  # a wrong override fails before any encoding
            regions = routing_regions(prepared, height, width)  # so does a region mask of another size
        maps: List[torch.Tensor] = []
        state = self._anystory

        def advance(i):
            state.step = i + 1
            if return_routing_maps:
                step_maps = state.take_step_maps(grid)
                if step_maps is not None:
                    maps.append(step_maps)

        on_step_end, tensor_inputs = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                                         advance, needed=bool(n))

        if self.anystory_loaded:
            deactivate_anystory_adapters(self.transformer)  # in case set_adapters() switched ours on globally
        try:
            if n:
                steps = len(kwargs["sigmas"]) if kwargs.get("sigmas") is not None else num_inference_steps
                self.start_anystory_call(self.conditioning_inputs(
                    prepared, self._execution_device, generator, steps=steps, grid=grid, redux_scale=redux_scale,
                    use_router=use_router, confine_subjects=confine_subjects, record_maps=return_routing_maps,
                    reference_noise=reference_noise, regions=regions, **fractions))
            out = super().__call__(
                prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt, generator=generator,
                latents=latents, output_type=output_type, return_dict=True,
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=tensor_inputs, **kwargs)
        finally:
            self.start_anystory_call()
        return self._anystory_output(out.images, maps, return_routing_maps, return_dict)
