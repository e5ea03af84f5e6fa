"""All of AnyStory's trainable parts for a UNet backbone, in one module (IP-Adapter's compact-module model).

``AnyStorySDXLAdapter`` holds the ReferenceNet, the semantic and routing QFormers, and per cross-attention layer
the semantic key/value projections and the router. ``attach(unet)`` installs the attention processors that use
them. Our weights are written as ``anystory.safetensors`` with ``anystory_config.json`` beside them.
"""
from __future__ import annotations

import copy
import json
import os
from typing import List, Optional, Union

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .background import BackgroundConditioning, reference_dims
from .attention_processors import (AnyStoryCrossAttnProcessor, AnyStorySelfAttnProcessor, AnyStoryState,
                                   CrossAttnConditioning, SDXLConditioning)
from .qformer import QFormer
from .reference_net import ReferenceNet
from ..attention_layout import cross_attention_layers, layer_key
from ..subjects import MAX_SUBJECTS
from ..weights import ANYSTORY_CONFIG as CONFIG_NAME
from ..weights import ANYSTORY_WEIGHTS as WEIGHTS_NAME
from ..weights import anystory_files, check_state_dict, load_tensors, save_tensors


def _unet_shape(unet_config) -> dict:
    """The UNet's config as written: without the folder it was loaded from (diffusers' ``_name_or_path``), a path
    on the training machine that is not part of the model and would make two rebuilds in different folders differ."""
    return {k: v for k, v in dict(unet_config).items() if k != "_name_or_path"}


class AnyStorySDXLAdapter(ModelMixin, ConfigMixin):
    config_name = CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        unet_config: dict,
        cross_attention_layers: list,
        image_embed_dim: int,
        num_semantic_tokens: int = 64,
        qformer_dim: int = 1024,
        qformer_depth: int = 4,
        qformer_heads: int = 16,
        routing_dim: int = 768,
        router_dim: int = 64,
        reference_size: int = 512,
        max_subjects: int = MAX_SUBJECTS,
        gumbel_tau: float = 1.0,
        routing_background_bias: float = 0.0,
        routing_background_bias_single: Optional[float] = None,
        routing_single_region: bool = False,
        routing_subject_gap: int = 0,
        routing_trajectory_weight: float = 0.0,
        routing_trajectory_background_bias: float = 0.0,
        background_rank: int = 0,
        background_gate: bool = False,
        background_token_rank: int = 0,
        background_ip_rank: int = 0,
        background_start: float = 0.0,
    ):
        super().__init__()
        if not isinstance(routing_subject_gap, int) or isinstance(routing_subject_gap, bool) or routing_subject_gap < 0:
            raise ValueError(f"routing_subject_gap must be a whole number of latent positions >= 0, got {routing_subject_gap!r}")
        cross_dim = unet_config["cross_attention_dim"]
        self.reference_net = ReferenceNet(unet_config)
        self.semantic_qformer = QFormer(image_embed_dim, cross_dim, num_semantic_tokens, qformer_dim, qformer_depth, qformer_heads)
        self.routing_qformer = QFormer(image_embed_dim, routing_dim, 1, qformer_dim, qformer_depth, qformer_heads)
        self.layer_conditioning = torch.nn.ModuleDict({
            layer_key(name): CrossAttnConditioning(latent_dim, cdim, inner, routing_dim, router_dim,
                                              trajectory_router=routing_trajectory_weight > 0)
            for name, latent_dim, cdim, inner in cross_attention_layers
        })
        self.background = self._background_module(background_rank) if background_rank else None
        self.state = AnyStoryState(SDXLConditioning(gumbel_tau=gumbel_tau))
        self._processors: List[Union[AnyStorySelfAttnProcessor, AnyStoryCrossAttnProcessor]] = []
        self.eval()  # inference (hard routing) unless a trainer calls .train()

    def to(self, *args, **kwargs):
        """torch's own ``to``: diffusers' warns on every dtype cast about float32-kept modules, and we keep none."""
        if self._keep_in_fp32_modules:
            return super().to(*args, **kwargs)
        return torch.nn.Module.to(self, *args, **kwargs)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, image_embed_dim: int, **config) -> "AnyStorySDXLAdapter":
        """A fresh adapter for ``unet``: ReferenceNet from its weights, semantic projections from its to_k/to_v."""
        layers = cross_attention_layers(unet)
        adapter = cls(dict(unet.config), layers, image_embed_dim, **config)
        adapter.reference_net = ReferenceNet.from_unet(unet)
        modules = dict(unet.named_modules())
        with torch.no_grad():
            for name, *_ in layers:
                cond = adapter.layer_conditioning[layer_key(name)]
                cond.to_k_sem.weight.copy_(modules[name].to_k.weight)
                cond.to_v_sem.weight.copy_(modules[name].to_v.weight)
        return adapter.to(device=unet.device)

    def _background_module(self, rank: int) -> BackgroundConditioning:
        dims = reference_dims(self.reference_net)
        gated = list(dims) + [name for name, *_ in self.config.cross_attention_layers] if self.config.background_gate else []
        ip_dims = {name: (cdim, inner) for name, _, cdim, inner in self.config.cross_attention_layers}
        return BackgroundConditioning(dims, self.config.num_semantic_tokens,
                                      self.config.unet_config["cross_attention_dim"], rank, gated,
                                      self.config.background_token_rank, self.config.background_ip_rank, ip_dims)

    def add_background(self, rank: int = 4, gate: bool = False, token_rank: int = 0,
                       ip_rank: int = 0) -> BackgroundConditioning:
        """Fresh (zero, i.e. subject-like) background-reference parameters: the background stage's start; ``gate``
        adds a learned log-scale per attention layer, ``token_rank`` a low-rank token correction, ``ip_rank``
        low-rank corrections of the semantic key/value projections for the background (``background.py``)."""
        if rank < 1 or token_rank < 0 or ip_rank < 0:
            raise ValueError(f"background rank must be >= 1, token rank and ip rank >= 0, got {rank}, {token_rank} "
                             f"and {ip_rank}")
        weight = next(self.reference_net.parameters())
        self.register_to_config(background_rank=rank, background_gate=bool(gate), background_token_rank=int(token_rank),
                                background_ip_rank=int(ip_rank))
        self.background = self._background_module(rank).to(device=weight.device, dtype=weight.dtype)
        return self.background

    def add_trajectory_routers(self, weight: float, background_bias: float) -> dict:
        """A second router per layer, starting as a copy of the stage-2 one, for the inference decision
        (``router.py``, "Trajectory router"); returns its tensors by name (what ``trajectory.py`` trains)."""
        if weight <= 0:
            raise ValueError(f"the trajectory router's weight must be > 0, got {weight}")
        self.register_to_config(routing_trajectory_weight=float(weight),
                                routing_trajectory_background_bias=float(background_bias))
        for cond in self.layer_conditioning.values():
            cond.trajectory_router = copy.deepcopy(cond.router)
        return {n: p for n, p in self.named_parameters() if ".trajectory_router." in n}

    def attach(self, unet: UNet2DConditionModel) -> None:
        """Install AnyStory's processors on every attention layer of the denoising UNet."""
        names = {name for name, *_ in self.config.cross_attention_layers}
        processors = {}
        for full in unet.attn_processors:
            layer = full[: -len(".processor")]
            if layer.endswith("attn1"):
                processors[full] = AnyStorySelfAttnProcessor(layer, self.state)
            elif layer in names:
                processors[full] = AnyStoryCrossAttnProcessor(layer, self.state, self.layer_conditioning[layer_key(layer)])
            else:
                raise ValueError(f"UNet layer {layer} is unknown to this AnyStory adapter (built for another UNet?)")
        missing = names - {p[: -len(".processor")] for p in processors}
        if missing:
            raise ValueError(f"AnyStory adapter expects cross-attention layers the UNet lacks: {sorted(missing)[:5]}")
        self._processors = list(processors.values())  # before set_attn_processor, which empties the dict
        unet.set_attn_processor(processors)

    def conditioning(self, **values) -> SDXLConditioning:
        """An :class:`SDXLConditioning` of ``values`` (its fields; a name it lacks is a ``TypeError``), with this
        adapter's training mode and, unless given, the routing settings stored with its weights."""
        values.setdefault("gumbel_tau", self.config.gumbel_tau)
        values.setdefault("background_bias", self.config.routing_background_bias)
        values.setdefault("single_region", self.config.routing_single_region)
        values.setdefault("subject_gap", self.config.routing_subject_gap)
        values.setdefault("trajectory_weight", self.config.routing_trajectory_weight)
        values.setdefault("trajectory_background_bias", self.config.routing_trajectory_background_bias)
        return SDXLConditioning(training=self.training, **values)

    def start(self, conditioning: Optional[SDXLConditioning] = None) -> AnyStoryState:
        """Start a call: a fresh :class:`AnyStoryState` for ``conditioning`` (None: nothing conditioned), handed to
        every processor. Nothing of the previous call's state remains (a trainer's backward pass may still re-run
        layers with that one: it is left as it was)."""
        self.state = AnyStoryState(self.conditioning() if conditioning is None else conditioning)
        for processor in self._processors:
            processor.state = self.state
        return self.state

    def save_anystory(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        save_tensors(self.state_dict(), os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt"})
        with open(os.path.join(directory, CONFIG_NAME), "w") as f:
            config = {k: v for k, v in self.config.items() if not k.startswith("_")}
            json.dump({**config, "unet_config": _unet_shape(config["unet_config"])}, f, indent=1)

    @classmethod
    def load_anystory(cls, path: str, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        """Build from ``anystory_config.json`` and load ``anystory.safetensors`` strictly (errors name the keys)."""
        weights, config_file = anystory_files(path)
        try:
            with open(config_file) as f:
                config = json.load(f)
            adapter = cls(**config)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"AnyStory weights: {config_file} is not a valid AnyStory config "
                             f"({type(e).__name__}: {e})") from None
        adapter.load_weights_strict(load_tensors(weights, "AnyStory weights"))
        return adapter.to(device=device, dtype=dtype)

    def load_weights_strict(self, state: dict) -> None:
        check_state_dict(self.state_dict(), state, "AnyStory weights")
        self.load_state_dict(state)
