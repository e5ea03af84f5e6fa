"""A storyboard rendered with the loaded model: the story checked once, then one frame per shot.

Everything a story can get wrong is found before the first frame is spent, by one rule set: the script's
structure and casts (:func:`~anystory.app.storyboard.plan_shots`), each acting character's reference
(:func:`story_subjects`) and each shot's request, with its own seed, negative prompt and background, by the Generate tab's own
:func:`~anystory.app.generation.check_request`. Frames are then yielded as they finish, so a failure in shot k
keeps shots 1..k-1.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional

from ..errors import InvalidInputError
from ..subjects import AlphaOrWholeImageSegmenter, Subject
from .generation import CheckedRequest, Progress, Request, check_request, generate
from .inputs import InputError, SubjectSlot, check_number, collect_subjects, load_image_file, resolve_seed
from .jobs import check_work
from .models import ModelHandle
from .storyboard import Frame, Script, ShotPlan, plan_shots, shot_cast
from .visualize import contrasting_colors, dominant_color, legend_html, thumbnail_uri


def story_subjects(script: Script, segmenter, max_characters: int = 16) -> Dict[str, Subject]:
    """One validated Subject per character with a reference (matting runs once per character, not per shot)."""
    acting = {a for i in range(len(script.shots)) for a in shot_cast(script, i)}
    chars = [c for c in script.characters if c.reference is not None or c.alias in acting]
    for c in chars:
        if c.reference is None:
            raise InputError(f"Character '{c.alias}' acts in a shot but has no reference image; upload one.")
    slots = [SubjectSlot(c.reference, c.mask, None, c.alias, c.scale, c.reference_scale) for c in chars]
    subjects, _ = collect_subjects(slots, max_characters, segmenter, require_one=False, noun="Character")
    return {c.alias: s for c, s in zip(chars, subjects)}


def _reference_picture(reference: Any) -> tuple:
    """(image, mask) of a character's reference as the default segmenter sees it; (None, None) when unreadable."""
    if reference is None:
        return None, None
    try:
        image = load_image_file(reference, "reference")
        return image, AlphaOrWholeImageSegmenter()(image)
    except InvalidInputError:  # a bad reference is reported where it is used; here it only loses its colour choice
        return None, None


def story_colors(script: Script) -> Dict[str, tuple]:
    """One colour per character for the whole story, so overlays of different frames can be compared; each chosen
    to differ from the dominant colour of the character's reference (a red character is not keyed in red)."""
    pictures = [_reference_picture(c.reference) for c in script.characters]
    dominant = [dominant_color(im, m) if im is not None else (128, 128, 128) for im, m in pictures]
    return dict(zip([c.alias for c in script.characters], contrasting_colors(dominant)))


def story_legend(script: Script) -> str:
    colors = story_colors(script)
    thumbs = [thumbnail_uri(im, m) if im is not None else None
              for im, m in (_reference_picture(c.reference) for c in script.characters)]
    return legend_html([c.alias for c in script.characters], colors=[colors[c.alias] for c in script.characters],
                       thumbnails=thumbs)


def _setting(value: Any, script: Script, key: str) -> Any:
    """The UI's value when given, else the script's setting."""
    return value if value not in (None, "") else script.settings.get(key)


def check_story(handle: ModelHandle, segmenter, script: Script, seed: Any = -1, steps: Any = None,
                guidance: Any = None, width: Any = None, height: Any = None) -> List[tuple]:
    """The whole story checked once: ``[(ShotPlan, CheckedRequest)]`` per shot, or the first problem raised.
    One story seed (resolved here, once) keeps the characters consistent from frame to frame."""
    story_seed = resolve_seed(script.settings.get("seed", seed) if seed in (None, "", -1) else seed)
    steps, guidance = _setting(steps, script, "steps"), _setting(guidance, script, "guidance")
    width, height = _setting(width, script, "width"), _setting(height, script, "height")
    check_work(check_number(handle.defaults.steps if steps in (None, "") else steps, "Steps", 1, 100, integer=True),
               1, len(script.shots))  # before any matting is spent
    subjects = story_subjects(script, segmenter)
    palette = story_colors(script)
    plans = plan_shots(script, subjects, story_seed, handle.max_subjects)
    return [(plan, check_request(handle, Request(plan.prompt, plan.subjects, plan.negative_prompt, plan.seed, steps,
                                                 guidance, height, width, 1, [palette[s.name] for s in plan.subjects],
                                                 plan.background, plan.background_start, plan.background_field)))
            for plan in plans]


def storyboard_frames(handle: ModelHandle, segmenter, script: Script, seed: Any = -1, steps: Any = None,
                      guidance: Any = None, width: Any = None, height: Any = None,
                      progress: Optional[Progress] = None, out_dir: Optional[str] = None) -> Iterator[Frame]:
    """Frames of ``script`` one by one, after :func:`check_story` (run at the first ``next``)."""
    shots = check_story(handle, segmenter, script, seed, steps, guidance, width, height)
    for k, (plan, checked) in enumerate(shots):
        yield _render(handle, plan, checked, _shot_progress(progress, k, len(shots)), out_dir)


def _shot_progress(progress: Optional[Progress], k: int, total: int) -> Optional[Progress]:
    """Shot ``k``'s steps as steps of the whole story."""
    if progress is None:
        return None
    return lambda i, n: progress(k * n + i, total * n)


def _render(handle: ModelHandle, plan: ShotPlan, checked: CheckedRequest, progress: Optional[Progress],
            out_dir: Optional[str]) -> Frame:
    return Frame(plan.index, plan.prompt, plan.cast, checked.seed, generate(handle, checked, progress, out_dir))
