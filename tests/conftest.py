"""Shared fixtures for the engine tests: small random datasets and one-thread BLAS.

Everything here is deliberately tiny (tens of samples, tens of units): the tests check exact
semantics, not learning, and must run in seconds on a shared 2-core machine.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """One BLAS thread for numpy references as well (the Simulator already uses one): the
    matrices are small and the test machines are shared."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def make_data(n: int, d_in: int, n_out: int, seed: int = 0):
    """``n`` samples: inputs uniform in [0, 1) (as the reference setup scales pixels), float32
    C-contiguous; labels uniform over ``n_out`` classes, int64."""
    rng = np.random.default_rng(seed)
    X = rng.random((n, d_in), dtype=np.float32)
    Y = rng.integers(0, n_out, size=n).astype(np.int64)
    return X, Y


@pytest.fixture
def data_30_5():
    """40 samples, 30 inputs, 5 classes (5 minibatches of 8)."""
    return make_data(40, 30, 5, seed=0)


@pytest.fixture
def data_20_5():
    """24 samples, 20 inputs, 5 classes (3 minibatches of 8)."""
    return make_data(24, 20, 5, seed=1)


@pytest.fixture
def data_6_3():
    """16 samples, 6 inputs, 3 classes: for time-mode runs with many steps."""
    return make_data(16, 6, 3, seed=2)


# -- numpy reference helpers shared by the rule tests (independent of the engine) ----------------
def relu(a):
    return np.maximum(a, 0.0)


def softmax(a):
    z = a - a.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def engine_masks(sim, net, nb):
    """The dropout masks the engine drew for the last trial, one per hidden layer (1.0 without
    dropout), as float64 for the references."""
    hidden = [n for n in net.circuit.populations if n.startswith("hidden")]
    if net.circuit.populations[hidden[0]].dropout == 0:
        return [1.0] * len(hidden)
    return [sim.view(f"{h}.mask", nb).astype(np.float64) for h in hidden]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic MNIST-format data set (tests/_tinyrun.py), one per test module."""
    from _tinyrun import make_mnist_like

    return make_mnist_like(tmp_path_factory.mktemp("data"))
