"""anystory.weights: the one module that reads and writes weight files."""
import collections
import os
import pickle

import pytest
import torch

from anystory import weights


def test_safetensors_round_trip_and_no_partial_file_left(tmp_path):
    path = str(tmp_path / "w.safetensors")
    tensors = {"a": torch.arange(6.0).view(2, 3).t(), "b": torch.ones(2, dtype=torch.int64)}  # "a" not contiguous
    weights.save_tensors(tensors, path, metadata={"format": "pt"})
    back = weights.load_tensors(path)
    assert set(back) == {"a", "b"} and torch.equal(back["a"], tensors["a"]) and torch.equal(back["b"], tensors["b"])
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "w.safetensors")
    weights.save_tensors({"a": torch.zeros(2)}, path)

    def interrupted(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(weights, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        weights.save_tensors({"a": torch.ones(2)}, path)
    assert torch.equal(weights.load_tensors(path)["a"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["w.safetensors"]


def test_truncated_file_is_named(tmp_path):
    path = str(tmp_path / "w.safetensors")
    weights.save_tensors({"a": torch.zeros(100)}, path)
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match=f"my weights: cannot read {path} .*truncated"):
        weights.load_tensors(path, "my weights")


def test_pickled_files_are_read_as_tensors_only(tmp_path):
    good, bad = str(tmp_path / "good.bin"), str(tmp_path / "bad.bin")
    torch.save({"ref": {"x": torch.ones(3)}}, good)
    assert torch.equal(weights.load_pickled_tensors(good)["ref"]["x"], torch.ones(3))
    with open(bad, "wb") as f:
        pickle.dump(collections.Counter(a=1), f)  # a class instance: loading it would run constructor code
    with pytest.raises(pickle.UnpicklingError):
        weights.load_pickled_tensors(bad)


def test_state_dict_check_lists_every_mismatch():
    expected = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(1)}
    weights.check_state_dict(expected, {k: torch.ones_like(v) for k, v in expected.items()}, "W")
    with pytest.raises(ValueError) as caught:
        weights.check_state_dict(expected, {"a": torch.zeros(3, 2), "b": torch.zeros(4), "d": torch.zeros(1)}, "W")
    assert str(caught.value) == ("W do not match this model: missing keys: c; unexpected keys: d; "
                                 "shape mismatches: a (3, 2) vs (2, 3)")


def test_cast_floats_keeps_integers_and_metadata(tmp_path):
    path = str(tmp_path / "sub" / "x.safetensors")
    os.makedirs(os.path.dirname(path))
    weights.save_tensors({"f": torch.rand(3), "i": torch.arange(3)}, path, metadata={"k": "v"})
    weights.cast_floats(str(tmp_path), torch.float16)
    back = weights.load_tensors(path)
    assert back["f"].dtype == torch.float16 and back["i"].dtype == torch.int64
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert f.metadata() == {"k": "v"}


def test_anystory_files_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found .a folder with anystory.safetensors"):
        weights.anystory_files(str(tmp_path / "nothing"))
    (tmp_path / weights.ANYSTORY_WEIGHTS).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="anystory_config.json not found"):
        weights.anystory_files(str(tmp_path))
    (tmp_path / weights.ANYSTORY_CONFIG).write_text("{}")
    expected = (str(tmp_path / weights.ANYSTORY_WEIGHTS), str(tmp_path / weights.ANYSTORY_CONFIG))
    assert weights.anystory_files(str(tmp_path)) == expected
    assert weights.anystory_files(expected[0]) == expected
