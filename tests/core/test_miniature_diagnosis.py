"""The miniature diagnosis's own pieces: its held-out cases, the VAE round trip, a candidate base's weights, the
summary's arithmetic and its argument checks."""
import numpy as np
import pytest
import torch

from anystory.data.synthetic import IDENTITIES, SyntheticWorld
from anystory.sdxl.pipeline_sdxl import AnyStorySDXLPipeline
from anystory.sdxl.tiny_sdxl import tiny_sdxl_components
from anystory.weights import save_tensors
from benchmarks.miniature_diagnosis import load_base, markdown, one_subject_cases, parse, summarise, vae_roundtrip


def test_one_subject_cases_are_each_identity_alone_on_its_background():
    world = SyntheticWorld(424242, image_size=32)
    cases = one_subject_cases(world, 2, offset=500)
    assert [c[0] for c in cases] == list(range(500, 532))
    assert [c[1] for c in cases] == [i for i in IDENTITIES for _ in range(2)]
    for index, identity, bg, scene in cases[:4]:
        assert scene.identities == [identity] and scene.background == bg and scene.masks.shape == (1, 32, 32)
        assert scene.masks[0].sum() > 20
    assert len({c[2] for c in cases}) == len(world.config.backgrounds)


def test_vae_roundtrip_returns_an_image_of_the_same_size():
    pipe = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0))
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    out = vae_roundtrip(pipe, image)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_load_base_applies_a_checkpoints_ema_tensors_and_refuses_ones_that_do_not_fit(tmp_path):
    AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0)).save_pretrained(tmp_path / "base")
    other = tiny_sdxl_components(seed=5)
    ema = {f"{name}.{n}": t for name in ("unet", "text_encoder", "text_encoder_2")
           for n, t in other[name].state_dict().items()}
    save_tensors(ema, str(tmp_path / "ema.safetensors"))
    plain = load_base(str(tmp_path / "base"), None)
    loaded = load_base(str(tmp_path / "base"), str(tmp_path / "ema.safetensors"))
    key = "conv_in.weight"
    assert torch.equal(loaded.unet.state_dict()[key], other["unet"].state_dict()[key])
    assert not torch.equal(plain.unet.state_dict()[key], loaded.unet.state_dict()[key])
    save_tensors({"unet.not_a_layer": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not fit"):
        load_base(str(tmp_path / "base"), str(tmp_path / "bad.safetensors"))


def _row(identity, shape):
    return {"identity": [identity], "shape": [shape], "colour": [True], "texture": [False], "found": [True]}


def test_summary_reads_the_fraction_right_and_the_table_prints_it():
    rows = {"base": [_row(True, True), _row(False, True), _row(False, False), _row(False, True)]}
    res = summarise(rows)
    assert res["base"]["units"] == 4 and res["base"]["identity"]["value"] == 0.25
    assert res["base"]["shape"]["value"] == 0.75 and res["base"]["colour"]["value"] == 1.0
    report = {"command": "x", "date": "d", "commit": "c", "seconds_total": 1.0, "steps": 20, "guidance": 3.0,
              "model": "m", "base": None, "base_weights": None, "vae": None, "results": res}
    table = markdown(report)
    assert "| base model, prompt naming the identity, no reference | 4 | 0.25 [" in table and "0.75 [" in table


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse(["--parts", "vae,nonsense"])
    with pytest.raises(SystemExit):
        parse(["--base-weights", "ema.safetensors"])
    assert parse(["--parts", "vae,base"])[1] == ["vae", "base"]


def test_swapped_changes_exactly_one_attribute():
    from benchmarks.miniature_diagnosis import swapped

    star = IDENTITIES[0]
    for attribute, index in (("shape", 0), ("colour", 1), ("texture", 2)):
        other = swapped(star, attribute)
        changed = [i for i in range(3) if other.labels[i] != star.labels[i]]
        assert changed == [index]


def test_caption_sensitivity_is_zero_for_a_model_that_ignores_its_caption():
    from benchmarks.miniature_diagnosis import caption_sensitivity

    pipe = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0))
    world = SyntheticWorld(424242, image_size=32)
    cases = one_subject_cases(world, 1, offset=0)[:2]
    real = caption_sensitivity(pipe, cases)
    assert len(real) == 2 and set(real[0]) == {"shape", "colour", "texture", "generic", "text_shape", "text_colour",
                                                "text_texture"}
    assert all(r[f"text_{a}"] > 0 for r in real for a in ("shape", "colour", "texture"))
    assert any(abs(v) > 1e-6 for r in real for v in r.values())  # an untrained UNet still reads its text
    with torch.no_grad():
        for block in pipe.unet.modules():
            if hasattr(block, "attn2") and block.attn2 is not None:
                block.attn2.to_out[0].weight.zero_()
                block.attn2.to_out[0].bias.zero_()
        pipe.unet.add_embedding.linear_1.weight.zero_()  # the pooled text embedding enters here too
    blind = caption_sensitivity(pipe, cases)
    assert all(abs(r[a]) < 1e-5 for r in blind for a in ("shape", "colour", "texture", "generic"))


def test_pca_roundtrip_with_every_code_is_the_render_and_with_few_codes_is_not():
    from benchmarks.miniature_diagnosis import pca_roundtrips

    cases = one_subject_cases(SyntheticWorld(424242, image_size=32), 1, offset=0)[:3]
    out = pca_roundtrips(32, (2, 48), cases)
    for full, case in zip(out[48], cases):
        assert np.abs(full.astype(int) - case[3].image.astype(int)).max() <= 1
    assert max(np.abs(a.astype(int) - c[3].image.astype(int)).max() for a, c in zip(out[2], cases)) > 20


def test_load_vae_takes_a_checkpoints_decoder_and_keeps_the_encoder(tmp_path):
    from benchmarks.miniature_diagnosis import load_vae

    vae = tiny_sdxl_components(seed=0)["vae"]
    other = tiny_sdxl_components(seed=7)["vae"]
    save_tensors({f"vae.{n}": t for n, t in other.state_dict().items() if n.startswith(("decoder.", "post_quant_conv."))},
                 str(tmp_path / "trainable.safetensors"))
    loaded = load_vae(str(tmp_path / "trainable.safetensors"), vae)
    assert torch.equal(loaded.decoder.conv_in.weight, other.decoder.conv_in.weight)
    assert torch.equal(loaded.encoder.conv_in.weight, vae.encoder.conv_in.weight)
    assert not torch.equal(vae.decoder.conv_in.weight, other.decoder.conv_in.weight)  # the model's own is untouched
    save_tensors({"unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not a decoder"):
        load_vae(str(tmp_path / "bad.safetensors"), vae)


def test_write_report_writes_both_files_and_prints_the_table(tmp_path, capsys):
    import json

    from benchmarks.common import write_report

    write_report(str(tmp_path / "out"), {"a": 1}, "| t |\n")
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == {"a": 1}
    assert (tmp_path / "out" / "results.md").read_text() == "| t |\n"
    assert "| t |" in capsys.readouterr().out


def test_clip_rows_read_the_nearest_of_the_192_names_attribute_by_attribute():
    """An image encoder that always embeds like the first named identity's name: its own references read right on
    every attribute, the others right exactly where they share an attribute with it."""
    import types

    import torch.nn.functional as F

    from benchmarks.miniature_diagnosis import clip_rows

    base = AnyStorySDXLPipeline(**tiny_sdxl_components(seed=0))
    first = IDENTITIES[0]
    tokens = base.tokenizer_2([first.name], padding="max_length", max_length=base.tokenizer_2.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        embed = F.normalize(base.text_encoder_2(tokens).text_embeds, dim=-1)

    class Constant(torch.nn.Module):
        config = base.image_encoder.config

        def forward(self, pixels):
            return types.SimpleNamespace(image_embeds=embed.expand(len(pixels), -1))

    base.image_encoder = Constant()
    world = SyntheticWorld(424242, image_size=32)
    cases = one_subject_cases(world, 1, offset=700)
    rows = clip_rows(base, world, cases)
    assert len(rows) == len(IDENTITIES) and rows[0]["identity"] == [True]
    for (_, identity, _, _), row in zip(cases, rows):
        assert row["shape"] == [identity.shape == first.shape] and row["colour"] == [identity.colour == first.colour]
        assert row["texture"] == [identity.texture == first.texture] and row["identity"] == [identity == first]


def test_routed_masks_grow_each_subject_as_stage_one_routes_and_zero_keeps_them():
    from benchmarks.miniature_diagnosis import routed_masks
    masks = list(SyntheticWorld(0).scene(4, count=2).masks)
    assert routed_masks(masks, 0) is masks
    grown = routed_masks(masks, 3)
    assert len(grown) == 2 and all(g.dtype == bool and g.shape == m.shape for g, m in zip(grown, masks))
    assert all((g >= m).all() and g.sum() > m.sum() for g, m in zip(grown, masks))
    assert parse(["--gt-dilation", "6"])[0].gt_dilation == 6 and parse([])[0].gt_dilation == 0
