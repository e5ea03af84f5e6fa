"""What both AnyStory pipelines share on top of their diffusers parent: the output class, the routing override,
the step callback, unloading AnyStory, and refusing IP-Adapter while it is attached.

AnyStory enters the denoiser only through attention processors (and, on FLUX, PEFT adapters). Unloading puts
back the processors the denoiser had before AnyStory attached, so the pipeline is then diffusers' own again, bit
for bit. IP-Adapter also replaces every attention processor and, when unloaded, rebuilds the others with
``value.__class__()`` (which our processors do not allow) and drops the image encoder AnyStory reads; the two
cannot share a denoiser, so each refuses while the other is there, naming the conflict.

The backbone contract. A backbone pipeline lists this mixin before its diffusers parent, implements its abstract
members (a pipeline lacking one cannot be instantiated) and calls :meth:`_before_attach` before installing its
processors. Per call it builds one immutable conditioning (SDXL: ``SDXLConditioning``, FLUX:
``FluxConditioning``) with ``conditioning_inputs``, starts the call with ``start_anystory_call(conditioning)``
and runs the denoiser with the separate mutable call state that starts (``anystory_state``: the conditioning as
``.conditioning``, plus what the processors write); ``start_anystory_call()`` ends it. The same names on both
backbones, and ``tests/core/test_backbone_contract.py`` holds both to the same behaviour.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput

from .errors import AnyStoryConflictError, InvalidInputError


@dataclass
class AnyStoryPipelineOutput(BaseOutput):
    """images: as the diffusers pipeline's output. routing_maps: when requested, one ``[batch, N+1, h, w]`` float
    tensor per denoising step (channel i < N is subject i, channel N the background, i.e. no subject). SDXL: at
    the latent resolution, the gating maps averaged over the cross-attention layers of that step. FLUX: at the
    image-token grid (``height/16 x width/16``), the share of blocks in which each image token could attend to
    each subject; steps without routing report every subject everywhere (one subject, or ``use_router=False``)
    or none (conditions off at that step)."""

    images: Union[List[PIL.Image.Image], np.ndarray]
    routing_maps: Optional[List[torch.Tensor]] = None


_IP_ADAPTER_CONFLICT = ("IP-Adapter and AnyStory both replace the denoiser's attention processors and cannot be "
                        "used together: call pipe.unload_anystory() first")


class AnyStoryPipelineMixin(abc.ABC):
    _anystory_saved_processors: Optional[dict] = None
    #: What to call to load weights, named in the error for subjects without them.
    _anystory_load_hint = "load_anystory_weights(path)"

    # ---- implemented by each backbone pipeline -----------------------------------------------------------------
    @property
    @abc.abstractmethod
    def _anystory_denoiser(self) -> torch.nn.Module:
        """The module whose attention processors AnyStory replaces (the UNet or the transformer)."""

    @property
    @abc.abstractmethod
    def anystory_loaded(self) -> bool:
        """Whether AnyStory weights are attached."""

    @property
    @abc.abstractmethod
    def max_subjects(self) -> int:
        """The most subjects one call takes."""

    @property
    @abc.abstractmethod
    def anystory_state(self):
        """The call state the processors share: ``.conditioning`` (the call's immutable conditioning, read by
        name on the state too) and what the processors write while the denoiser runs."""

    @abc.abstractmethod
    def start_anystory_call(self, conditioning=None):
        """Start one call: a fresh call state for ``conditioning`` (from :meth:`conditioning_inputs`), handed to
        the processors, exposed as :attr:`anystory_state` and returned; ``None`` ends the call (nothing
        conditioned, nothing of the last call's state kept). The pipeline's ``__call__`` brackets the denoiser
        with it; trainers and benchmarks that run the denoiser themselves call it the same way on both backbones."""

    @abc.abstractmethod
    def load_anystory_weights(self, *args, **kwargs):
        """Attach AnyStory from weights (checked before anything changes)."""

    @abc.abstractmethod
    def encode_subjects(self, *args, **kwargs):
        """The subjects' encoded conditions (the backbone's encoders), as tensors."""

    @abc.abstractmethod
    def conditioning_inputs(self, prepared, *args, **kwargs):
        """One call's immutable conditioning: the encoded subjects and the call's settings."""

    @abc.abstractmethod
    def _remove_anystory_modules(self) -> None:
        """Drop AnyStory's modules and adapters (the processors are put back by :meth:`unload_anystory`)."""

    @abc.abstractmethod
    def _prepare_subjects(self, subjects, *options) -> list:
        """The backbone's validation and preparation of ``subjects`` (a list of ``PreparedSubject``)."""

    # ---- subjects ----------------------------------------------------------------------------------------------
    def check_subjects(self, subjects, *options) -> list:
        """Validated, prepared subjects; refuses subjects when no AnyStory weights (or no image encoder) are
        there to use them. ``options``: the backbone's preparation options."""
        prepared = self._prepare_subjects(subjects, *options)
        if prepared:
            if not self.anystory_loaded:
                raise ValueError(f"subjects were given but no AnyStory weights are loaded: call "
                                 f"{self._anystory_load_hint}")
            if self.image_encoder is None or self.feature_extractor is None:
                raise ValueError("subjects need the pipeline's image_encoder and feature_extractor")
        return prepared

    @staticmethod
    def _reference_mask(mask: np.ndarray, size: int) -> torch.Tensor:
        """A subject's mask at the reference resolution, ``[1, 1, size, size]`` float in [0, 1]: boolean or uint8
        (0..255, soft values kept) nearest-resized, so no foreground value is invented between pixels."""
        values = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask
        resized = PIL.Image.fromarray(values).resize((size, size), resample=PIL.Image.NEAREST)
        return torch.from_numpy(np.array(resized)).float()[None, None] / 255.0

    # ---- routing override (test / debug hook) -------------------------------------------------------------------
    def set_routing_override(self, maps: Optional[torch.Tensor]) -> None:
        """Force the routing of every layer to ``maps`` (``[N+1, H, W]``, channel i < N = subject i, channel N =
        background), nearest-resized per layer (FLUX: to the image-token grid, applied whenever a subject
        condition is on, even for one subject). ``None`` restores the router."""
        self._routing_override = maps

    def _routing_override_for(self, n: int) -> Optional[torch.Tensor]:
        """The override for a call with ``n`` subjects, checked; None when routing is the router's."""
        maps = getattr(self, "_routing_override", None)
        if maps is None:
            return None
        maps = torch.as_tensor(maps)
        if maps.ndim != 3 or maps.shape[0] != n + 1:
            raise InvalidInputError(f"routing override must be [N+1={n + 1}, H, W], got {tuple(maps.shape)}")
        if not torch.isfinite(maps.float()).all():
            raise InvalidInputError("routing override contains NaN or infinite values")
        return maps

    # ---- the call's step callback and output -------------------------------------------------------------------
    @staticmethod
    def _step_callback(callback: Optional[Callable], tensor_inputs: Optional[List[str]],
                       on_step: Callable[[int], None], needed: bool):
        """(step callback for the diffusers call, its tensor inputs): ``on_step(i)`` runs at the end of every
        step, then the user's ``callback``. None when neither ``needed`` nor a user callback asks for one."""
        inputs = tensor_inputs or ["latents"]
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            inputs = callback.tensor_inputs

        def on_step_end(pipe, i, t, tensors):
            on_step(i)
            return callback(pipe, i, t, tensors) if callback is not None else {}

        return (on_step_end if (needed or callback is not None) else None), inputs

    @staticmethod
    def _anystory_output(images, maps: List[torch.Tensor], return_routing_maps: bool, return_dict: bool):
        routing = maps if return_routing_maps else None
        if not return_dict:
            return (images, routing)
        return AnyStoryPipelineOutput(images=images, routing_maps=routing)

    # ---- attach / unload ---------------------------------------------------------------------------------------
    def _ip_adapter_loaded(self) -> bool:
        denoiser = self._anystory_denoiser
        return (getattr(denoiser, "encoder_hid_proj", None) is not None
                and getattr(denoiser.config, "encoder_hid_dim_type", None) == "ip_image_proj")

    def _refuse_beside_ip_adapter(self) -> None:
        if self._ip_adapter_loaded():
            raise AnyStoryConflictError("an IP-Adapter is loaded: IP-Adapter and AnyStory both replace the "
                                        "denoiser's attention processors; call pipe.unload_ip_adapter() first")

    def _before_attach(self) -> None:
        """Refuse beside IP-Adapter; remember diffusers' processors the first time AnyStory attaches."""
        self._refuse_beside_ip_adapter()
        if self._anystory_saved_processors is None:
            self._anystory_saved_processors = dict(self._anystory_denoiser.attn_processors)

    def unload_anystory(self) -> None:
        """Remove AnyStory: the denoiser gets back the processors it had before, and the pipeline then computes
        what its diffusers parent computes. Load weights again to use AnyStory again."""
        if self._anystory_saved_processors is not None:
            self._anystory_denoiser.set_attn_processor(self._anystory_saved_processors)
            self._anystory_saved_processors = None
        self._remove_anystory_modules()

    # ---- IP-Adapter: refused while AnyStory is attached --------------------------------------------------------
    def load_ip_adapter(self, *args, **kwargs):
        if self.anystory_loaded:
            raise AnyStoryConflictError(_IP_ADAPTER_CONFLICT)
        return super().load_ip_adapter(*args, **kwargs)

    def unload_ip_adapter(self, *args, **kwargs):
        if self.anystory_loaded:
            raise AnyStoryConflictError(_IP_ADAPTER_CONFLICT)
        return super().unload_ip_adapter(*args, **kwargs)

    def set_ip_adapter_scale(self, *args, **kwargs):
        if self.anystory_loaded:
            raise AnyStoryConflictError(_IP_ADAPTER_CONFLICT)
        return super().set_ip_adapter_scale(*args, **kwargs)
