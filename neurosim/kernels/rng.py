"""Counter-based random numbers for compiled code.

A draw is a pure function of ``(key, counter)`` (SplitMix64 finaliser), so a dropout mask or a
negative label depends only on the seed, the component and the trial index: runs are identical
however they are chunked, resumed or threaded. Keys are derived in Python from the root seed and
the component name (:func:`neurosim.rng.component_key`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..rng import _GOLDEN, _INV24, _M1, _M2, _S27, _S30, _S31, _S40  # noqa: E402  (one definition)


@njit(cache=True, inline="always")
def mix64(z):
    """SplitMix64 finaliser of a uint64."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, inline="always")
def uniform01(key, counter):
    """A float32 in [0, 1) from ``(key, counter)``, both uint64."""
    z = mix64(key + (counter + np.uint64(1)) * _GOLDEN)
    return np.float32(z >> _S40) * _INV24


@njit(cache=True, inline="always")
def normal01(key, counter):
    """A standard normal draw (float32) from ``(key, counter)``: Box-Muller on the uniforms of
    counters ``2 counter`` and ``2 counter + 1`` (float64 inside; ``1 - u`` keeps the log finite)."""
    u1 = 1.0 - np.float64(uniform01(key, np.uint64(2) * counter))
    u2 = np.float64(uniform01(key, np.uint64(2) * counter + np.uint64(1)))
    return np.float32(math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))


# the numpy twins live in neurosim.rng (no numba on the reference backend's path)
from ..rng import normal01_reference, uniform01_reference  # noqa: E402,F401
