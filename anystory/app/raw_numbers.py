"""Number fields whose value reaches the app's own checks as sent: Gradio's own checks answer a bad one with a bare
"Error".

``gr.Number`` and ``gr.Slider`` (Gradio 6.31) round and bound-check the value in ``preprocess``, before any app code
runs: a seed of NaN, steps "abc" or a subject count of NaN (all possible from the API, or a tampered page) raised
there and the visitor saw "Error" with no field named. :func:`raw_number` makes the component hand its value over
unchanged, so :func:`anystory.errors.check_number` (through :func:`anystory.app.inputs.check_number`,
``resolve_seed``, the storyboard's settings) names the field and its range. Instances, not subclasses (see
:mod:`anystory.app.upload_image`).
"""
from __future__ import annotations

import types
from typing import Any, TypeVar

C = TypeVar("C")


def _as_sent(self, payload: Any) -> Any:
    return payload


def raw_number(component: C) -> C:
    """``component`` (a ``gr.Number`` or ``gr.Slider``) with its value passed to the app unchecked."""
    component.preprocess = types.MethodType(_as_sent, component)
    return component
