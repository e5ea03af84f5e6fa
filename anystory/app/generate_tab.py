"""The Generate tab without Gradio: the subject slots' flat values in, one checked and run generation out."""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

from .generation import Progress, Request, Result, check_request, generate
from .inputs import SubjectSlot, collect_subjects
from .models import ModelHandle

#: The values of one subject slot, in the order ``app.py`` lists its components.
SLOT_FIELDS = ("image", "mask", "drawn", "name", "scale", "reference_scale", "region", "region_drawn")


def slots_from_values(values: Sequence[Any]) -> List[SubjectSlot]:
    """Flat UI values (``SLOT_FIELDS`` per slot, in order) -> :class:`SubjectSlot` list."""
    n = len(SLOT_FIELDS)
    if len(values) % n:
        raise ValueError(f"expected a multiple of {n} slot values, got {len(values)}")
    return [SubjectSlot(**dict(zip(SLOT_FIELDS, values[i:i + n]))) for i in range(0, len(values), n)]


def run_generation(handle: ModelHandle, segmenter, slots: Sequence[SubjectSlot], prompt: str, negative_prompt: str = "",
                   seed: Any = -1, steps: Any = None, guidance: Any = None, width: Any = None, height: Any = None,
                   num_images: Any = 1, progress: Optional[Progress] = None,
                   out_dir: Optional[str] = None, background: Any = None, background_start: Any = None) -> Result:
    """Subjects from the slots (validated, masks resolved), the request checked once, then :func:`generate`.
    ``background`` / ``background_start``: the optional backdrop image and its strength (``background.py``)."""
    subjects, sources = collect_subjects(slots, handle.max_subjects, segmenter)
    checked = check_request(handle, Request(prompt, subjects, negative_prompt, seed, steps, guidance, height, width,
                                            num_images, background=background, background_start=background_start))
    result = generate(handle, checked, progress, out_dir)
    result.info += "  \nMasks: " + "; ".join(sources) + "."
    return result
