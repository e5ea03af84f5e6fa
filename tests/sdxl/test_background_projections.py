"""The background's own semantic key/value projections (``background_ip_rank``): off, nothing is added; untrained
(zero corrections), every output equals the subjects' projections bit for bit; trained-like, they change the
decoupled cross-attention at the background's positions only, they train, and they ship through
``merge_background``."""
import numpy as np
import pytest
import torch

from anystory import Subject
from anystory.training.merge_background import merge_background
from helpers.background import subject_and_background
from helpers.routing import noise_image, tiny_pipe

LAT_HW = (8, 8)


def _run(pipe, **kw):
    return pipe("a red star on sand", subjects=[Subject(noise_image(1))], num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def _background_pipe(ip_rank: int, source=None):
    """A tiny pipeline with trained-like (nonzero) background parameters; ``source``'s copied where it has them."""
    p = tiny_pipe()
    torch.manual_seed(5)
    p.anystory.add_background(2, gate=True, token_rank=2, ip_rank=ip_rank)
    with torch.no_grad():
        for name, param in p.anystory.background.named_parameters():
            if not name.startswith("ip_"):
                param.normal_(0, 0.05)
    if source is not None:
        missing, unexpected = p.anystory.background.load_state_dict(source.anystory.background.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("ip_") for k in missing)
    return p


def _perturb_projections(pipe, std: float = 0.3) -> None:
    with torch.no_grad():
        for name, param in pipe.anystory.background.named_parameters():
            if name.startswith("ip_"):
                param.normal_(0, std)


def test_ip_rank_zero_adds_nothing():
    p = tiny_pipe()
    p.anystory.add_background(2)
    assert p.anystory.config.background_ip_rank == 0 and p.anystory.background.kv_deltas() == {}
    assert not any(k.startswith("background.ip_") for k in p.anystory.state_dict())
    with pytest.raises(ValueError, match="ip rank"):
        p.anystory.add_background(2, ip_rank=-1)


def test_untrained_projections_are_the_subjects_bit_for_bit():
    """Zero corrections (how training starts) give the images of weights without them, with and without CFG."""
    without = _background_pipe(0)
    with_zero = _background_pipe(3, source=without)
    layers = {name for name, *_ in with_zero.anystory.config.cross_attention_layers}
    assert set(with_zero.anystory.background.kv_deltas()) == layers
    for guidance in (1.0, 5.0):
        expected = _run(without, background=noise_image(7), guidance_scale=guidance)
        assert np.array_equal(_run(with_zero, background=noise_image(7), guidance_scale=guidance), expected)
    _perturb_projections(with_zero)
    assert np.abs(_run(with_zero, background=noise_image(7)) - expected).max() > 1e-3, "the projections do nothing"
    assert np.array_equal(_run(with_zero), _run(without)), "without a background reference they must not act"


def test_projections_act_only_at_background_positions_and_train():
    """Forced map (subject left, background right): each cross-attention layer, same input, zero vs trained-like
    corrections: equal at the subject's positions, different at every background position; the loss's gradient
    reaches every layer's key and value corrections."""
    pipe = _background_pipe(3)
    modules = dict(pipe.unet.named_modules())
    maps = torch.zeros(2, *LAT_HW)
    maps[0, :, :4], maps[1, :, 4:] = 1, 1
    background_positions = maps[1].flatten().bool()
    gen = torch.Generator().manual_seed(0)
    for name, latent_dim, cross_dim, _ in pipe.anystory.config.cross_attention_layers:
        attn = modules[name]
        hidden = torch.randn(1, LAT_HW[0] * LAT_HW[1], latent_dim, generator=gen)
        context = torch.randn(1, 6, cross_dim, generator=gen)
        outs = []
        for perturbed in (False, True):
            if perturbed:
                _perturb_projections(pipe)
            else:
                with torch.no_grad():
                    for delta in pipe.anystory.background.ip_key.values():
                        delta.up.weight.zero_()
                    for delta in pipe.anystory.background.ip_value.values():
                        delta.up.weight.zero_()
            pipe.start_anystory_call(pipe.anystory.conditioning(
                **subject_and_background(pipe), background=True, scales=torch.ones(2), reference_scales=torch.ones(2),
                latent_hw=LAT_HW, forced_maps=maps))
            outs.append(attn.processor(attn, hidden, encoder_hidden_states=context))
        pipe.start_anystory_call()
        diff = (outs[0] - outs[1]).detach().abs().amax(dim=(0, 2))
        assert diff[~background_positions].max() == 0, f"{name}: the projections reached a subject position"
        assert diff[background_positions].min() > 0, f"{name}: the projections did not act on the background"
        pipe.anystory.background.zero_grad()
        outs[1].square().mean().backward()
        key = pipe.anystory.background.ip_key[name.replace(".", "_")]
        value = pipe.anystory.background.ip_value[name.replace(".", "_")]
        assert all(m.up.weight.grad.abs().sum() > 0 for m in (key, value)), f"{name}: no gradient"


def test_projections_ship_through_merge(tmp_path):
    trained, shipped = _background_pipe(3), tiny_pipe()
    _perturb_projections(trained)
    trained.save_anystory_weights(str(tmp_path / "stage"))
    shipped.save_anystory_weights(str(tmp_path / "ship"))
    keys = merge_background(str(tmp_path / "stage"), str(tmp_path / "ship"), torch.float32)
    assert any(k.startswith("background.ip_value.") for k in keys)
    loaded = tiny_pipe()
    loaded.load_anystory_weights(str(tmp_path / "ship"))
    assert loaded.anystory.config.background_ip_rank == 3
    assert np.array_equal(_run(loaded, background=noise_image(7)), _run(trained, background=noise_image(7)))
