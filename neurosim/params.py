"""Small validators used by every description. Each raises ValidationError('Obj.attr: ...')."""

from __future__ import annotations

import math
import numbers

from .errors import ValidationError


def check_name(owner: str, value) -> str:
    if not isinstance(value, str) or not value or not value.replace("_", "a").replace("-", "a").isalnum():
        raise ValidationError(f"{owner}.name", f"got {value!r}, expected a non-empty identifier "
                              "(letters, digits, '_' or '-').")
    return value


def check_int(where: str, value, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValidationError(where, f"got {type(value).__name__} {value!r}, expected an integer.")
    if low is not None and value < low:
        raise ValidationError(where, f"got {value}, expected an integer >= {low}.")
    return int(value)


def check_float(where: str, value, *, low=None, high=None, low_open=False, high_open=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValidationError(where, f"got {type(value).__name__} {value!r}, expected a number.")
    try:
        v = float(value)
    except OverflowError:
        raise ValidationError(where, f"got {value!r:.40}, too large for a float.") from None
    if not math.isfinite(v):
        raise ValidationError(where, f"got {value!r}, expected a finite number.")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValidationError(where, f"got {v}, expected a number {'>' if low_open else '>='} {low}.")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValidationError(where, f"got {v}, expected a number {'<' if high_open else '<='} {high}.")
    return v


def check_choice(where: str, value, choices) -> str:
    if value not in choices:
        import difflib

        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"did you mean {close[0]!r}?" if close else None
        raise ValidationError(where, f"got {value!r}, expected one of {list(choices)}.", hint)
    return value
