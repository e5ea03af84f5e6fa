"""Shared helpers for the eval tests: randomly initialised CLIP / DINO of the real architectures (tests only),
real-photo folders in the harness's documented layouts, and the child process the kill -9 test runs.

Run as a script (``python tests/helpers/eval_data.py child OUT DATA``) it scores the ``faces`` folder DATA (see
:func:`small_faces_folder`) with DINO (random init, seed 0), in chunks of 2 images, so the parent can kill it
between parts.
"""
from __future__ import annotations

import functools
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@functools.lru_cache(maxsize=None)
def random_clip():
    from eval.metrics import OpenClipEmbedder

    torch.manual_seed(0)
    embedder = OpenClipEmbedder("ViT-B-32", None, batch_size=16)
    embedder.load()
    return embedder


@functools.lru_cache(maxsize=None)
def random_dino():
    from eval.metrics import DinoEmbedder

    torch.manual_seed(0)
    embedder = DinoEmbedder(pretrained=False, batch_size=16)
    embedder.load()
    return embedder


@functools.lru_cache(maxsize=None)
def sface():
    from eval.metrics.face_id import SFaceEmbedder

    embedder = SFaceEmbedder()
    embedder.load()
    return embedder


def pixel_embedder():
    """Deterministic stand-in: normalised 4x4 grey thumbnails (to check formulas and plumbing, not a model)."""
    from eval.metrics.base import Embedder, l2_normalise

    class PixelEmbedder(Embedder):
        key = "pixels"

        def load(self):
            pass

        def describe(self):
            return {"model": "pixels", "weights": "none", "label": "pixels"}

        def embed_images(self, images):
            return l2_normalise(np.stack([np.asarray(im.convert("L").resize((4, 4)), np.float64).ravel() - 100
                                          for im in images]))

    return PixelEmbedder()


def metrics(clip: bool = True, dino: bool = True, face: bool = True):
    """Fresh metric objects (their photo caches are per run) over the shared embedders."""
    from eval.metrics import ClipImageMetric, ClipTextMetric, CopyPasteMetric, DinoMetric, FaceIdMetric

    out, bases = [], []
    if clip:
        bases.append(ClipImageMetric(random_clip()))
    if dino:
        bases.append(DinoMetric(random_dino()))
    if face:
        bases.append(FaceIdMetric(sface()))
    out += bases
    if clip:
        out.append(ClipTextMetric(random_clip()))
    out += [CopyPasteMetric(b) for b in bases]
    return out


def reference_folder(bench, dest: str, images_per_prompt: int = 1) -> str:
    """A ``folder:`` method whose every output is a byte copy of the entry's reference photo."""
    for entry in bench.entries:
        os.makedirs(os.path.join(dest, entry.entry_id), exist_ok=True)
        for k in range(images_per_prompt):
            shutil.copyfile(entry.subjects[0].reference, os.path.join(dest, entry.entry_id, f"{k}.jpg"))
    return dest


def astronaut() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut())


def grace_hopper() -> Image.Image:
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f)
        image.load()
    return image.convert("RGB")


def faces_folder(dest: str) -> str:
    """The ``faces`` layout from photos shipped in packages: two identities, two photos each."""
    photos = {
        "astronaut": [astronaut(), astronaut().transpose(Image.FLIP_LEFT_RIGHT)],
        "hopper": [grace_hopper(), grace_hopper().crop((60, 40, 460, 460))],
    }
    for name, images in photos.items():
        os.makedirs(os.path.join(dest, name), exist_ok=True)
        for i, im in enumerate(images, 1):
            im.save(os.path.join(dest, name, f"{i:02d}.png"))
    with open(os.path.join(dest, "prompts.txt"), "w") as f:
        f.write("# test prompts\nrecontextualization | a photo of a person in the snow\nstyle | an oil painting of a person\n")
    return dest


def noise_image(seed: int, size=(96, 96)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3)).astype(np.uint8))


def small_faces_folder(dest: str, identities: int = 3, photos: int = 3) -> str:
    """A small ``faces`` benchmark (identities x photos, 2 prompts) of 96-pixel crops of a shipped photo."""
    base = astronaut()
    for i in range(identities):
        os.makedirs(os.path.join(dest, f"id{i}"), exist_ok=True)
        for j in range(photos):
            x, y = 40 * i + 7 * j, 20 * j
            base.crop((x, y, x + 288, y + 288)).resize((96, 96)).save(os.path.join(dest, f"id{i}", f"{j:02d}.png"))
    with open(os.path.join(dest, "prompts.txt"), "w") as f:
        f.write("a photo of a person in the snow\na photo of a person on the beach\n")
    return dest


def child_config(out: str, data_dir: str, resume: bool = False):
    from eval.run import RunConfig

    return RunConfig(bench="faces", methods=["copy-reference", "real-images"], out=out, images_per_prompt=1,
                     data_dir=data_dir, resume=resume, chunk_size=2, progress=False)


def child_metrics():
    from eval.metrics import CopyPasteMetric, DinoMetric

    dino = DinoMetric(random_dino())
    return [dino, CopyPasteMetric(dino)]


if __name__ == "__main__":
    if sys.argv[1] == "child":
        from eval.run import run_eval

        run_eval(child_config(sys.argv[2], sys.argv[3]), metrics=child_metrics())
