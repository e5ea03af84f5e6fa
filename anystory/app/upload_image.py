"""Image uploads whose file reaches the app's own checks: Gradio's own decoding would refuse it first.

``gr.Image(type="filepath")`` opens every upload with PIL in its preprocessing. A text file renamed ``.png``
raised there, before any app code ran, and Gradio covered every output (earlier results included) with red
"Error" badges. :func:`UploadImage` makes a ``gr.Image`` whose value is the uploaded file's path, undecoded, so
:func:`anystory.app.inputs.load_image_file` reads it by the one image rule and a bad file gets its readable
message while the outputs stay as they were. (An instance, not a subclass: Gradio writes a ``.pyi`` stub beside
the module of every component subclass.)
"""
from __future__ import annotations

import types
from typing import Optional

import gradio as gr

from .inputs import InputError, UploadPath, load_image_file


def _path_as_is(self, payload):
    path = getattr(payload, "path", None)
    if payload is not None and path and not (getattr(payload, "url", None) or "").startswith("data:"):
        upload = UploadPath(path)
        upload.orig_name = getattr(payload, "orig_name", None)
        return upload
    return gr.Image.preprocess(self, payload)


def UploadImage(**kwargs) -> gr.Image:  # noqa: N802 - used where a component class is
    """``gr.Image(type="filepath", ...)`` that hands the uploaded file over undecoded."""
    image = gr.Image(**dict(kwargs, type="filepath"))
    image.preprocess = types.MethodType(_path_as_is, image)
    return image


def editor_background(path: Optional[str]) -> Optional[dict]:
    """The mask editor's content for a newly uploaded subject image, upright as the pipeline will read it;
    empty when the file is no readable image (Generate then names the problem)."""
    if not path:
        return None
    try:
        image = load_image_file(path, "image")
    except InputError:
        return None
    return {"background": image, "layers": [], "composite": image}
