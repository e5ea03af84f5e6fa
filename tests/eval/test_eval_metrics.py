"""Metrics: face-ID separates real identities; embeddings of an image with itself are 1; the copy-paste score
follows its definition; absent weights are reported as not computed, never replaced."""
import math
import os

import numpy as np
import pytest
from PIL import Image

from helpers import eval_data as support
from eval.loaders.base import SubjectRef
from eval.metrics import (BatchContext, CopyPasteMetric, DinoEmbedder, EmbeddingMetric, FaceIdMetric, MetricSettings,
                          MetricUnavailable, OpenClipEmbedder, ScoreItem, build_metrics, face_embedder, load_metrics)


def _cos(a, b):
    return float(a @ b)


def test_face_id_separates_identities():
    face = support.sface()
    astronaut, hopper = support.astronaut(), support.grace_hopper()
    images = [astronaut, astronaut.transpose(Image.FLIP_LEFT_RIGHT), astronaut.crop((80, 0, 400, 330)),
              hopper, hopper.transpose(Image.FLIP_LEFT_RIGHT), hopper.crop((60, 40, 460, 460))]
    e = face.embed_images(images)
    assert np.isfinite(e).all(), "a face must be found in every photo"
    same = [_cos(e[0], e[1]), _cos(e[0], e[2]), _cos(e[3], e[4]), _cos(e[3], e[5])]
    different = [_cos(e[i], e[j]) for i in range(3) for j in range(3, 6)]
    assert min(same) > 0.6 and max(different) < 0.35
    assert min(same) > max(different) + 0.3


def test_face_id_on_insightface_group_photo():
    try:
        import insightface
    except ImportError:
        pytest.skip("insightface is not installed (its t1.jpg group photo ships with it)")
    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    if not os.path.isfile(path):
        pytest.skip(f"{path} absent")
    import cv2

    face = support.sface()
    bgr = cv2.imread(path)
    face.detector.setInputSize((bgr.shape[1], bgr.shape[0]))
    _, found = face.detector.detect(bgr)
    assert found is not None and len(found) >= 4
    crops = []
    for f in found[:4]:
        x, y, w, h = (int(v) for v in f[:4])
        m = max(w, h)
        crops.append(Image.fromarray(bgr[max(0, y - m):y + 2 * m, max(0, x - m):x + 2 * m, ::-1]))
    e = face.embed_images(crops + [c.transpose(Image.FLIP_LEFT_RIGHT) for c in crops])
    for i in range(4):
        others = [_cos(e[i], e[j]) for j in range(4) if j != i]
        assert _cos(e[i], e[i + 4]) > max(others)


def test_no_face_is_nan_and_counted(tmp_path):
    support.astronaut().save(tmp_path / "ref.png")
    subject = SubjectRef("astronaut", "person", str(tmp_path / "ref.png"), (str(tmp_path / "ref.png"),))
    metric = FaceIdMetric(support.sface())
    blank = Image.new("RGB", (200, 200), (128, 128, 128))
    rows = metric.score([ScoreItem(blank, blank, "p", subject), ScoreItem(support.astronaut(), None, "p", subject)],
                        BatchContext())
    assert rows[0]["face_found"] is False and math.isnan(rows[0]["face_id"]) and math.isnan(rows[0]["face_id_ref"])
    assert rows[1]["face_found"] is True and rows[1]["face_id_ref"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("which", ["clip", "dino"])
def test_embedding_of_an_image_with_itself_is_one(which):
    embedder = support.random_clip() if which == "clip" else support.random_dino()
    a, b = support.noise_image(1), support.noise_image(2)
    e = embedder.embed_images([a, b, a.copy()])
    assert e.shape[1] == (512 if which == "clip" else 384)
    assert np.linalg.norm(e, axis=1) == pytest.approx(1.0, abs=1e-5)
    assert _cos(e[0], e[2]) == pytest.approx(1.0, abs=1e-5)
    assert _cos(e[0], e[1]) < 1 - 1e-4


def test_clip_text_is_cosine_of_prompt_and_image():
    from eval.metrics import ClipTextMetric

    clip = support.random_clip()
    image = support.noise_image(3)
    subject = SubjectRef("s", "c", "unused", ())
    got = ClipTextMetric(clip).score([ScoreItem(image, image, "a dog", subject)], BatchContext())[0]["clip_t"]
    assert got == pytest.approx(_cos(clip.embed_images([image])[0], clip.embed_texts(["a dog"])[0]), abs=1e-6)


def test_copy_paste_definition(tmp_path):
    photos = []
    for i in range(4):
        support.noise_image(10 + i, (32, 32)).save(tmp_path / f"{i:02d}.png")
        photos.append(str(tmp_path / f"{i:02d}.png"))
    subject = SubjectRef("s", "c", photos[1], tuple(photos))
    base = EmbeddingMetric("pix", support.pixel_embedder())
    copy_paste = CopyPasteMetric(base)
    emb = support.pixel_embedder().embed_images([Image.open(p) for p in photos])
    out = support.noise_image(99, (32, 32))
    o = support.pixel_embedder().embed_images([out])[0]
    ctx = BatchContext()
    items = [ScoreItem(out, out, "p", subject), ScoreItem(Image.open(photos[1]), None, "p", subject),
             ScoreItem(Image.open(photos[2]), None, "p", subject, exclude=photos[2])]
    fidelity = base.score(items, ctx)
    cp = [r["copy_paste_pix"] for r in copy_paste.score(items, ctx)]
    others = [0, 2, 3]
    assert fidelity[0]["pix"] == pytest.approx(np.mean([_cos(o, emb[i]) for i in range(4)]), abs=1e-6)
    assert fidelity[0]["pix_ref"] == pytest.approx(_cos(o, emb[1]), abs=1e-6)
    assert cp[0] == pytest.approx(_cos(o, emb[1]) - np.mean([_cos(o, emb[i]) for i in others]), abs=1e-6)
    # the reference returned unchanged: 1 - its mean similarity to the other photos
    assert cp[1] == pytest.approx(1 - np.mean([_cos(emb[1], emb[i]) for i in others]), abs=1e-6)
    # a real photo (real-images oracle) is never compared with itself
    assert fidelity[2]["pix"] == pytest.approx(np.mean([_cos(emb[2], emb[i]) for i in (0, 1, 3)]), abs=1e-6)
    assert cp[2] == pytest.approx(_cos(emb[2], emb[1]) - np.mean([_cos(emb[2], emb[i]) for i in (0, 3)]), abs=1e-6)


def test_absent_weights_are_reported_not_replaced():
    with pytest.raises(MetricUnavailable, match="--weights-dir"):
        OpenClipEmbedder("ViT-B-32", "openai").load()
    with pytest.raises(MetricUnavailable, match="--weights-dir"):
        DinoEmbedder().load()
    usable, unavailable = load_metrics(build_metrics(MetricSettings(face_backend="sface")))
    assert {m.name for m in usable} == {"face_id", "copy_paste_face_id"}
    assert set(unavailable) == {"clip_i", "clip_t", "dino", "copy_paste_clip_i", "copy_paste_dino"}
    assert all("could not be loaded" in reason for reason in unavailable.values())


def test_face_backend_choice():
    try:
        import insightface  # noqa: F401
        has_insightface = True
    except ImportError:
        has_insightface = False
    embedder, note = face_embedder("auto")
    if not has_insightface:
        assert embedder.key == "sface" and "ArcFace absent" in note and "insightface" in note
        with pytest.raises(MetricUnavailable, match="ArcFace: the 'insightface' package is not installed"):
            face_embedder("arcface")[0].load()
    assert face_embedder("sface")[0].key == "sface"
    with pytest.raises(ValueError, match="unknown face backend"):
        face_embedder("dlib")
