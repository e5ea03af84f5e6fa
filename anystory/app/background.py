"""The background reference in the demo: an optional backdrop image and its strength, checked by one rule.

The Generate tab and each storyboard shot go through :func:`background_call`, so a bad image, a bad strength or a
model without a background reference is refused by the field's name before anything is encoded. FLUX is refused
here, not only by its pipeline: the released router has no background class to route it to.
"""
from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from .inputs import InputError, check_number, load_image_file

LABEL = "Background image"
STRENGTH_LABEL = "Background colour strength"
STRENGTH_RANGE = (0.0, 5.0)


def background_call(handle, image: Any, strength: Any = None, what: str = LABEL) -> dict:
    """The pipeline keywords for a background reference (``{}`` without one), or :class:`InputError` naming
    ``what``. ``strength``: ``background_start``, the share of the backdrop's mean colour in the starting latent;
    empty means the value stored with the weights."""
    if image is None:
        if strength not in (None, ""):
            check_number(strength, f"{what} strength", *STRENGTH_RANGE)
        return {}
    if handle.kind == "flux":
        raise InputError(f"{what}: the background reference is SDXL-only (the released FLUX router has no "
                         "background class to route it to); remove the image or load an SDXL model.")
    anystory = getattr(handle.pipe, "anystory", None)
    if anystory is None or getattr(anystory, "background", None) is None:
        raise InputError(f"{what}: the loaded weights have no background reference (it is trained by the "
                         "'background' stage); remove the image.")
    try:
        picture = load_image_file(image, what)
    except InvalidInputError as e:
        raise InputError(str(e)) from None
    start = None if strength in (None, "") else check_number(strength, f"{what} strength", *STRENGTH_RANGE)
    return {"background": picture, "background_start": start}


def background_controls(title: str = "Background reference (optional, SDXL only)", elem: str = "background",
                        **image_options):
    """An optional background: a collapsed accordion with the image and its strength (the Generate tab's, and with
    its own ``title``, element ids and image options the Storyboard tab's). Returns ``(image, strength)``
    components, in the order :func:`background_call` takes their values."""
    import gradio as gr

    from .upload_image import UploadImage

    with gr.Accordion(title, open=False, elem_id=f"{elem}-reference"):
        image = UploadImage(label=LABEL, image_mode=None, sources=["upload", "clipboard"], height=160,
                            elem_id=f"{elem}-image", **image_options)
        strength = gr.Number(label=f"{STRENGTH_LABEL} (empty: the model's own)", value=None,
                             minimum=STRENGTH_RANGE[0], maximum=STRENGTH_RANGE[1], step=0.1,
                             elem_id=f"{elem}-strength")
    return image, strength
