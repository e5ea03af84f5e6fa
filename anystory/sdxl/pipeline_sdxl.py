"""``AnyStorySDXLPipeline``: SDXL with AnyStory's encode-then-route subject conditioning.

The pipeline is diffusers' ``StableDiffusionXLPipeline`` plus one optional component, ``anystory`` (the
:class:`AnyStorySDXLAdapter`). ``__call__`` validates and encodes the subjects once (ReferenceNet, CLIP +
QFormers), hands the result to the attention processors through the adapter's state, and then runs the parent's
denoising loop untouched. With no subjects nothing is conditioned and the output is SDXL's own.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLPipeline

from .adapter_fit import check_adapter_fits_unet
from .adapter_sdxl import AnyStorySDXLAdapter
from .attention_processors import AnyStoryState, SDXLConditioning
from .background import background_tensors, check_background, encode_background, start_offset, with_background
from ..errors import check_number
from ..hub import SDXL_IMAGE_ENCODER as DEFAULT_IMAGE_ENCODER  # noqa: F401 (the paper's CLIP, kept by this name)
from ..pipeline_mixin import AnyStoryPipelineMixin, AnyStoryPipelineOutput  # noqa: F401 (exported here)
from ..presets import SDXL
from ..regions import routing_regions
from ..subjects import MAX_SUBJECTS, PreparedSubject, Segmenter, Subject, prepare_subjects


class AnyStorySDXLPipeline(AnyStoryPipelineMixin, StableDiffusionXLPipeline):
    _optional_components = StableDiffusionXLPipeline._optional_components + ["anystory"]
    _exclude_from_cpu_offload = ["anystory"]  # its modules run inside the UNet's forward

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler,
                 image_encoder=None, feature_extractor=None, anystory: Optional[AnyStorySDXLAdapter] = None,
                 force_zeros_for_empty_prompt: bool = True, add_watermarker: Optional[bool] = None,
                 segmenter: Optional[Segmenter] = None):
        super().__init__(vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
                         feature_extractor, force_zeros_for_empty_prompt, add_watermarker=add_watermarker)
        self.register_modules(anystory=None)
        self.segmenter = segmenter
        if anystory is not None:
            self._set_anystory(anystory)

    @property
    def max_subjects(self) -> int:
        return self.anystory.config.max_subjects if self.anystory is not None else MAX_SUBJECTS

    @property
    def anystory_loaded(self) -> bool:
        return self.anystory is not None

    @property
    def _anystory_denoiser(self):
        return self.unet

    @property
    def anystory_state(self) -> Optional[AnyStoryState]:
        """The running call's state (its immutable ``conditioning`` and what the processors write); between calls,
        one with nothing conditioned. None without AnyStory weights."""
        return self.anystory.state if self.anystory is not None else None

    def start_anystory_call(self, conditioning: Optional[SDXLConditioning] = None) -> Optional[AnyStoryState]:
        """A fresh call state for ``conditioning`` (None: nothing conditioned), handed to every processor (the
        adapter's :meth:`~AnyStorySDXLAdapter.start`). None without AnyStory weights and nothing to condition."""
        if self.anystory is None:
            if conditioning is None:
                return None
            raise ValueError("a conditioning was given but no AnyStory weights are loaded: call "
                             f"{self._anystory_load_hint}")
        return self.anystory.start(conditioning)

    # ---- our weights -------------------------------------------------------------------------------------------
    def _remove_anystory_modules(self) -> None:
        self.register_modules(anystory=None)

    def _set_anystory(self, adapter: AnyStorySDXLAdapter) -> None:
        if self.image_encoder is not None and adapter.config.image_embed_dim != self.image_encoder.config.hidden_size:
            raise ValueError(f"AnyStory weights expect image features of width {adapter.config.image_embed_dim}, "
                             f"the image encoder gives {self.image_encoder.config.hidden_size}")
        check_adapter_fits_unet(adapter, self.unet)  # refused here, not inside a later matmul
        self._before_attach()
        adapter.to(device=self.unet.device, dtype=self.unet.dtype)
        adapter.attach(self.unet)
        self.register_modules(anystory=adapter)

    def init_anystory(self, **config) -> AnyStorySDXLAdapter:
        """Fresh (untrained) AnyStory modules for this UNet: the starting point of training."""
        self._refuse_beside_ip_adapter()  # before the ReferenceNet copies the UNet's config
        if self.image_encoder is None:
            raise ValueError("init_anystory needs the pipeline's image_encoder (a CLIPVisionModelWithProjection)")
        adapter = AnyStorySDXLAdapter.from_unet(self.unet, self.image_encoder.config.hidden_size, **config)
        self._set_anystory(adapter)
        return adapter

    def load_anystory_weights(self, path: str) -> AnyStorySDXLAdapter:
        """Load ``anystory.safetensors`` + ``anystory_config.json`` (a folder, or the weights file beside its config)."""
        self._set_anystory(AnyStorySDXLAdapter.load_anystory(path))
        return self.anystory

    def save_anystory_weights(self, directory: str) -> None:
        if self.anystory is None:
            raise ValueError("no AnyStory weights to save: call init_anystory or load_anystory_weights first")
        self.anystory.save_anystory(directory)

    def _forced_maps(self, n: int, device) -> Optional[torch.Tensor]:
        maps = self._routing_override_for(n)
        return None if maps is None else maps.to(device=device, dtype=torch.float32)

    # ---- subject encoding --------------------------------------------------------------------------------------
    _anystory_load_hint = "load_anystory_weights(path) (or init_anystory() to train)"

    def _prepare_subjects(self, subjects: Optional[Sequence[Subject]]) -> List[PreparedSubject]:
        return prepare_subjects(subjects, self.max_subjects, self.segmenter)

    def subject_tensors(self, prepared: Sequence[PreparedSubject], device, dtype) -> dict:
        """Pixel tensors for ``encode_subjects``: VAE input, mask, and CLIP input (plus a blank image last)."""
        size = self.anystory.config.reference_size
        images = [p.image.resize((size, size), PIL.Image.BICUBIC) for p in prepared]
        blank = PIL.Image.new("RGB", (size, size), (255, 255, 255))
        pixels = self.image_processor.preprocess(images, height=size, width=size).to(device, dtype)
        mask = torch.cat([self._reference_mask(p.mask, size) for p in prepared]).to(device, dtype)
        clip = self.feature_extractor(images=images + [blank], return_tensors="pt").pixel_values.to(device, dtype)
        return {"pixels": pixels[None], "masks": mask[None], "clip_pixels": clip[None]}

    def encode_vae(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[b, 3, R, R]`` images in [-1, 1] -> their scaled VAE latents (the mode), in the UNet's dtype."""
        upcast = self.vae.dtype == torch.float16 and self.vae.config.force_upcast  # SDXL's VAE overflows in fp16
        if upcast:
            self.vae.to(dtype=torch.float32)
        try:
            latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(self.unet.dtype)

    def encode_subjects(self, pixels: torch.Tensor, masks: torch.Tensor, clip_pixels: torch.Tensor) -> dict:
        """Encode ``[b, N, 3, R, R]`` references (+ masks ``[b, N, 1, R, R]``, CLIP input ``[b, N+1, ...]`` whose
        last image is blank) into the state fields the processors read. Differentiable (used by training too).

        Each subject (and the blank image) goes through the encoders on its own: in one batch, kernels would give
        a subject's features float noise that depends on the other subjects, and no subject may change another's
        conditions (a subject routed nowhere must change nothing)."""
        b, n = pixels.shape[:2]
        adapter = self.anystory
        latents = [self.encode_vae(pixels[:, i]) for i in range(n)]
        reference, semantic, routing = [], [], []
        for i in range(n + 1):
            hidden = self.image_encoder(clip_pixels[:, i].to(self.image_encoder.dtype),
                                        output_hidden_states=True).hidden_states[-2].to(self.unet.dtype)
            semantic.append(adapter.semantic_qformer(hidden))
            routing.append(adapter.routing_qformer(hidden)[:, 0])
            if i == n:
                break
            latent = latents[i]
            small = F.interpolate(masks[:, i].float(), size=latent.shape[-2:], mode="area").to(latent.dtype)
            reference.append(adapter.reference_net(latent, small, adapter.config.reference_size))
        return {"num_subjects": n,
                "reference_features": {k: torch.stack([f[k] for f in reference], 1) for k in reference[0]},
                "semantic_tokens": torch.stack(semantic[:n], 1),
                "semantic_uncond_tokens": semantic[n][:, None].expand(-1, n, -1, -1),
                "routing_tokens": torch.stack(routing, 1)}

    def prepare_latents(self, *args, **kwargs):
        """diffusers' starting latents, plus the background reference's mean latent as the first timestep's noising
        scales a clean signal (``background.start_offset``), when the call's conditioning has one."""
        latents = super().prepare_latents(*args, **kwargs)
        state = self.anystory_state
        offset = None if state is None else state.conditioning.start_offset
        if offset is None:
            return latents
        offset = offset.to(latents.device, latents.dtype).expand_as(latents)
        return latents + self.scheduler.add_noise(offset, torch.zeros_like(latents), self.scheduler.timesteps[:1])

    def conditioning_inputs(self, prepared: Sequence[PreparedSubject], background=None, *, guidance_scale: float,
                            height: int, width: int, regions: Optional[torch.Tensor] = None,
                            record_maps: bool = False, background_start: Optional[float] = None,
                            routing_background_bias: Optional[float] = None) -> SDXLConditioning:
        """Encode the subjects (and the background reference) and lay out one call's conditioning
        (``AnyStorySDXLAdapter.start`` takes it). ``regions``: ``[N, H, W]`` from
        :func:`anystory.regions.routing_regions`; ``None`` settings use the values stored with the weights."""
        device, dtype = self._execution_device, self.unet.dtype
        routing_background_bias = self._background_bias(len(prepared), routing_background_bias)
        encoded = self.encode_subjects(**self.subject_tensors(prepared, device, dtype)) if prepared else None
        offset = None
        if background is not None:
            tensors = background_tensors(self, background, device, dtype)
            encoded = with_background(encoded, encode_background(self, **tensors))
            strength = self.anystory.config.background_start if background_start is None else background_start
            offset = start_offset(self, tensors["pixels"], strength)
        extra = [1.0] if background is not None else []
        return self.anystory.conditioning(
            **encoded, background=background is not None,
            scales=torch.tensor([p.scale for p in prepared] + extra, device=device),
            reference_scales=torch.tensor([p.reference_scale for p in prepared] + extra, device=device),
            cfg=guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None,
            latent_hw=(height // self.vae_scale_factor, width // self.vae_scale_factor),
            forced_maps=self._forced_maps(len(prepared), device),
            routing_regions=None if regions is None else regions.to(device), record_maps=record_maps,
            start_offset=offset,
            **({} if routing_background_bias is None else {"background_bias": routing_background_bias}))

    def _background_bias(self, count: int, given: Optional[float]) -> Optional[float]:
        """The call's background adjustment: the caller's, else a lone subject's own when the weights store one
        (``routing_background_bias_single``: the adjustment keeps subjects apart, and one subject has nothing to be
        kept from - it only shrinks its region), else ``None`` (the stored adjustment)."""
        single = self.anystory.config.routing_background_bias_single
        return single if given is None and count == 1 and single is not None else given

    # ---- call --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompt=None, subjects: Optional[Sequence[Subject]] = None, *, background=None, height: Optional[int] = None,
                 width: Optional[int] = None, num_inference_steps: int = SDXL.steps, guidance_scale: float = SDXL.guidance,
                 negative_prompt=None, num_images_per_prompt: int = 1, generator=None, latents=None,
                 output_type: str = "pil", return_dict: bool = True, callback_on_step_end: Optional[Callable] = None,
                 callback_on_step_end_tensor_inputs: Optional[List[str]] = None, return_routing_maps: bool = False,
                 routing_background_bias: Optional[float] = None, background_start: Optional[float] = None, **kwargs):
        """Generate. ``subjects``: up to ``max_subjects`` :class:`Subject`. Every other argument is
        ``StableDiffusionXLPipeline``'s. ``return_routing_maps`` adds per-step routing maps to the output.
        ``routing_background_bias``: the router's background logit adjustment (``router.py``); ``None`` uses the
        value stored with the weights, 0 is the paper's plain argmax, larger values give subjects more room.
        ``background``: an image of the scene's backdrop, applied where the router puts background
        (``background.py``; needs weights trained with it). ``background_start``: how much of its mean latent colour
        the starting latent gets (``background.start_offset``); ``None`` uses the value stored with the weights."""
        prepared = self.check_subjects(subjects)
        background = check_background(self, background)
        if routing_background_bias is not None:
            routing_background_bias = check_number(routing_background_bias, "routing_background_bias")
        if background_start is not None:
            background_start = check_number(background_start, "background_start", 0.0)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        regions = routing_regions(prepared, height, width)  # a region mask of another size fails before encoding
        maps: List[torch.Tensor] = []

        def collect_maps(i):
            if return_routing_maps:
                step = self.anystory_state.take_step_maps() if self.anystory is not None else None
                if step is not None:
                    maps.append(step.cpu())

        on_step_end, tensor_inputs = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs,
                                                         collect_maps, needed=return_routing_maps)

        try:
            if prepared or background is not None:
                self.start_anystory_call(self.conditioning_inputs(
                    prepared, background, guidance_scale=guidance_scale, height=height, width=width,
                    regions=regions, record_maps=return_routing_maps, background_start=background_start,
                    routing_background_bias=routing_background_bias))
            out = super().__call__(
                prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                num_images_per_prompt=num_images_per_prompt, generator=generator, latents=latents,
                output_type=output_type, return_dict=True,
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=tensor_inputs, **kwargs)
        finally:
            self.start_anystory_call()
        return self._anystory_output(out.images, maps, return_routing_maps, return_dict)
