"""Helpers for the run/sweep/report tests: a tiny synthetic MNIST-format data set and a tiny
PEPITA scenario that trains on it in well under a second per epoch.

The synthetic files are genuine IDX files (gzip), so they go through the real loader; they are
not the canonical MNIST, so the scenarios set ``data.verify = false`` (structure checks only).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def genuine_mnist_dir() -> Path:
    """The folder with the genuine MNIST IDX files for the tests that need them: ``mnist/``
    under the first ``$NEUROSIM_DATA`` root that has it (the variable the loader itself reads,
    docs/datasets.md), else ``shared/data/mnist`` beside the repository (where the project's
    development checkouts keep it, README). Tests that need it skip when it has no files."""
    for root in filter(None, os.environ.get("NEUROSIM_DATA", "").split(os.pathsep)):
        if (Path(root) / "mnist" / "train-images-idx3-ubyte.gz").is_file():
            return Path(root) / "mnist"
    return REPO.parent / "shared" / "data" / "mnist"


MNIST = genuine_mnist_dir()

#: Scenarios that do not train on a dataset through the standard training loop (their own data
#: and runners; tested by test_teacher_student.py, test_brian2_interop.py, test_local_scenarios.py).
NOT_DATASET_SCENARIOS = ("teacher_student", "crosscheck_small", "oja_pca", "bcm_selectivity",
                         "pes_map")


def dataset_scenarios() -> list:
    """File names of the shipped scenarios that train on a dataset (MNIST-like)."""
    return sorted(p.name for p in (REPO / "scenarios").glob("*.toml")
                  if p.stem not in NOT_DATASET_SCENARIOS)
HAVE_MNIST = (MNIST / "train-images-idx3-ubyte.gz").is_file()


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, np.uint8)
    magic = 0x0803 if array.ndim == 3 else 0x0801
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + array.tobytes())


def make_mnist_like(folder: Path, n_train: int = 384, n_test: int = 128, seed: int = 0) -> Path:
    """Learnable fake MNIST: each class lights up its own block of pixels, plus noise."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            r = 2 + 2 * int(c)
            x[i, r:r + 3, 4:24] = 200 + rng.integers(0, 55)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", y)
    return folder


TINY_SCENARIO = """\
name = "tiny"
description = "a tiny PEPITA network on synthetic MNIST-format data (tests)"

[model]
name = "pepita"
sizes = [784, 24, 10]
dropout = 0.1

[data]
dataset = "mnist"
verify = false

[training]
epochs = {epochs}
batch_size = 32
lr = 0.05
momentum = 0.9
seed = 0

[simulation]
mode = "steady"

[[monitor]]
target = "angle:F"
every = 3

[[monitor]]
target = "W1.norm"
every = 3

[[monitor]]
target = "hidden.r"
phase = "modulated"
every = 4
units = [0, 6]
"""


def write_tiny_scenario(folder: Path, epochs: int = 2, extra: str = "") -> Path:
    path = Path(folder) / "tiny.toml"
    path.write_text(TINY_SCENARIO.format(epochs=epochs) + extra)
    return path
