"""Time and rate parameters: plain floats in SI units, brian2 quantities, or unit strings.

brian2 is imported only when a brian2 object is actually passed, so parsing a scenario never
pays brian2's import time.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np

from .errors import BareTimeWarning, ValidationError

# Unit symbols are case-sensitive, as in SI and brian2 ("mHz" is millihertz, "MHz" megahertz).
_TIME_UNITS = {"s": 1.0, "second": 1.0, "seconds": 1.0, "sec": 1.0,
               "ms": 1e-3, "msecond": 1e-3, "msec": 1e-3,
               "us": 1e-6, "usecond": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6,
               "ns": 1e-9, "nsecond": 1e-9, "min": 60.0, "minute": 60.0, "minutes": 60.0}
_RATE_UNITS = {"Hz": 1.0, "hz": 1.0, "hertz": 1.0, "kHz": 1e3, "khz": 1e3, "khertz": 1e3,
               "MHz": 1e6, "Mhertz": 1e6, "mHz": 1e-3, "mhertz": 1e-3}
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PATTERN = re.compile(rf"^\s*({_NUM})\s*\*?\s*([A-Za-z\u00b5\u03bc]+)\s*$")


def _is_brian_quantity(value) -> bool:
    return type(value).__module__.startswith("brian2") and hasattr(value, "dim")


BARE_TIME_WARN_S = 1.0
"""A bare number (no unit) read as this many seconds or more draws a :class:`BareTimeWarning`
where a time constant or duration is expected: rate-model time constants and phases are
milliseconds to a few hundred milliseconds, so ``tau=10`` almost always meant 10 ms."""


def to_seconds(value, where: str, *, allow_zero: bool = True, warn_bare: bool = False) -> float:
    """Convert a time parameter to seconds (float).

    Accepts a float/int (seconds), a brian2 quantity with the dimension of time (``10*ms``) or a
    string (``"10 ms"``, ``"0.1ms"``, ``"2 s"``). Raises :class:`ValidationError` naming
    ``where`` for a wrong dimension, a negative or non-finite value, or an unknown unit. With
    ``warn_bare``, a number given without a unit that is :data:`BARE_TIME_WARN_S` (1 s) or more
    draws a :class:`~neurosim.errors.BareTimeWarning` naming ``where``.
    """
    seconds = _convert(value, where, _TIME_UNITS, "time", "second")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValidationError(where, f"got {value!r}, expected a time {bound}.",
                              "times are in seconds unless a unit is given, e.g. '10 ms'.")
    if warn_bare and seconds >= BARE_TIME_WARN_S and is_bare_number(value):
        warnings.warn(f"{where}: the bare number {value!r} is read as {seconds:g} s (times without "
                      f"a unit are in seconds). Write it with its unit: '{value} ms' if you meant "
                      f"milliseconds, or '{value} s' to keep seconds and silence this warning.",
                      BareTimeWarning, stacklevel=4)
    return seconds


def is_bare_number(value) -> bool:
    """True for a number given without a unit: int, float, numpy scalar or a numeric string."""
    if isinstance(value, (bool, np.bool_)) or _is_brian_quantity(value):
        return False
    if isinstance(value, str):
        return _PATTERN.match(value) is None
    return isinstance(value, (int, float, np.number)) or getattr(value, "ndim", None) == 0


def to_hertz(value, where: str, *, allow_zero: bool = True) -> float:
    """Convert a rate parameter (float in Hz, brian2 quantity, or ``"5 Hz"``) to Hz (>= 0)."""
    hertz = _convert(value, where, _RATE_UNITS, "rate", "hertz")
    if hertz < 0 or (hertz == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValidationError(where, f"got {value!r}, expected a rate {bound}.",
                              "rates are in Hz unless a unit is given, e.g. '5 Hz'.")
    return hertz


def _convert(value, where, table, kind, si_name):
    example = "10 ms" if kind == "time" else "5 Hz"
    if isinstance(value, (bool, np.bool_)):
        raise ValidationError(where, f"got the boolean {value!r}, expected a {kind}.")
    if _is_brian_quantity(value):
        from brian2 import Quantity, get_dimensions
        from brian2.units import second, hertz

        target = second if kind == "time" else hertz
        if get_dimensions(value) != get_dimensions(target):
            raise ValidationError(
                where, f"got {value!r} with dimensions {get_dimensions(value)}, expected a {kind} "
                f"(dimension of {si_name}).", f"write it as e.g. {example.replace(' ', '*')}.")
        q = Quantity(value) / target
        if getattr(q, "size", 1) != 1:
            raise ValidationError(where, f"got {value!r}, expected a single {kind}, not an array.")
        out = float(q.reshape(()) if hasattr(q, "reshape") else q)
    elif isinstance(value, (int, float)):
        try:
            out = float(value)
        except OverflowError:
            out = math.inf
    elif isinstance(value, str):
        m = _PATTERN.match(value)
        if m is None:
            try:
                out = float(value)
            except ValueError:
                raise ValidationError(where, f"could not read {value!r} as a {kind}.",
                                      f"write a number with a unit, e.g. {example!r}.") from None
        else:
            unit = m.group(2)
            factor = table.get(unit)
            if factor is None:
                raise ValidationError(
                    where, f"unknown or wrong-dimension unit {unit!r} in {value!r}; expected a "
                    f"{kind} unit (case-sensitive), one of {sorted(table)}.",
                    f"e.g. {example!r}.")
            out = float(m.group(1)) * factor
    else:
        try:  # numpy scalars and 0-d arrays
            if getattr(value, "ndim", 0) != 0:
                raise TypeError("not a scalar")
            out = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ValidationError(where, f"got {type(value).__name__} {value!r}, expected a {kind} "
                                  f"(float in SI units, brian2 quantity, or string like "
                                  f"{example!r}).") from None
    if not math.isfinite(out):
        raise ValidationError(where, f"got {value!r}, expected a finite {kind}.")
    return out
