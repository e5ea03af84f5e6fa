"""The background reference's learned gate (``background_gate``): a log-scale per attention layer that acts as the
background's reference and semantic scales would, on the sparse and the dense reference attention alike, and
that trains (its gradient reaches every layer's gate through both paths); and the optional low-rank correction of
the background's semantic tokens (``background_token_rank``)."""
import math

import pytest
import torch

import anystory.sdxl.attention_processors as processors
from anystory.sdxl.background import GATE_GAIN
from anystory.training.background import backdrop_weight
from helpers.background import subject_and_background
from helpers.routing import tiny_pipe

LAT_HW = (8, 8)


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipe()
    torch.manual_seed(3)
    p.anystory.add_background(2, gate=True)
    with torch.no_grad():
        for name, param in p.anystory.background.named_parameters():
            if not name.startswith("gate."):
                param.normal_(0, 0.05)
    return p


def _maps() -> torch.Tensor:
    maps = torch.zeros(2, *LAT_HW)
    maps[0, :, :4], maps[1, :, 4:] = 1, 1  # subject on the left, background on the right
    return maps


def _unet_out(pipe, encoded, scale: float = 1.0) -> torch.Tensor:
    """One UNet pass with one subject and the background (forced maps); the background's scales are ``scale``."""
    pipe.start_anystory_call(pipe.anystory.conditioning(
        **encoded, background=True, scales=torch.tensor([1.0, scale]), reference_scales=torch.tensor([1.0, scale]),
        latent_hw=LAT_HW, forced_maps=_maps()))
    try:
        latents = torch.randn(1, pipe.unet.config.in_channels, *LAT_HW, generator=torch.Generator().manual_seed(0))
        embeds, _, pooled, _ = pipe.encode_prompt("a star", device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=embeds.dtype)
        return pipe.unet(latents, torch.tensor([500]), embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    finally:
        pipe.start_anystory_call()


def _set_gates(pipe, log_scale: float) -> None:
    with torch.no_grad():
        for g in pipe.anystory.background.gate.values():
            g.fill_(log_scale / GATE_GAIN)


@pytest.mark.parametrize("sparse", [True, False])
def test_gate_acts_as_the_background_scales(pipe, monkeypatch, sparse):
    """Every layer's gate at log-scale s equals gates at 0 with the background's scales exp(s); s = 0 is scale 1."""
    monkeypatch.setattr(processors, "sparse_pays", lambda q: sparse)
    gates = pipe.anystory.background.log_scales()
    assert len(gates) == len(pipe.anystory.config.cross_attention_layers) + len(pipe.anystory.reference_net.layer_names)
    with torch.no_grad():
        _set_gates(pipe, 0.0)
        plain = _unet_out(pipe, subject_and_background(pipe))
        _set_gates(pipe, -1.5)
        gated = _unet_out(pipe, subject_and_background(pipe))
        _set_gates(pipe, 0.0)
        scaled = _unet_out(pipe, subject_and_background(pipe), scale=math.exp(-1.5))
    assert (gated - plain).abs().max() > 1e-4, "the gate changes nothing"
    assert torch.allclose(gated, scaled, atol=1e-5), (gated - scaled).abs().max()


def test_gate_trains_on_both_paths(pipe, monkeypatch):
    """The gate is a tensor in the processors (not a Python number), so every layer's gate gets a gradient, and the
    sparse and dense reference attention give the same one."""
    grads = []
    for sparse in (True, False):
        monkeypatch.setattr(processors, "sparse_pays", lambda q, s=sparse: s)
        _set_gates(pipe, 0.3)
        pipe.anystory.background.zero_grad()
        _unet_out(pipe, subject_and_background(pipe)).square().mean().backward()
        grads.append({k: g.grad.clone() for k, g in pipe.anystory.background.gate.items()})
    pipe.anystory.background.zero_grad()
    _set_gates(pipe, 0.0)
    sparse, dense = grads
    assert set(sparse) == set(dense) and all(bool(g != 0) for g in sparse.values())
    assert all(torch.allclose(sparse[k], dense[k], rtol=1e-3, atol=1e-7) for k in sparse)


def test_weights_without_gate_have_no_gate_parameters():
    p = tiny_pipe()
    p.anystory.add_background(2)
    assert not p.anystory.config.background_gate and p.anystory.background.log_scales() == {}
    assert not any(k.startswith("background.gate") for k in p.anystory.state_dict())


def test_backdrop_weight():
    targets = torch.zeros(2, 3, 16, 16)
    targets[:, 0, :8], targets[:, 2, 8:] = 1, 1  # object on top, backdrop below
    assert backdrop_weight(targets, (8, 8), 1.0) is None
    w = backdrop_weight(targets, (8, 8), 3.0)
    assert w.shape == (2, 1, 8, 8)
    assert torch.allclose(w.mean(dim=(2, 3)), torch.ones(2, 1))
    assert torch.allclose(w[:, :, 4:], 3 * w[:, :, :4])


def test_token_correction_starts_at_zero_and_depends_on_the_image():
    p = tiny_pipe()
    p.anystory.add_background(2, token_rank=3)
    assert p.anystory.config.background_token_rank == 3
    background = p.anystory.background
    semantic = torch.randn(2, 4, background.token_embedding.shape[1])
    assert torch.equal(background.tokens(semantic), semantic)  # untrained: the subject encoding
    with torch.no_grad():
        background.token_up.weight.normal_()
    delta = background.tokens(semantic) - semantic
    assert not torch.allclose(delta[0], delta[1]), "the correction must depend on the image, unlike the type embedding"
    with pytest.raises(ValueError, match="token rank"):
        p.anystory.add_background(2, token_rank=-1)
