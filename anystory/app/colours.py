"""Subject colours people can tell apart: CIEDE2000 (the CIE's perceptual colour difference) between every two
subjects' colours and between each colour and that subject's own dominant colour is at least ``MIN_DISTANCE``.

Every two colours of :data:`~anystory.visualize.PALETTE` are that far apart, and no colour at all has more than
three palette colours nearer than that (tests/app/test_app_visualize.py checks both over an RGB grid), so for up to
``len(PALETTE) - 3`` subjects a choice that meets both rules always exists; :func:`pick_colours` finds it.
"""
from __future__ import annotations

import itertools
from typing import List, Sequence

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

from ..visualize import PALETTE, Color, subject_colors

#: The smallest CIEDE2000 difference kept between subjects' colours, and from each subject's own colour.
MIN_DISTANCE = 25.0


def lab(rgb: Sequence[Color]) -> np.ndarray:
    """sRGB 0..255 colours [n, 3] -> CIELAB (D65) [n, 3]."""
    return rgb2lab(np.asarray(rgb, dtype=np.float64).reshape(-1, 1, 3) / 255.0).reshape(-1, 3)


def distances(a: Sequence[Color], b: Sequence[Color]) -> np.ndarray:
    """CIEDE2000 between every colour of ``a`` and every colour of ``b``: [len(a), len(b)]."""
    la, lb = lab(a), lab(b)
    return deltaE_ciede2000(np.repeat(la[:, None], len(lb), 1), np.repeat(lb[None], len(la), 0))


def pick_colours(dominant: Sequence[Color], palette: Sequence[Color] = PALETTE) -> List[Color]:
    """One distinct palette colour per subject, as far as possible from that subject's own dominant colour.

    Maximises the smallest CIEDE2000 over subjects (then the sum), exhaustively for up to 4 subjects, greedily
    beyond (more subjects than the palette holds get evenly spaced hues); palette order breaks ties.
    """
    n = len(dominant)
    if n == 0:
        return []
    colors = [tuple(c) for c in palette] if n <= len(palette) else subject_colors(n)
    dist = distances(dominant, colors)  # [n, K]
    if n <= 4:
        def score(pick):
            d = [dist[i, k] for i, k in enumerate(pick)]
            return round(min(d), 6), sum(d)

        return [colors[k] for k in max(itertools.permutations(range(len(colors)), n), key=score)]
    picks: dict = {}
    for i in np.argsort(dist.max(axis=1)):  # subjects with the fewest good options pick first
        free = [k for k in range(len(colors)) if k not in picks.values()]
        picks[int(i)] = max(free, key=lambda k: dist[i, k])
    return [colors[picks[i]] for i in range(n)]
