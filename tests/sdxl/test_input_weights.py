"""Weights files a user brings: refused at load with the file or tensor named, never inside a later matmul."""
import os

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from anystory.sdxl.adapter_sdxl import WEIGHTS_NAME
from anystory.loading import ModelUnavailableError, load_sdxl_anystory
from anystory.sdxl.pipeline_sdxl import AnyStorySDXLPipeline
from anystory.sdxl.tiny_sdxl import TINY_ANYSTORY_CONFIG, TinySpec, tiny_sdxl_components

WIDER = TinySpec(block_out_channels=(32, 48), attention_head_dim=(2, 3))  # same layer names, other widths


def _pipe(spec=TinySpec()):
    pipe = AnyStorySDXLPipeline(**tiny_sdxl_components(spec=spec))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("anystory"))
    pipe = _pipe()
    torch.manual_seed(0)
    pipe.init_anystory(**TINY_ANYSTORY_CONFIG)
    pipe.save_anystory_weights(folder)
    return folder


def test_weights_for_a_unet_of_other_widths_are_refused_at_load(weights):
    pipe = _pipe(WIDER)
    with pytest.raises(ValueError, match=r"do not fit this pipeline's UNet: tensor reference_net\.\S+ has shape "
                                         r"\(64,\) in the weights, this UNet needs \(48,\)"):
        pipe.load_anystory_weights(weights)
    assert pipe.anystory is None  # nothing half-installed
    assert _pipe().load_anystory_weights(weights) is not None  # the right UNet takes them


def test_a_truncated_weights_file_is_named(weights, tmp_path):
    for name in ("anystory_config.json", WEIGHTS_NAME):
        with open(os.path.join(weights, name), "rb") as f:
            blob = f.read()
        (tmp_path / name).write_bytes(blob if name.endswith(".json") else blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=f"cannot read {tmp_path / WEIGHTS_NAME} .*truncated"):
        _pipe().load_anystory_weights(str(tmp_path))
    (tmp_path / "anystory_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="anystory_config.json is not a valid AnyStory config"):
        _pipe().load_anystory_weights(str(tmp_path))


def test_missing_weights_folder_is_named_before_anything_loads(tmp_path):
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(ModelUnavailableError, match=f"AnyStory weights not found at '{missing}'"):
        load_sdxl_anystory(missing, base_model=str(tmp_path / "no_base"), image_encoder=(str(tmp_path / "x"), None))
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        _pipe().load_anystory_weights(missing)


def test_image_encoder_as_a_folder_without_subfolder(weights, tmp_path):
    parts = tiny_sdxl_components()
    encoder = parts.pop("image_encoder")
    parts.pop("feature_extractor")
    StableDiffusionXLPipeline(**parts).save_pretrained(str(tmp_path / "base"))
    encoder.save_pretrained(str(tmp_path / "encoder"))
    pipe = load_sdxl_anystory(weights, str(tmp_path / "base"), image_encoder=(str(tmp_path / "encoder"), None))
    assert pipe.anystory is not None and pipe.image_encoder.config.hidden_size == encoder.config.hidden_size


def test_written_weights_name_no_folder_of_the_machine_that_wrote_them(tmp_path):
    pipe = _pipe()
    pipe.unet.register_to_config(_name_or_path="/home/someone/runs/base/unet")  # as diffusers' from_pretrained does
    pipe.init_anystory(**TINY_ANYSTORY_CONFIG)
    pipe.save_anystory_weights(str(tmp_path))
    with open(os.path.join(tmp_path, "anystory_config.json")) as f:
        assert "/home/someone" not in f.read()
    assert _pipe().load_anystory_weights(str(tmp_path)).config.unet_config["in_channels"] == pipe.unet.config.in_channels
