"""``accelerate launch -m eval.run`` on 2 CPU processes (gloo): each process generates its share of the images with
the shipped miniature, the main process scores them once, and the tables equal those of a 1-process run.
DINO here is a randomly initialised ViT-Tiny saved as a local weights file (plumbing, not quality)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import eval_data as support
from eval.score import read_parts

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DINO = "vit_tiny_patch16_224"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dino_weights(folder) -> str:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(DINO, pretrained=False, num_classes=0)
    os.makedirs(os.path.join(folder, "dino"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "dino", f"{DINO}.safetensors"))
    return str(folder)


def test_two_processes_give_the_one_process_table(tmp_path):
    from anystory.sdxl.miniature import miniature_available

    if not miniature_available():
        pytest.skip("the shipped miniature is not installed")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    data = support.small_faces_folder(str(tmp_path / "faces"), identities=1, photos=2)  # 2 entries
    args = ["-m", "eval.run", "--bench", "faces", "--data-dir", data, "--method", "anystory-miniature",
            "--images-per-prompt", "1", "--steps", "2", "--height", "64", "--width", "64", "--metrics", "dino",
            "--dino-model", DINO, "--weights-dir", _dino_weights(tmp_path / "weights")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, *args, "--out", str(one)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(_free_port()), *args, "--out", str(two)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    config = json.loads((two / "run_config.json").read_text())
    assert config["generation"] == {"processes": 2, "anystory-miniature": {"made_by_process": [1, 1]}}
    assert json.loads((one / "run_config.json").read_text())["generation"]["processes"] == 1
    for entry in ("id0-00", "id0-01"):  # same seeds, same images
        a, b = (np.asarray(Image.open(r / "images" / "anystory-miniature" / entry / "0.png")) for r in (one, two))
        assert np.array_equal(a, b), entry
    assert len(read_parts(str(two))) == 2  # each image scored once, by the main process
    for name in ("rows", "per_method", "per_subject", "per_prompt_type"):
        a, b = (pd.read_parquet(r / f"{name}.parquet").drop(columns=["run", "image_path"], errors="ignore")
                for r in (one, two))
        pd.testing.assert_frame_equal(a, b)
    per_method = pd.read_parquet(two / "per_method.parquet")
    assert per_method.loc[0, "dino_n"] == 2 and np.isfinite(per_method.loc[0, "dino"])
