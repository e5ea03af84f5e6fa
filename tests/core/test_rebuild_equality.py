"""benchmarks.rebuild_equality: two exports are the same model only when every tensor's bits are."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.rebuild_equality import compare, main


def _export(root, tensors, config=None, timings=1.0):
    os.makedirs(os.path.join(root, "unet"))
    save_file(tensors, os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(root, "anystory_config.json"), "w") as f:
        json.dump(config or {"routing_subject_gap": 1}, f)
    with open(os.path.join(root, "training_summary.json"), "w") as f:
        json.dump({"base": {"seconds": timings}}, f)
    return str(root)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(4), "step": torch.tensor(7)}


def test_equal_exports_pass_whatever_their_timings(tmp_path, capsys):
    a = _export(tmp_path / "a", _tensors(), timings=1.0)
    b = _export(tmp_path / "b", _tensors(), timings=99.0)
    assert main([a, b]) == 0
    out = capsys.readouterr().out
    assert "unet/diffusion_pytorch_model.safetensors: 3 tensors, equal" in out
    assert out.rstrip().endswith("2 files (3 tensors): all equal")


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.update(w=t["w"].clone().index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(1e-7),
                                                     accumulate=True)), "w: values differ"),
    (lambda t: t.update(b=-t["b"]), "b: values differ"),  # -0.0 equals 0.0 as a number, not as bits
    (lambda t: t.update(step=t["step"].to(torch.int32)), "step: torch.int64 () vs torch.int32 ()"),
    (lambda t: t.pop("b"), "only in one: b"),
])
def test_a_tensor_that_differs_in_any_bit_is_named(tmp_path, capsys, change, expected):
    changed = _tensors()
    change(changed)
    a = _export(tmp_path / "a", _tensors())
    b = _export(tmp_path / "b", changed)
    assert main([a, b]) == 1
    assert expected in capsys.readouterr().out


def test_a_changed_config_or_a_missing_file_is_a_difference(tmp_path):
    a = _export(tmp_path / "a", _tensors(), config={"routing_subject_gap": 1, "unet_config": {"in_channels": 8}})
    b = _export(tmp_path / "b", _tensors(), config={"routing_subject_gap": 2, "unet_config": {"in_channels": 8.0}})
    os.remove(os.path.join(b, "unet", "diffusion_pytorch_model.safetensors"))
    report = compare(a, b)
    assert report["anystory_config.json"][1] == ["routing_subject_gap: 1 vs 2", "unet_config.in_channels: 8 vs 8.0"]
    assert report[os.path.join("unet", "diffusion_pytorch_model.safetensors")][1] == ["missing from the second export"]


def test_a_config_is_compared_by_content_not_by_its_formatting(tmp_path):
    a = _export(tmp_path / "a", _tensors(), config={"x": 1, "y": [1, 2]})
    b = _export(tmp_path / "b", _tensors())
    with open(os.path.join(b, "anystory_config.json"), "w") as f:
        f.write('{\n  "y": [1, 2],\n  "x": 1\n}\n')
    assert compare(a, b)["anystory_config.json"][1] == []


def test_a_path_that_is_not_a_folder_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path / "nowhere")])
    assert "nowhere is not a folder" in capsys.readouterr().err
