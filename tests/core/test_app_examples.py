"""benchmarks.app_examples: the app's example rows run through the Generate tab's path and are read back."""
import os

import pytest

from anystory.data.synthetic import Identity
from benchmarks.app_examples import example_rows, identity_of, main, table

MINIATURE = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "miniature")


def test_every_example_reference_names_an_identity_and_a_row_has_distinct_subjects():
    rows = example_rows()
    assert [len(r[0]) for r in rows] == [1, 2, 2, 3, 4]
    for paths, mask, prompt, seed in rows:
        names = [identity_of(p).name for p in paths]
        assert len(set(names)) == len(names)
    assert identity_of("x/red_striped_star.png") == Identity.parse("red striped star")
    with pytest.raises(ValueError, match="cannot read an identity"):
        identity_of("x/cat.png")


def test_the_table_counts_a_subject_as_shown_only_when_all_three_read_right():
    read = {"found": [True, True], "shape": [True, True], "colour": [True, True], "texture": [True, False],
            "identity": [True, False]}
    text = table([{"prompt": "two objects", "seed": 3, "subjects": ["red striped star", "blue dotted moon"],
                   "read": read}])
    assert "| two objects | 3 | red striped star | yes | yes | yes | yes | yes |" in text
    assert "|  |  | blue dotted moon | yes | yes | yes | no | no |" in text
    assert text.endswith("Subjects shown (shape, colour and texture read right): 1 of 2.")


@pytest.mark.skipif(not os.path.isfile(os.path.join(MINIATURE, "identity_classifier.safetensors")),
                    reason="the shipped miniature is absent")
def test_the_command_writes_a_table_row_per_subject_and_a_strip_per_example(tmp_path):
    from PIL import Image

    assert main(["--steps", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert text.count("\n|") == 2 + 12 and "of 12." in text  # the header, its rule, a row per subject
    assert Image.open(tmp_path / "examples.png").height == 5 * (128 + 6)
