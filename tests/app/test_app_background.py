"""The Generate tab's background reference: passed through to the pipeline, changes the picture, and is refused by
the field's name (bad file, bad strength, FLUX, weights without it) before anything is encoded."""
import numpy as np
import pytest
from PIL import Image

from anystory.app import generation
from anystory.app.background import background_call
from anystory.app.generate_tab import run_generation
from anystory.app.inputs import InputError, SubjectSlot
from anystory.app.models import ModelHandle
from anystory.presets import Preset
from helpers.background import miniature_with_background
from anystory.subjects import AlphaOrWholeImageSegmenter

STAR = "assets/examples/red_striped_star.png"
SEG = AlphaOrWholeImageSegmenter()


@pytest.fixture(scope="module")
def mini():
    return ModelHandle("miniature", miniature_with_background(), "cpu", "test")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    from anystory.data.synthetic import SyntheticWorld, WorldConfig

    path = tmp_path_factory.mktemp("bg") / "night.png"
    SyntheticWorld(7, WorldConfig(image_size=64, reference_size=64)).background_reference("night", 0).save(path)
    return str(path)


def test_the_handler_passes_the_background_and_its_strength_to_the_pipeline(mini, night, monkeypatch):
    seen = []
    real = generation._run_pipeline

    def spy(handle, call, what):
        seen.append(call)
        return real(handle, call, what)

    monkeypatch.setattr(generation, "_run_pipeline", spy)
    import torch
    torch.set_num_threads(1)
    slots = [SubjectSlot(STAR, name="star")]
    plain = run_generation(mini, SEG, slots, "a red striped star", seed=3, steps=2)
    with_bg = run_generation(mini, SEG, slots, "a red striped star", seed=3, steps=2, background=night,
                             background_start="0.5")
    assert "background" not in seen[0] and "background_start" not in seen[0]
    assert isinstance(seen[1]["background"], Image.Image) and seen[1]["background_start"] == 0.5
    assert np.abs(np.asarray(plain.images[0], np.int16) - np.asarray(with_bg.images[0], np.int16)).mean() > 1.0
    assert "background reference" in with_bg.info and "background reference" not in plain.info


@pytest.mark.parametrize("image, strength, message", [
    ("nowhere.png", None, "Background image: file not found"),
    (STAR, "-1", "Background image strength must be"),
    (STAR, "lots", "Background image strength"),
    (None, "nan", "Background image strength"),
])
def test_bad_background_input_names_the_field(mini, image, strength, message):
    with pytest.raises(InputError, match=message):
        background_call(mini, image, strength)


def test_a_text_file_as_background_is_named(mini, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="^Background image: "):
        background_call(mini, str(tmp_path / "notes.png"))


def test_flux_and_weights_without_it_refuse_by_name_before_any_encoding(handle, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(generation, "_run_pipeline", never)
    flux = ModelHandle("flux", object(), "cpu", "test", defaults=Preset(3, 3.5, 32, 32, 64, 16))
    with pytest.raises(InputError, match="Background image: the background reference is SDXL-only"):
        run_generation(flux, SEG, [SubjectSlot(STAR)], "a star", steps=1, background=STAR)
    with pytest.raises(InputError, match="Background image: the loaded weights have no background reference"):
        run_generation(handle, SEG, [SubjectSlot(STAR)], "a star", steps=1, background=STAR)  # the tiny model
    assert background_call(handle, None) == {}  # no image: nothing is asked of the model


def test_the_page_has_the_background_collapsed_and_wires_it_to_generate(handle, monkeypatch):
    """One collapsed accordion with the image and its strength; Generate hands both to the run."""
    import app
    from anystory.matting import LazyBiRefNetSegmenter

    blocks = app.build_demo(handle, LazyBiRefNetSegmenter())
    config = blocks.get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in config["components"]}
    assert by_id["background-reference"]["props"]["open"] is False
    assert "background-image" in by_id and "background-strength" in by_id
    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise InputError("stop here")

    monkeypatch.setattr(app.generate_tab, "run_generation", record)
    monkeypatch.setattr(app.gr, "Warning", lambda *a, **k: None)
    handler = next(fn.fn for fn in blocks.fns.values() if getattr(fn.fn, "__name__", "") == "on_generate")
    slot = [STAR, None, None, "star", 1.0, 1.0, "", None]
    list(handler(None, 1, "a star", "", 1, 2, 3.0, 64, 64, 1, STAR, 0.7, *(slot * handle.max_subjects)))
    assert seen["background"] == STAR and seen["background_start"] == 0.7
