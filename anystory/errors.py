"""Every exception AnyStory raises on purpose, under one base class, kept apart from programming errors.

``AnyStoryError`` is the base: catching it catches every failure this project reports by design, and nothing
else (a bug surfaces as whatever Python raised). Each class also keeps the built-in base it always had
(``ValueError``, ``RuntimeError``, ``FileNotFoundError``), so callers that catch those keep working, and each is
still importable from the module that raises it.

``InvalidInputError`` is what a user can fix (a file, a mask, a number, a script); its message names the problem
and is shown as is. The app reports these, and only these, as input errors and lets every other exception surface
as a bug. :func:`check_number` is the one rule for a number a user gives, wherever it enters (so its messages
agree).
"""
import math
from typing import Type, Union


class AnyStoryError(Exception):
    """The base of every exception AnyStory raises on purpose; its message says what happened and what to do."""


# ---- bad input: the user can fix it ------------------------------------------------------------------------------
class InvalidInputError(AnyStoryError, ValueError):
    """Bad input from the user (image, mask, subject list, number, script); the message says what to fix."""


class InputError(InvalidInputError):
    """A problem with what the user gave in the app; the message is shown as is."""


class ScriptError(InvalidInputError):
    """The storyboard script is malformed; the message names the character or shot and what to fix."""


# ---- models and weights ------------------------------------------------------------------------------------------
class ModelUnavailableError(AnyStoryError, RuntimeError):
    """A model could not be loaded (not on disk and no network to fetch it)."""


class NoModelError(AnyStoryError, RuntimeError):
    """No model could be loaded for the app; the message lists why for each."""


class AnyStoryWeightsError(AnyStoryError, ValueError):
    """The weights file does not have the released layout; the message names the offending keys."""


class AnyStoryConflictError(AnyStoryError, RuntimeError):
    """Two adapters that replace the same attention processors were asked to work together."""


# ---- running: generation, training, data, evaluation -------------------------------------------------------------
class GenerationError(AnyStoryError, RuntimeError):
    """Generation failed for a reason the user can act on (the message says how); not an input error."""


class Cancelled(AnyStoryError):
    """The visitor's browser went away (or the session ended): the app's job stopped early, by design."""


class StageStopped(AnyStoryError):
    """A training stage reached its ``stop_after`` step: the checkpoint is saved, the next run resumes it."""


class DataFormatError(AnyStoryError, ValueError):
    """A sample or a dataset does not follow the layout; the message names the sample and what is wrong."""


class DataNotFoundError(AnyStoryError, FileNotFoundError):
    """The benchmark data is not where it was looked for (and could not be downloaded)."""


class DataIntegrityError(AnyStoryError, RuntimeError):
    """Downloaded files do not match the pinned checksums."""


class MetricUnavailable(AnyStoryError, RuntimeError):
    """An evaluation metric's model (or its weights) cannot be had here; the message says why and what to do."""


class MethodError(AnyStoryError, RuntimeError):
    """An evaluated method cannot be set up (model absent, folder missing); the message says what to do."""


class RunError(AnyStoryError, RuntimeError):
    """The evaluation run cannot proceed as asked (existing results, changed settings, ...); nothing was
    overwritten."""


class NoMetricError(RunError):
    """Not one requested evaluation metric could load: a table of counts alone is not an evaluation. The
    message says what to install or which file to put where; generated images are kept."""


def check_number(value, what: str, low: float = -math.inf, high: float = math.inf, *, integer: bool = False,
                 typed: bool = False, error: Type[InvalidInputError] = InvalidInputError) -> Union[int, float]:
    """``value`` as a finite float (an int when ``integer``) in ``[low, high]``, else ``error`` naming ``what``.

    The one number rule of the pipelines, the app and the storyboard. ``typed``: only int and float values are
    numbers (a parsed script's ``"7"`` or ``true`` is a mistake to report, where a text field's ``"7"`` is not).
    """
    kind = "an integer" if integer else "a number"
    if typed and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise error(f"{what} must be {kind}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise error(f"{what} must be {kind}, got {value!r}") from None
    if not math.isfinite(v):
        raise error(f"{what} must be finite, got {v}")
    if not low <= v <= high or (integer and not v.is_integer()):
        lo, hi, got = _shown(low), _shown(high), _shown(v)
        if math.isinf(low) and math.isinf(high):
            allowed = kind
        elif math.isinf(high):
            allowed = f"{kind} >= {lo}"
        elif math.isinf(low):
            allowed = f"{kind} <= {hi}"
        else:
            allowed = f"{kind} between {lo} and {hi}"
        raise error(f"{what} must be {allowed}, got {got}")
    return int(v) if integer else v


def _shown(x: float) -> str:
    """A bound or value as the user would write it: whole numbers in full (a seed limit of 2147483647, not
    2.14748e+09), others short."""
    return str(int(x)) if math.isfinite(x) and float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"
