"""Background reference on SDXL (``background=image``): it acts only where the router puts background, in both
processors; without it nothing changes; bad input is refused up front; its weights save and load."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from anystory import Subject
from anystory.errors import InvalidInputError
from anystory.sdxl.attention_processors import AnyStoryState, SDXLConditioning
from anystory.sdxl.background import background_tensors, encode_background, read_background, with_background
from anystory.subjects import prepare_subjects
from helpers.routing import noise_image, tiny_pipe

PROMPT = "a red striped star on sand"


def _run(pipe, subjects=(), **kw):
    return pipe(PROMPT, subjects=list(subjects), num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw)


@pytest.fixture(scope="module")
def pipes():
    """(the tiny pipeline without background parameters, the same one with them, gates, token correction and
    key/value projections included; trained-like, i.e. nonzero)."""
    plain, with_bg = tiny_pipe(), tiny_pipe()
    torch.manual_seed(1)
    with_bg.anystory.add_background(2, gate=True, token_rank=2, ip_rank=2)
    with torch.no_grad():
        for p in with_bg.anystory.background.parameters():
            p.normal_(0, 0.05)
    return plain, with_bg


def test_background_none_changes_nothing(pipes):
    """Background parameters present but ``background=None``: every output bit-identical to weights without them."""
    plain, with_bg = pipes
    for subjects in ([], [Subject(noise_image(1))], [Subject(noise_image(1)), Subject(noise_image(2))]):
        assert np.array_equal(_run(plain, subjects).images, _run(with_bg, subjects).images)


def test_background_conditions_the_image(pipes):
    _, pipe = pipes
    alone = _run(pipe, [Subject(noise_image(1))]).images
    out = _run(pipe, [Subject(noise_image(1))], background=noise_image(7), return_routing_maps=True)
    assert np.abs(out.images - alone).max() > 1e-3
    assert out.routing_maps[-1].shape[1] == 2  # the map still has N subjects + background
    other = _run(pipe, [Subject(noise_image(1))], background=noise_image(8)).images
    assert np.abs(out.images - other).max() > 1e-3, "another background image must give another output"
    # no subjects: the background takes every position
    only = _run(pipe, background=noise_image(7), return_routing_maps=True)
    assert all(bool((m[:, -1] == 1).all()) for m in only.routing_maps)
    assert np.abs(only.images - _run(pipe).images).max() > 1e-3


def _capture_attention_inputs(pipe, encoded, count, lat_hw, maps):
    """One UNet pass with the subjects' conditions; returns {attention module: (hidden, encoder_hidden)} as each
    layer received them."""
    captured = {}

    def keep(name, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.setdefault(name, (module, hidden, kwargs.get("encoder_hidden_states")))

    hooks = [module.register_forward_pre_hook(lambda m, a, k, name=name: keep(name, m, a, k), with_kwargs=True)
             for name, module in pipe.unet.named_modules() if name.endswith(("attn1", "attn2"))]
    try:
        pipe.start_anystory_call(pipe.anystory.conditioning(**encoded, scales=torch.ones(count),
                                                            reference_scales=torch.ones(count), latent_hw=lat_hw,
                                                            forced_maps=maps))
        latents = torch.randn(1, pipe.unet.config.in_channels, *lat_hw, generator=torch.Generator().manual_seed(0))
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[lat_hw[0] * 8, lat_hw[1] * 8, 0, 0, lat_hw[0] * 8, lat_hw[1] * 8]], dtype=embeds.dtype)
        pipe.unet(latents, torch.tensor([500]), embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    finally:
        for h in hooks:
            h.remove()
    return captured


@torch.no_grad()
def test_background_acts_only_at_background_positions_in_every_layer(pipes):
    """Forced map: subject on the left, background on the right. Each attention layer (reference self-attention
    and semantic cross-attention) given the same input, with and without the background reference: equal at the
    subject's positions, different at the background's."""
    _, pipe = pipes
    size = pipe.anystory.config.reference_size
    encoded = pipe.encode_subjects(**pipe.subject_tensors(prepare_subjects([Subject(noise_image(1))]), "cpu",
                                                          torch.float32))
    background = encode_background(pipe, **background_tensors(pipe, read_background(noise_image(7), size), "cpu",
                                                              torch.float32))
    lat_hw = (8, 8)
    maps = torch.zeros(2, *lat_hw)
    maps[0, :, :4], maps[1, :, 4:] = 1, 1
    inputs = _capture_attention_inputs(pipe, encoded, 1, lat_hw, maps)
    assert any(n.endswith("attn1") for n in inputs) and any(n.endswith("attn2") for n in inputs)
    adapter = pipe.anystory
    for name, (attn, hidden, context) in inputs.items():
        outs = []
        for conditions, background_on in ((encoded, False), (with_background(encoded, background), True)):
            count = 2 if background_on else 1
            pipe.start_anystory_call(adapter.conditioning(
                **conditions, background=background_on, scales=torch.ones(count), reference_scales=torch.ones(count),
                latent_hw=lat_hw, forced_maps=maps))
            outs.append(attn.processor(attn, hidden, encoder_hidden_states=context))
        pipe.start_anystory_call()
        h, w = AnyStoryState(SDXLConditioning(latent_hw=lat_hw)).layer_hw(hidden.shape[1])
        region = torch.nn.functional.interpolate(maps[None], size=(h, w), mode="nearest")[0, 1].flatten().bool()
        diff = (outs[0] - outs[1]).abs().amax(dim=(0, 2))
        assert diff[~region].max() <= 1e-6, f"{name}: the background reference reached a subject position"
        assert diff[region].min() > 0, f"{name}: the background reference did not act at a background position"


def test_bad_background_is_refused_up_front(pipes, tmp_path):
    plain, pipe = pipes
    with pytest.raises(InvalidInputError, match="background: file not found"):
        _run(pipe, [Subject(noise_image(1))], background=str(tmp_path / "missing.png"))
    with pytest.raises(InvalidInputError, match="background: .*transparent"):
        _run(pipe, background=np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(InvalidInputError, match="no background reference"):
        _run(plain, [Subject(noise_image(1))], background=noise_image(7))
    with pytest.raises(ValueError, match="rank"):
        plain.anystory.add_background(0)


def test_background_weights_round_trip(pipes, tmp_path):
    plain, pipe = pipes
    pipe.save_anystory_weights(str(tmp_path / "w"))
    with safe_open(str(tmp_path / "w" / "anystory.safetensors"), "pt") as f:
        keys = set(f.keys())
    ours = {k for k in keys if k.startswith("background.")}
    assert "background.token_embedding" in ours and len(ours) > 1
    assert json.loads((tmp_path / "w" / "anystory_config.json").read_text())["background_rank"] == 2
    plain.save_anystory_weights(str(tmp_path / "old"))
    config = json.loads((tmp_path / "old" / "anystory_config.json").read_text())
    config.pop("background_rank", None)  # weights written before the background reference existed
    (tmp_path / "old" / "anystory_config.json").write_text(json.dumps(config))
    assert tiny_pipe().load_anystory_weights(str(tmp_path / "old")).background is None
    expected = _run(pipe, [Subject(noise_image(1))], background=noise_image(7)).images
    loaded = tiny_pipe()
    loaded.load_anystory_weights(str(tmp_path / "w"))
    assert np.array_equal(_run(loaded, [Subject(noise_image(1))], background=noise_image(7)).images, expected)
