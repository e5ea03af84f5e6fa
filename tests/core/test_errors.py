"""Bad user input raises ``InvalidInputError`` (a ``ValueError``), distinct from programming errors."""
import numpy as np
import pytest
from PIL import Image

from anystory.app.inputs import InputError
from anystory.errors import InvalidInputError
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
