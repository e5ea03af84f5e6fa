"""What the page's galleries show of a result: images at a size the page can show, each captioned."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from PIL import Image

from .generation import Result
from .storyboard import Frame
from .visualize import display_copy

Item = Tuple[Image.Image, str]


def captioned(images: Sequence[Image.Image], labels: Optional[Sequence[str]] = None) -> List[Item]:
    """Gallery items: small images enlarged with nearest-neighbour, captioned with their real size."""
    items = []
    for k, image in enumerate(images):
        big, size = display_copy(image)
        items.append((big, f"{labels[k]} - {size}" if labels else size))
    return items


def routing_items(result: Result) -> List[Item]:
    """Per image: the overlay of all subjects, one overlay per subject, then the map alone."""
    items: List[Item] = []
    for b in range(len(result.images)):
        items += captioned([result.overlays[b]] if result.overlays else [], ["all subjects"])
        if result.subject_overlays:
            items += captioned(result.subject_overlays[b], [f"only {n}" for n in result.names])
        items += captioned([result.route_maps[b]] if result.route_maps else [], ["map"])
    return items


def frame_items(frame: Frame) -> Tuple[List[Item], List[Item]]:
    """A storyboard frame: (its image captioned with its shot, its routing overlays)."""
    overlays = frame.output.overlays
    return (captioned([frame.output.images[0]], [frame.caption]),
            captioned(overlays, [f"shot {frame.index + 1}"] * len(overlays)))
