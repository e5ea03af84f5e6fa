"""Background reference: the scene's backdrop taken from an image, acting only where the router puts background.

The router has always had a background class (the last, N); it carried no condition. ``background=image``
gives it one. The image is encoded like a subject (the same VAE + ReferenceNet pass, with an all-foreground
mask, and the same CLIP + semantic QFormer) and appended after the subjects as one more conditioned class, so
the processors apply it exactly where the router's map says background: its ReferenceNet keys in reference
self-attention, its semantic tokens in the decoupled cross-attention. Separately, and only when the weights' or the
call's ``background_start`` is not 0, its mean latent colour is put into the sampler's starting latent
(:func:`start_offset`, the one unrouted part: no map exists before the first step). Its *routing* token stays the blank
image's, as without a background reference, so the reference itself never moves where subjects go.

What is trained for it (keys ``background.*``; the background stage trains only these, everything else frozen,
so subject fidelity and routing are the shipped model's): a type embedding added to the background's semantic
tokens, and a rank-``r`` correction of its ReferenceNet features in every self-attention layer. Both start at
zero: untrained, the background is encoded exactly as a subject would be. Optionally (``gate``) a learned
log-scale per attention layer: added to the logits of the background's reference keys (self-attention) and
scaling its semantic cross-attention (``exp``), so training can turn down the reference attention (which, as a
subject's, copies texture speckle) and turn up the semantic tokens (which carry the backdrop's colour). They
start at zero, i.e. the plain scale 1. Optionally (``token_rank``) a low-rank correction of the semantic tokens
themselves: the type embedding is the same for every backdrop, so it cannot say which one; the correction can
bring what the image encoder saw of the backdrop into the tokens' text-like space. It starts at zero too.
Optionally (``ip_rank``) the background's own key/value projections in the decoupled cross-attention: a rank-r
correction of the subjects' semantic key/value projections in every cross-attention layer, applied to the
background class's tokens only (IP-Adapter carries an image's colour and style through exactly these
projections, and the subjects' were trained to carry identity, not a backdrop). It starts at zero: untrained,
the background's keys/values are the subjects' projections of its tokens, bit for bit.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import PIL.Image
import torch
from torch import nn

from ..attention_layout import layer_key
from ..errors import InvalidInputError
from ..images import read_rgb


GATE_GAIN = 10.0  # log-scale = GATE_GAIN * parameter: Adam moves a scalar by about lr per step, whatever its gradient

NOT_TRAINED = ("these AnyStory weights have no background reference (it is trained by the 'background' stage: "
               "python -m anystory.training --config <config> --stages background)")


class LowRankDelta(nn.Module):
    """``x -> up(down(x))`` with ``up`` zero: a correction that starts at exactly nothing."""

    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class BackgroundConditioning(nn.Module):
    """The background's own parameters: a semantic type embedding, low-rank ReferenceNet feature corrections,
    (``gated_layers``: attention layer names) a log-scale per layer, (``token_rank``) a low-rank token
    correction, and (``ip_rank``, ``ip_dims``: cross-attention layer -> (token width, inner width)) low-rank
    corrections of the semantic key/value projections."""

    def __init__(self, reference_dims: Dict[str, int], num_tokens: int, token_dim: int, rank: int = 4,
                 gated_layers: Sequence[str] = (), token_rank: int = 0, ip_rank: int = 0,
                 ip_dims: Optional[Dict[str, Tuple[int, int]]] = None):
        super().__init__()
        self.token_embedding = nn.Parameter(torch.zeros(num_tokens, token_dim))
        self.token_down = nn.Linear(token_dim, token_rank, bias=False) if token_rank else None
        self.token_up = nn.Linear(token_rank, token_dim, bias=False) if token_rank else None
        if self.token_up is not None:
            nn.init.zeros_(self.token_up.weight)
        self.reference_down = nn.ModuleDict({layer_key(n): nn.Linear(d, rank, bias=False) for n, d in reference_dims.items()})
        self.reference_up = nn.ModuleDict({layer_key(n): nn.Linear(rank, d, bias=False) for n, d in reference_dims.items()})
        for up in self.reference_up.values():
            nn.init.zeros_(up.weight)
        self.gated_layers = list(gated_layers)
        self.gate = nn.ParameterDict({layer_key(n): nn.Parameter(torch.zeros(())) for n in self.gated_layers})
        ip_dims = ip_dims if ip_rank else {}
        self.ip_key = nn.ModuleDict({layer_key(n): LowRankDelta(c, i, ip_rank) for n, (c, i) in ip_dims.items()})
        self.ip_value = nn.ModuleDict({layer_key(n): LowRankDelta(c, i, ip_rank) for n, (c, i) in ip_dims.items()})
        self.ip_layers = list(ip_dims)

    def log_scales(self) -> Dict[str, torch.Tensor]:
        """{attention layer: its log-scale for the background's conditions} (empty without gates)."""
        return {n: GATE_GAIN * self.gate[layer_key(n)] for n in self.gated_layers}

    def kv_deltas(self) -> Dict[str, Tuple[LowRankDelta, LowRankDelta]]:
        """{cross-attention layer: (key, value) corrections of its semantic projections} (empty without
        ``ip_rank``); the processor adds them to the background class's keys/values."""
        return {n: (self.ip_key[layer_key(n)], self.ip_value[layer_key(n)]) for n in self.ip_layers}

    def tokens(self, semantic: torch.Tensor) -> torch.Tensor:
        """``[b, T, D]`` semantic tokens of the background image -> the background's tokens."""
        out = semantic + self.token_embedding.to(semantic.dtype)
        return out if self.token_up is None else out + self.token_up(self.token_down(semantic))

    def features(self, reference: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{self-attention layer: ``[b, Lr, C]``} ReferenceNet features -> the background's."""
        out = {}
        for name, f in reference.items():
            key = layer_key(name)
            out[name] = f + self.reference_up[key](self.reference_down[key](f)) if key in self.reference_up else f
        return out


def reference_dims(reference_net) -> Dict[str, int]:
    """Width of the features the ReferenceNet gives each self-attention layer."""
    modules = dict(reference_net.unet.named_modules())
    return {name: modules[name].to_q.in_features for name in reference_net.layer_names}


def check_background(pipe, value) -> Optional[PIL.Image.Image]:
    """The pipeline's ``background=`` argument, checked before anything is encoded: ``None``, or the image ready
    to encode. Refused by name: weights without a trained background reference, or an unreadable image."""
    if value is None:
        return None
    if pipe.anystory is None:
        raise InvalidInputError("background: a background reference needs AnyStory weights; call "
                                f"{pipe._anystory_load_hint} first")
    if pipe.anystory.background is None:
        raise InvalidInputError(f"background: {NOT_TRAINED}")
    return read_background(value, pipe.anystory.config.reference_size)


def read_background(value, size: int) -> PIL.Image.Image:
    """The user's background image (any form the image rule reads), centre-cropped square, at ``size``."""
    image = read_rgb(value, "background")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), PIL.Image.BICUBIC)


def background_tensors(pipe, image: PIL.Image.Image, device, dtype) -> dict:
    """``pixels [1, 3, R, R]`` (VAE input) and ``clip_pixels [1, 2, ...]`` (the background, then a blank image)."""
    size = pipe.anystory.config.reference_size
    blank = PIL.Image.new("RGB", (size, size), (255, 255, 255))
    pixels = pipe.image_processor.preprocess([image], height=size, width=size).to(device, dtype)
    clip = pipe.feature_extractor(images=[image, blank], return_tensors="pt").pixel_values.to(device, dtype)
    return {"pixels": pixels, "clip_pixels": clip[None]}


def encode_background(pipe, pixels: torch.Tensor, clip_pixels: torch.Tensor) -> dict:
    """Encode ``[b, 3, R, R]`` background images (CLIP input ``[b, 2, ...]``, the blank image second) as a subject
    is encoded (``pipeline.encode_subjects``, with an all-foreground mask), then apply the background's own
    parameters. Differentiable (the background stage trains it)."""
    adapter = pipe.anystory
    if adapter.background is None:
        raise InvalidInputError(f"background: {NOT_TRAINED}")
    everywhere = torch.ones_like(pixels[:, None, :1])
    encoded = pipe.encode_subjects(pixels[:, None], everywhere, clip_pixels)
    features = {k: f[:, 0] for k, f in encoded["reference_features"].items()}
    return {"reference_features": adapter.background.features(features),
            "semantic_tokens": adapter.background.tokens(encoded["semantic_tokens"][:, 0]),
            "semantic_uncond_tokens": encoded["semantic_uncond_tokens"][:, 0],
            "routing_token": encoded["routing_tokens"][:, 1],
            "log_scales": adapter.background.log_scales(),
            "kv_deltas": adapter.background.kv_deltas()}


def start_offset(pipe, pixels: torch.Tensor, strength: float) -> Optional[torch.Tensor]:
    """``strength`` x the per-channel mean ``[b, C, 1, 1]`` of the background image's scaled VAE latent: the clean
    signal the sampler's first latent should carry (``None`` at 0).

    Why: at the first sampling timestep the training noising still leaks the image's per-channel latent mean
    (``sqrt(alpha_bar_T)`` of it; in the miniature it tells the backdrop kinds apart), so the model reads the
    backdrop's colour from the noisy latent rather than from any condition; sampling starts from noise alone, whose
    mean is random, and the backdrop comes out an average grey whatever the reference. Adding the reference's mean
    to the starting latent (``pipeline_sdxl.prepare_latents``) gives the model what training showed it. It acts on
    the whole starting latent: there is no routing map before the first step."""
    if not strength:
        return None
    return strength * pipe.encode_vae(pixels).mean(dim=(2, 3), keepdim=True)


def with_background(encoded: Optional[dict], background: dict) -> dict:
    """The subjects' encoding (``pipeline.encode_subjects``; ``None`` for no subjects) with the background appended
    as the last conditioned class, with its per-layer log-scales and key/value corrections. Routing tokens are the subjects' plus the blank
    image's, as without it."""
    if encoded is None:
        return {"num_subjects": 0,
                "reference_features": {k: f[:, None] for k, f in background["reference_features"].items()},
                "semantic_tokens": background["semantic_tokens"][:, None],
                "semantic_uncond_tokens": background["semantic_uncond_tokens"][:, None],
                "routing_tokens": background["routing_token"][:, None],
                "background_log_scales": background["log_scales"],
                "background_kv_deltas": background["kv_deltas"]}
    out = dict(encoded, background_log_scales=background["log_scales"], background_kv_deltas=background["kv_deltas"])
    out["reference_features"] = {k: torch.cat([f, _batch_like(background["reference_features"][k], f)[:, None]], 1)
                                 for k, f in encoded["reference_features"].items()}
    for name in ("semantic_tokens", "semantic_uncond_tokens"):
        out[name] = torch.cat([encoded[name], _batch_like(background[name], encoded[name])[:, None]], 1)
    return out


def _batch_like(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.shape[0] == like.shape[0] else t.expand(like.shape[0], *t.shape[1:])
