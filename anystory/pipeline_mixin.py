"""What both AnyStory pipelines share on top of their diffusers parent: unloading AnyStory, and refusing
IP-Adapter while it is attached.

AnyStory enters the denoiser only through attention processors (and, on FLUX, PEFT adapters). Unloading puts
back the processors the denoiser had before AnyStory attached, so the pipeline is then diffusers' own again, bit
for bit. IP-Adapter also replaces every attention processor and, when unloaded, rebuilds the others with
``value.__class__()`` (which our processors do not allow) and drops the image encoder AnyStory reads; the two
cannot share a denoiser, so each refuses while the other is there, naming the conflict.

A backbone pipeline lists this mixin before its diffusers parent and provides ``_anystory_denoiser`` (the UNet
or transformer), ``anystory_loaded`` and ``_remove_anystory_modules``, and calls :meth:`_before_attach` before
installing its processors.
"""
from __future__ import annotations

from typing import Optional

import torch


class AnyStoryConflictError(RuntimeError):
    """Two adapters that replace the same attention processors were asked to work together."""


_IP_ADAPTER_CONFLICT = ("IP-Adapter and AnyStory both replace the denoiser's attention processors and cannot be "
                        "used together: call pipe.unload_anystory() first")


class AnyStoryPipelineMixin:
    _anystory_saved_processors: Optional[dict] = None

    # ---- provided by the backbone pipeline ---------------------------------------------------------------------
    @property
    def _anystory_denoiser(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def anystory_loaded(self) -> bool:
        raise NotImplementedError

    def _remove_anystory_modules(self) -> None:
        raise NotImplementedError

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
