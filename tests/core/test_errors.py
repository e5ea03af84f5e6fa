"""Bad user input raises ``InvalidInputError`` (a ``ValueError``), distinct from programming errors."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from anystory.app.inputs import InputError
from anystory.errors import InvalidInputError, check_number
from anystory.images import read_image, read_mask
from anystory.app.storyboard import ScriptError, script_from_dict
from anystory.subjects import Segmenter, Subject, prepare_subjects

RED = Image.new("RGB", (16, 16), "red")


@pytest.mark.parametrize("call, match", [
    (lambda: read_image(np.zeros((4, 4, 2), np.uint8), "img"), "channels"),
    (lambda: read_image("/no/such/file.png", "img"), "file not found"),
    (lambda: read_mask(np.zeros((0, 3)), "mask"), "non-empty"),
    (lambda: prepare_subjects([Subject(RED, scale=11)]), "scale"),
    (lambda: prepare_subjects([Subject(RED, mask=np.ones((8, 8), bool))]), "does not match"),
    (lambda: prepare_subjects([Subject(RED, mask=np.zeros((16, 16), bool))]), "empty"),
    (lambda: prepare_subjects([RED] * 5), "Too many subjects"),
    (lambda: prepare_subjects(42), "expected a Subject"),
])
def test_user_input_problems_are_invalid_input_errors(call, match):
    with pytest.raises(InvalidInputError, match=match) as caught:
        call()
    assert isinstance(caught.value, ValueError)  # callers catching ValueError keep working


def test_app_and_storyboard_errors_are_input_errors():
    assert issubclass(InputError, InvalidInputError) and issubclass(ScriptError, InvalidInputError)
    with pytest.raises(ScriptError):
        script_from_dict({"shots": "not a list"})


def test_a_programming_error_is_not_reported_as_bad_input():
    class Broken(Segmenter):
        name = "broken"

        def __call__(self, image):
            return np.ones((3, 3), bool)  # a bug: the wrong shape

    with pytest.raises(ValueError, match="returned a mask of shape") as caught:
        prepare_subjects([RED], segmenter=Broken())
    assert not isinstance(caught.value, InvalidInputError)


@pytest.mark.parametrize("value, kwargs, match", [
    ("strong", dict(), "x must be a number, got 'strong'"),
    (None, dict(integer=True), "x must be an integer, got None"),
    (float("nan"), dict(), "x must be finite, got nan"),
    (float("inf"), dict(low=0.0), "x must be finite, got inf"),
    (11, dict(low=0.0, high=10.0), "x must be a number between 0 and 10, got 11"),
    (-0.5, dict(low=0.0), "x must be a number >= 0, got -0.5"),
    (2.5, dict(integer=True, low=1, high=100), "x must be an integer between 1 and 100, got 2.5"),
    ("7", dict(typed=True), "x must be a number, got '7'"),
    (True, dict(typed=True, integer=True), "x must be an integer, got True"),
])
def test_check_number_refuses_by_name(value, kwargs, match):
    with pytest.raises(InvalidInputError) as caught:
        check_number(value, "x", **kwargs)
    assert str(caught.value) == match


def test_check_number_accepts_and_converts():
    assert check_number("7", "x", integer=True) == 7 and isinstance(check_number(7.0, "x", integer=True), int)
    assert check_number(0.25, "x", 0.0, 1.0) == 0.25 and isinstance(check_number(1, "x"), float)
    with pytest.raises(ScriptError):  # the caller's own error type, still an InvalidInputError
        check_number("seven", "settings.seed", integer=True, typed=True, error=ScriptError)


def test_every_number_rule_is_the_one_check():
    """The subjects, the app's fields, the storyboard and the FLUX call give check_number's messages."""
    from anystory.app.inputs import check_number as app_check

    with pytest.raises(InputError, match="^Steps must be an integer between 1 and 100, got 0$"):
        app_check(0, "Steps", 1, 100, integer=True)
    with pytest.raises(InvalidInputError, match="subject 0: reference_scale must be finite, got nan"):
        prepare_subjects([Subject(RED, reference_scale=float("nan"))])
    with pytest.raises(ScriptError, match="settings.guidance must be finite"):
        script_from_dict({"settings": {"guidance": float("inf")}, "shots": []})


def test_the_pipelines_input_checks_are_invalid_input_errors():
    """What the pipelines refuse of a call's arguments is the user's to fix (the app shows it as such)."""
    import torch

    from anystory.flux.release_inputs import prepare_release_subjects
    from anystory.pipeline_mixin import AnyStoryPipelineMixin

    with pytest.raises(InvalidInputError, match="subject_preprocessing must be one of"):
        prepare_release_subjects([RED], 4, None, "weird")
    soft = np.zeros((16, 16), np.uint8)
    soft[4:12, 4:12] = 150  # a subject marked, but nowhere above the release's threshold of 200
    with pytest.raises(InvalidInputError, match="no mask value above 200"):
        prepare_release_subjects([Subject(RED, mask=soft)], 4, None)
    pipe = SimpleNamespace()  # the mixin's override check alone (the mixin is abstract)
    AnyStoryPipelineMixin.set_routing_override(pipe, torch.full((2, 4, 4), float("nan")))
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        AnyStoryPipelineMixin._routing_override_for(pipe, 1)
    AnyStoryPipelineMixin.set_routing_override(pipe, torch.ones(3, 4, 4))
    with pytest.raises(InvalidInputError, match=r"must be \[N\+1=2, H, W\]"):
        AnyStoryPipelineMixin._routing_override_for(pipe, 1)


# Every exception the project raises on purpose: where callers import it from, and the built-in base it keeps.
_RAISED_WHERE = [
    ("anystory.errors", "InvalidInputError", ValueError),
    ("anystory.app.inputs", "InputError", ValueError),
    ("anystory.app.storyboard", "ScriptError", ValueError),
    ("anystory.app.progress", "Cancelled", Exception),
    ("anystory.loading", "ModelUnavailableError", RuntimeError),
    ("anystory.app.models", "NoModelError", RuntimeError),
    ("anystory.flux.weights_flux", "AnyStoryWeightsError", ValueError),
    ("anystory.pipeline_mixin", "AnyStoryConflictError", RuntimeError),
    ("anystory.app.generation", "GenerationError", RuntimeError),
    ("anystory.training.loop", "StageStopped", Exception),
    ("anystory.data.formats", "DataFormatError", ValueError),
    ("eval.data", "DataNotFoundError", FileNotFoundError),
    ("eval.data", "DataIntegrityError", RuntimeError),
    ("eval.metrics.base", "MetricUnavailable", RuntimeError),
    ("eval.methods", "MethodError", RuntimeError),
    ("eval.run", "RunError", RuntimeError),
    ("eval.run", "NoMetricError", RuntimeError),
]


@pytest.mark.parametrize("module, name, builtin", _RAISED_WHERE)
def test_every_exception_is_one_class_of_the_errors_module(module, name, builtin):
    import importlib

    from anystory import errors
    cls = getattr(importlib.import_module(module), name)
    assert cls is getattr(errors, name)
    assert issubclass(cls, errors.AnyStoryError) and issubclass(cls, builtin)


def test_no_exception_class_is_defined_outside_the_errors_module():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    defined = []
    for package in ("anystory", "eval"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                        isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception", "Unavailable", "Stopped"))
                        for b in node.bases):
                    defined.append(f"{path.relative_to(root).as_posix()}:{node.name}")
    expected = ["AnyStoryError"] + [name for _, name, _ in _RAISED_WHERE]
    assert sorted(defined) == sorted(f"anystory/errors.py:{name}" for name in expected)
