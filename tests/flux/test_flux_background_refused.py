"""FLUX refuses ``background=``: the released router has no background class, so there is nothing to route a
background reference to (the background reference is SDXL-only, docs/inputs.md, "Background reference")."""
import pytest

from anystory.errors import InvalidInputError
from helpers.flux_pipe import CALL, PROMPT, gen, make_pipe, subject_image, subjects


def test_flux_refuses_a_background_reference_by_name():
    pipe = make_pipe()
    with pytest.raises(InvalidInputError, match="background: the background reference is SDXL-only"):
        pipe(PROMPT, subjects=subjects(1), background=subject_image(5)[0], generator=gen(), **CALL)
    plain = pipe(PROMPT, subjects=subjects(1), generator=gen(), **CALL).images
    assert (pipe(PROMPT, subjects=subjects(1), background=None, generator=gen(), **CALL).images == plain).all()
