"""The exception for bad user input, kept apart from programming errors.

``InvalidInputError`` is what a user can fix (a file, a mask, a number, a script); its message names the problem
and is shown as is. It subclasses ``ValueError`` so callers that catch ``ValueError`` keep working, while the app
can report these, and only these, as input errors and let every other exception surface as a bug.
:func:`check_number` is the one rule for a number a user gives, wherever it enters (so its messages agree).
"""
import math
from typing import Type, Union


class InvalidInputError(ValueError):
    """Bad input from the user (image, mask, subject list, number, script); the message says what to fix."""


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
