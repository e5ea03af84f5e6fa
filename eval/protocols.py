"""Scoring protocols: what a subject-fidelity score compares the output with, and on which scale.

Papers define "DINO" and "CLIP-I" differently, so a number means something only with its protocol:

* ``dreambooth`` (DreamBooth, UNO, MS-Diffusion): mean cosine between the output and *every* real photo of the
  subject, raw cosines in [0, 1] (negative possible), DINO ViT-S/16.
* ``single-reference`` (DreamBench++, XVerse): cosine between the output and the *input reference* alone,
  reported x100. DreamBench++ uses DINO ViT-S/8 (``--dino-model vits8``); XVerse additionally scores detected
  crops and counts a missed detection as 0, which this harness does not do (it scores the sidecar's box or the
  whole image).

The protocol decides the comparison set and the scale; the metrics compute plain cosines either way. CLIP-T and
the copy-paste score keep their own definitions and only take the scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from .loaders.base import SubjectRef

DINO_ALIASES = {"vits16": "vit_small_patch16_224.dino", "vits8": "vit_small_patch8_224.dino"}


@dataclass(frozen=True)
class Protocol:
    name: str
    compares_with: str
    scale: float
    scale_label: str
    used_by: str

    def comparison_set(self, subject: SubjectRef, exclude: Optional[str]) -> List[str]:
        """Real photos the output is compared with; ``exclude`` (the scored photo itself) never is."""
        photos = subject.real_photos if self.compares_with == "all real photos" else (subject.reference,)
        return [p for p in photos if p != exclude]

    def scaled(self, values: Dict[str, object]) -> Dict[str, object]:
        """Scores on this protocol's scale; flags (``face_found``) and missing values stay as they are."""
        return {k: float(v) * self.scale if isinstance(v, (float, np.floating)) else v for k, v in values.items()}

    def describe(self) -> Dict[str, str]:
        return {"protocol": self.name, "compares_with": self.compares_with, "scale": self.scale_label,
                "used_by": self.used_by}


PROTOCOLS = {
    "dreambooth": Protocol("dreambooth", "all real photos", 1.0, "[0, 1]", "DreamBooth, UNO, MS-Diffusion"),
    "single-reference": Protocol("single-reference", "input reference", 100.0, "x100", "DreamBench++, XVerse"),
}
DEFAULT_PROTOCOL = "dreambooth"


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{name}'; choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def dino_model_name(name: str) -> str:
    """timm name for a DINO model given by alias (``vits16``, ``vits8``) or by its timm name."""
    return DINO_ALIASES.get(name, name)
