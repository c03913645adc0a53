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

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S40 = np.uint64(40)
_INV24 = np.float32(1.0 / (1 << 24))


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


def normal01_reference(key: int, counters: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`normal01`."""
    c = counters.astype(np.uint64)
    u1 = 1.0 - uniform01_reference(key, np.uint64(2) * c).astype(np.float64)
    u2 = uniform01_reference(key, np.uint64(2) * c + np.uint64(1)).astype(np.float64)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def uniform01_reference(key: int, counters: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`uniform01` over an array of counters."""
    with np.errstate(over="ignore"):
        c = counters.astype(np.uint64)
        z = np.uint64(key) + (c + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        z = z ^ (z >> _S31)
    return (z >> _S40).astype(np.float32) * _INV24
