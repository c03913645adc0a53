"""The compiled diagnostics equal numpy: the gradient-alignment monitor (angle between a rule's
update and the exact BP gradient), the PEPITA-AFA angle monitor, and the PEPITA-AFA cosine as
a function of the F scale, which tends to 1 as the scale goes to 0 (algorithms.md 1.3).

Tolerances: the monitors compute the angle in float64 from float32 update matrices that agree
with the float64 references to ~1e-6 relative (see test_feedback_alignment.py), which moves an
angle by ~1e-6 rad = 6e-5 deg away from 0/180 deg; near 0 deg, acos amplifies float32 rounding
of the cosine (1 - cos ~ 1e-7 -> 0.03 deg). Tolerance 0.05 deg (0.3 deg at 0 deg).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_data, relu as _relu, softmax as _softmax, engine_masks as _masks
from neurosim import SGD, Simulator, ValidationError, compile_plan
from neurosim.analysis import angle_deg
from neurosim.diagnostics import GradientAlignment, PepitaAfaAngle, pepita_afa_cosine
from neurosim.models import build_pepita_network
from neurosim.models.feedforward import build_feedforward_network

BATCH = 8


def _fwd(W, x, masks):
    hs, acts, h = [x], [], x
    for l, w in enumerate(W[:-1]):
        a = h @ w.T
        acts.append(a)
        h = _relu(a) * masks[l]
        hs.append(h)
    return hs, acts, _softmax(h @ W[-1].T)


def _bp(W, x, t, masks):
    hs, acts, out = _fwd(W, x, masks)
    delta = out - t
    L = len(W)
    g = [None] * L
    g[L - 1] = delta.T @ hs[L - 1]
    for l in range(L - 2, -1, -1):
        delta = (delta @ W[l + 1]) * (acts[l] > 0) * masks[l]
        g[l] = delta.T @ hs[l]
    return g


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "afa"])
def test_gradient_alignment_equals_numpy(rule):
    sizes = (12, 9, 7, 4)
    X, Y = make_data(3 * BATCH, sizes[0], sizes[-1], seed=2)
    net = build_feedforward_network(sizes, rule, dropout=0.2)
    mons = [GradientAlignment(name) for name in net.layers]
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                        batch=BATCH, seed=4, monitors=mons)
    sim = Simulator(plan)
    for j in range(3):
        idx = np.arange(j * BATCH, (j + 1) * BATCH)
        W = [sim.weights[n].astype(np.float64) for n in net.layers]
        sim.train(X, Y, idx)
        g = _bp(W, X[idx].astype(np.float64), np.eye(sizes[-1])[Y[idx]], _masks(sim, net, BATCH))
        for l, name in enumerate(net.layers):
            got = sim.traces[f"grad_angle:{name}"].values[j]
            want = angle_deg(sim.buffer(f"{name}.dW"), g[l])
            tol = 0.3 if (rule == "bp" or l == len(net.layers) - 1) else 0.05
            assert abs(got - want) < tol, (rule, name, j, got, want)
            if rule == "bp" or l == len(net.layers) - 1:
                assert got < 0.3                       # BP and every rule's last layer: exact


def test_gradient_alignment_every_and_pepita():
    sizes = (12, 9, 4)
    X, Y = make_data(6 * BATCH, sizes[0], sizes[-1], seed=3)
    net = build_pepita_network(sizes, dropout=0.1)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                        batch=BATCH, seed=1, monitors=[GradientAlignment("W1", every=2)])
    sim = Simulator(plan)
    W = [sim.weights[n].astype(np.float64) for n in net.layers]
    sim.train(X, Y, np.arange(BATCH))
    g = _bp(W, X[:BATCH].astype(np.float64), np.eye(4)[Y[:BATCH]], _masks(sim, net, BATCH))
    tr = sim.traces["grad_angle:W1"]
    assert abs(tr.values[0] - angle_deg(sim.buffer("W1.dW"), g[0])) < 0.05
    sim.train(X, Y, np.arange(BATCH, 6 * BATCH))
    np.testing.assert_array_equal(sim.traces["grad_angle:W1"].trial, [0, 2, 4])


def test_gradient_alignment_needs_an_update():
    from neurosim.plasticity.pepita_variants import PEPITATimeLocal

    net = build_pepita_network((6, 5, 3))
    opt = SGD()
    with pytest.raises(ValidationError, match="end-of-trial update"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITATimeLocal(feedback="F",
                                                                       optimizer=opt)],
                     optimizer=opt, batch=4, monitors=[GradientAlignment("W1")])


@pytest.mark.parametrize("sizes,projection", [((12, 9, 4), "W1"), ((12, 9, 7, 4), "W2")])
def test_pepita_afa_angle_equals_numpy(sizes, projection):
    X, Y = make_data(2 * BATCH, sizes[0], sizes[-1], seed=5)
    net = build_pepita_network(sizes, dropout=0.2, f_scale=0.5)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                        batch=BATCH, seed=3, monitors=[PepitaAfaAngle(projection)], fuse=False)
    sim = Simulator(plan)
    F = sim.weights["F"].astype(np.float64)
    s = net.circuit.projections["F"].gain
    li = net.layers.index(projection)
    for j in range(2):
        idx = np.arange(j * BATCH, (j + 1) * BATCH)
        W = [sim.weights[n].astype(np.float64) for n in net.layers]
        sim.train(X, Y, idx)
        masks = _masks(sim, net, BATCH)
        x, t = X[idx].astype(np.float64), np.eye(sizes[-1])[Y[idx]]
        hs, acts, out = _fwd(W, x, masks)
        u = s * ((out - t) @ F.T)
        for l in range(li + 1):
            u = (u @ W[l].T) * (acts[l] > 0) * masks[l]
        afa = -(u.T @ hs[li])
        want = angle_deg(sim.buffer(f"{projection}.dW"), afa)
        got = sim.traces[f"pepita_afa_angle:{projection}"].values[j]
        assert abs(got - want) < 0.05, (j, got, want)


def test_pepita_afa_cosine_goes_to_one():
    """PEPITA's first-layer update -> AFA's as the F scale -> 0. For smooth units the difference
    is the next order of the expansion h~ = h + s D W F e + O(|F e|^2) (and x~ - x = s F e in the
    presynaptic factor): angle O(f), 1 - cos O(f^2). ReLU units whose pre-activation lies within
    |W F e| of 0 switch between the passes, which the first-order (AFA) term misses; their share
    falls linearly with f. Measured per sample on this net: mean cos 0.908, 0.9926, 0.9992,
    0.9999999 (min 0.69, 0.89, 0.987, 0.9999997) at scales 0.5, 0.05, 0.005, 0.0005."""
    X, Y = make_data(16, 20, 5, seed=0)
    fs, cos = pepita_afa_cosine(X, Y, [0.5, 0.05, 0.005, 0.0005], sizes=(20, 16, 5), seed=0)
    assert cos.shape == (4, 16)
    m = cos.mean(axis=1)
    assert np.all(np.diff(m) > 0), m
    assert m[-1] > 0.99999 and cos[-1].min() > 0.9999, cos[-1]
    gap = 1 - m
    assert gap[-1] < 1e-4 * gap[0], gap


def test_gradient_alignment_time_local():
    """PEPITA-TL keeps its summed update on request; the monitor compares it with the BP
    gradient (numpy: the angle between the recorded update and BP at the trial's clean state,
    with the weights after the trial, as documented)."""
    from neurosim.plasticity.pepita_variants import PEPITATimeLocal

    sizes = (12, 9, 4)
    X, Y = make_data(BATCH, sizes[0], sizes[-1], seed=7)
    net = build_pepita_network(sizes, dropout=0.0)
    opt = SGD(lr=0.01, momentum=0.0)
    rule = PEPITATimeLocal(feedback="F", optimizer=opt, record_update=True)
    plan = compile_plan(net.circuit, net.protocol, rules=[rule], optimizer=opt, batch=BATCH,
                        seed=1, monitors=[GradientAlignment("W1", update="pepita_tl.W1.update")])
    sim = Simulator(plan)
    W0 = [sim.weights[n].astype(np.float64) for n in net.layers]
    sim.train(X, Y)
    upd = sim.buffer("pepita_tl.W1.update").astype(np.float64)
    W1 = [sim.weights[n].astype(np.float64) for n in net.layers]
    # the summed update is the Hebbian-form PEPITA update: lr * upd / B = W0 - W1 (no momentum)
    np.testing.assert_allclose(0.01 * upd / BATCH, W0[0] - W1[0], rtol=1e-4, atol=1e-7)
    hs, acts, out = _fwd(W0, X.astype(np.float64), [1.0])
    e = out - np.eye(4)[Y]
    g = ((e @ W1[1]) * (acts[0] > 0)).T @ hs[0]
    got = sim.traces["grad_angle:W1"].values[0]
    assert abs(got - angle_deg(upd, g)) < 0.05, (got, angle_deg(upd, g))


def test_gradient_alignment_respects_gains():
    """With a forward gain g (a = g W h) the exact gradient is g delta^T h and the error flows
    back through g W; the monitor's reference gradient includes both (numpy check)."""
    import dataclasses

    sizes = (10, 8, 6, 3)
    X, Y = make_data(BATCH, sizes[0], sizes[-1], seed=9)
    net = build_feedforward_network(sizes, "fa", dropout=0.0)
    c = net.circuit
    gains = {"W1": 0.5, "W2": 2.0, "W3": 1.5}
    for k, g in gains.items():
        c.projections[k] = dataclasses.replace(c.projections[k], gain=g)
    plan = compile_plan(c, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1), batch=BATCH,
                        seed=2, monitors=[GradientAlignment("W1"), GradientAlignment("W2")])
    sim = Simulator(plan)
    W = [sim.weights[n].astype(np.float64) for n in net.layers]
    sim.train(X, Y)
    gs = [gains[n] for n in net.layers]
    hs, acts, h = [X.astype(np.float64)], [], X.astype(np.float64)
    for l in range(2):
        a = gs[l] * h @ W[l].T
        acts.append(a)
        h = np.maximum(a, 0)
        hs.append(h)
    z = gs[2] * h @ W[2].T
    p = np.exp(z - z.max(1, keepdims=True))
    delta = p / p.sum(1, keepdims=True) - np.eye(3)[Y]
    grads = {}
    for l in (1, 0):
        delta = gs[l + 1] * (delta @ W[l + 1]) * (acts[l] > 0)
        grads[net.layers[l]] = gs[l] * delta.T @ hs[l]
    for n in ("W1", "W2"):
        want = angle_deg(sim.buffer(f"{n}.dW"), grads[n])
        assert abs(sim.traces[f"grad_angle:{n}"].values[0] - want) < 0.05, n


# ---- gradient alignment from a scenario file -------------------------------------------------
def _ga_settings(rule, monitors):
    from neurosim import scenario as sc

    raw = {"model": {"name": rule, "sizes": [20, 16, 4]},
           "data": {"train_limit": 100}, "training": {"batch_size": 8},
           "monitor": monitors}
    return sc.validate(raw)


def test_grad_angle_monitor_from_a_scenario():
    """``[[monitor]] target = "grad_angle:W1"`` records the angle between the rule's update and
    the BP gradient: BP's is 0 up to float32 rounding of two different summation orders
    (< 0.1 deg), FA's hidden-layer angle is far from 0 at the start (random B), and its
    output-layer update is the exact gradient."""
    from neurosim.training import make_simulator

    X, Y = make_data(64, 20, 4, seed=5)
    ang = {}
    for rule in ("bp", "fa"):
        sim = make_simulator(_ga_settings(rule, [{"target": "grad_angle:W1", "every": 2},
                                                 {"target": "grad_angle:W2"}]))
        sim.train(X, Y)
        tr = sim.traces
        assert list(tr["grad_angle:W1"].trial) == [0, 2, 4, 6]
        ang[rule] = {k: tr[k].values.ravel() for k in tr}
    assert ang["bp"]["grad_angle:W1"].max() < 0.1 and ang["bp"]["grad_angle:W2"].max() < 0.1
    assert ang["fa"]["grad_angle:W1"][0] > 30 and ang["fa"]["grad_angle:W2"].max() < 0.1


def test_grad_angle_monitor_errors_name_the_scenario_key():
    from neurosim import ValidationError
    from neurosim.training import make_simulator

    with pytest.raises(ValidationError, match=r"monitor\[1\]\.projection.*not on the feedforward"):
        make_simulator(_ga_settings("fa", [{"target": "grad_angle:W1"},
                                           {"target": "grad_angle:W9"}]))
    with pytest.raises(ValidationError, match=r"monitor\[0\]\.per"):
        _ga_settings("fa", [{"target": "grad_angle:W1", "per": "step"}])
