"""Image editors that hold to the app's pixel limit before Gradio decodes anything they were sent.

``gr.ImageEditor`` (Gradio 6.31) decodes its background, layers and composite in ``preprocess``, before any app
code runs: a 242 KB 8000x8000 PNG cost 1.5 GB there, and Generate takes eight editor values. Its
``accept_blobs`` server function (``/gradio_api/component_server``) stores what the browser sends in a dict on the
component, keyed by an id the client picks, and grew a list to any layer index it was given (1e8: +0.8 GB), kept
until a later event with that id came. :func:`LimitedEditor` makes an editor whose two entry points check first:
each image's header (size, no pixels) against :data:`~anystory.app.inputs.MAX_IMAGE_PIXELS`, the layer index
and count against :data:`MAX_LAYERS`, each blob's bytes, and the pending blobs (oldest dropped past
:data:`MAX_PENDING_BYTES`). An instance, not a subclass (see :mod:`anystory.app.upload_image`).
"""
from __future__ import annotations

import io
import types
from collections import OrderedDict
from typing import Any

import gradio as gr
from PIL import Image

from .inputs import MAX_IMAGE_PIXELS, MAX_UPLOAD_BYTES, MAX_UPLOAD_MB

#: The app's editors draw on one layer (``layers=False``); a few more are allowed for the editor's own use.
MAX_LAYERS = 4
#: Blobs waiting for their event, per editor: beyond this the oldest are dropped (that edit is then lost).
MAX_PENDING_BYTES = 64 * 1024 * 1024
KINDS = ("background", "layer", "composite")


class EditorValueError(gr.Error):
    """An editor value over a limit: shown with the editor's name, before anything is decoded."""


def image_header(source: Any, what: str) -> None:
    """Read only the header of a path or bytes, and refuse an image over the pixel limit or no image at all."""
    if source is None:
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) > MAX_UPLOAD_BYTES:
            raise EditorValueError(f"{what}: {len(source) / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB.")
        source = io.BytesIO(source)
    else:
        source = getattr(source, "path", source)
    try:
        with Image.open(source) as probe:
            w, h = probe.size
    except Exception as e:  # PIL raises several types for what is not an image
        raise EditorValueError(f"{what}: not a readable image ({type(e).__name__}).") from None
    if w * h > MAX_IMAGE_PIXELS:
        side = int(MAX_IMAGE_PIXELS**0.5)
        raise EditorValueError(f"{what}: the image is {w}x{h} pixels; the limit is {side}x{side}. Resize it.")


def _check_preprocess(self, payload):
    if payload is not None:
        what = self.label or "Image editor"
        parts = self.blob_storage.get(payload.id) if getattr(payload, "id", None) else None
        parts = parts if parts is not None else payload
        layers = [layer for layer in (parts.layers or []) if layer is not None]
        if len(layers) > MAX_LAYERS:
            raise EditorValueError(f"{what}: {len(layers)} layers; at most {MAX_LAYERS} are accepted.")
        for name, part in [("background", parts.background), ("composite", parts.composite)] + [
                (f"layer {k + 1}", layer) for k, layer in enumerate(layers)]:
            image_header(part, f"{what} ({name})")
    return gr.ImageEditor.preprocess(self, payload)


def _checked_blobs(self, data):
    blob = data.data
    kind, raw_index = blob.get("type"), blob.get("index")
    if kind not in KINDS or not data.files:
        raise EditorValueError(f"{self.label or 'Image editor'}: unknown part {kind!r}.")
    if kind == "layer":
        try:
            index = int(raw_index)
        except (TypeError, ValueError):
            raise EditorValueError(f"{self.label or 'Image editor'}: layer index {raw_index!r} is no number.") from None
        if not 0 <= index < MAX_LAYERS:
            raise EditorValueError(f"{self.label or 'Image editor'}: layer {index}; at most {MAX_LAYERS} layers.")
    image_header(data.files[0][1], f"{self.label or 'Image editor'} ({kind})")
    result = gr.ImageEditor.accept_blobs(self, data)
    _bound_pending(self.blob_storage)
    return result


def _pending_bytes(entry: Any) -> int:
    parts = [entry.background, entry.composite] + list(entry.layers or [])
    return sum(len(p) for p in parts if p is not None)


def _bound_pending(storage: "OrderedDict") -> None:
    """Drop the oldest pending edits until the rest fit :data:`MAX_PENDING_BYTES` (the newest always stays)."""
    while len(storage) > 1 and sum(_pending_bytes(e) for e in storage.values()) > MAX_PENDING_BYTES:
        storage.pop(next(iter(storage)))


def LimitedEditor(**kwargs) -> gr.ImageEditor:  # noqa: N802 - used where a component class is
    """``gr.ImageEditor(...)`` whose values and uploaded blobs are checked before Gradio decodes or keeps them."""
    editor = gr.ImageEditor(**kwargs)
    editor.blob_storage = OrderedDict(editor.blob_storage)
    editor.preprocess = types.MethodType(_check_preprocess, editor)
    accept = types.MethodType(_checked_blobs, editor)
    accept.__func__._is_server_fn = True
    editor.accept_blobs = accept
    return editor

