"""One root seed, independent streams keyed by component name (adding a monitor never changes
the initial weights)."""

from __future__ import annotations

import zlib

import numpy as np


def _seq(root: int, name: str) -> np.random.SeedSequence:
    return np.random.SeedSequence(int(root), spawn_key=(zlib.crc32(name.encode()),))


def component_rng(root: int, name: str) -> np.random.Generator:
    """A numpy Generator for the component ``name`` under the root seed."""
    return np.random.default_rng(_seq(root, name))


def component_key(root: int, name: str) -> np.uint64:
    """A 64-bit key for the compiled counter-based generator (:mod:`neurosim.kernels.rng`)."""
    return _seq(root, name).generate_state(1, np.uint64)[0]


# the counter-based generator of neurosim.kernels.rng (SplitMix64), as numpy twins
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S40 = np.uint64(40)
_INV24 = np.float32(1.0 / (1 << 24))


def normal01_reference(key: int, counters: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`neurosim.kernels.rng.normal01`."""
    c = counters.astype(np.uint64)
    u1 = 1.0 - uniform01_reference(key, np.uint64(2) * c).astype(np.float64)
    u2 = uniform01_reference(key, np.uint64(2) * c + np.uint64(1)).astype(np.float64)
    return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(np.float32)


def uniform01_reference(key: int, counters: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`neurosim.kernels.rng.uniform01` over an array of counters."""
    with np.errstate(over="ignore"):
        c = counters.astype(np.uint64)
        z = np.uint64(key) + (c + np.uint64(1)) * _GOLDEN
        z = (z ^ (z >> _S30)) * _M1
        z = (z ^ (z >> _S27)) * _M2
        z = z ^ (z >> _S31)
    return (z >> _S40).astype(np.float32) * _INV24
