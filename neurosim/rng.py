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
