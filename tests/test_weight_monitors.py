"""Weight and synapse monitors: ``proj.w`` (the whole matrix or chosen synapses, after each
trial's update) and ``proj.dw`` (the rules' summed update of the trial), on both backends,
against snapshots taken between one-minibatch training calls."""

from __future__ import annotations

import numpy as np
import pytest

from neurosim import SGD, Monitor, Simulator, ValidationError, compile_plan
from neurosim.models import build_pepita_network

from conftest import make_data


def _plan(monitors, **kw):
    net = build_pepita_network((12, 9, 4), dropout=0.0)
    return compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=0.05, momentum=0.0), monitors=monitors, batch=4,
                        seed=1, **kw)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_weights_synapses_and_updates_are_recorded(backend):
    X, Y = make_data(24, 12, 4, seed=3)
    mons = [Monitor("W1.w", every=2), Monitor("W2.w", synapses=[(0, 0), (3, 8), (1, 2)],
                                               name="W2 synapses"), Monitor("W1.dw")]
    sim = Simulator(_plan(mons), backend=backend)
    ref = Simulator(_plan([]), backend=backend)
    snaps_w1, snaps_w2, upd = [], [], []
    for j in range(6):   # one minibatch at a time: W after trial j, and the update of trial j
        idx = np.arange(4 * j, 4 * j + 4)
        before = ref.weights["W1"].astype(np.float64)
        ref.train(X, Y, idx)
        snaps_w1.append(ref.weights["W1"].copy())
        snaps_w2.append(ref.weights["W2"].copy())
        # momentum 0, reference style: W1 = W0 - lr dW / B, so dW = (W0 - W1) B / lr
        upd.append((before - ref.weights["W1"]) * 4 / 0.05)
    sim.train(X, Y)
    tr = sim.traces
    w1 = tr["W1.w"]
    assert w1.values.shape == (3, 9, 12) and list(w1.trial) == [0, 2, 4]
    for k, t in enumerate(w1.trial):
        np.testing.assert_array_equal(w1.values[k], snaps_w1[t])
    syn = tr["W2 synapses"]
    assert syn.values.shape == (6, 3)
    for t in range(6):
        np.testing.assert_array_equal(syn.values[t], snaps_w2[t][[0, 3, 1], [0, 8, 2]])
    dw = tr["W1.dw"]
    assert dw.values.shape == (6, 9, 12)
    for t in range(6):   # the recovered update carries the rounding of W - lr dW/B: ~1e-5 rel.
        np.testing.assert_allclose(dw.values[t], upd[t], rtol=1e-3,
                                   atol=1e-3 * np.abs(upd[t]).max())


def test_recording_the_update_keeps_it_explicit_and_the_run_unchanged():
    """Reading dW disables the momentum fusion for that projection only; the weights are the
    same as without the monitor up to the fused GEMM's rounding (a single GEMM: bitwise)."""
    X, Y = make_data(16, 12, 4, seed=4)
    a = Simulator(_plan([Monitor("W1.dw")]))
    b = Simulator(_plan([]))
    a.train(X, Y)
    b.train(X, Y)
    np.testing.assert_array_equal(a.weights["W1"], b.weights["W1"])


def test_weight_monitor_errors():
    with pytest.raises(ValidationError, match="synapses"):
        Monitor("W1.w", synapses=[(0,)])
    with pytest.raises(ValidationError, match="outside"):
        _plan([Monitor("W1.w", synapses=[(9, 0)])])
    with pytest.raises(ValidationError, match="no end-of-trial update"):
        _plan([Monitor("F.dw")])
    with pytest.raises(ValidationError, match="synapses select"):
        _plan([Monitor("hidden.r", synapses=[(0, 0)])])
