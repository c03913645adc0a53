"""Time mode: leaky-integrator dynamics, and convergence to the steady-state mode.

In time mode hidden and output populations follow ``tau dr/dt = -r + mask * f(drive)`` for
``phase_duration`` per phase (the modulated phase continues from the clean phase's end state).
Both integrators have the steady-state rates as their exact fixed point, so a PEPITA step in time
mode must approach the steady-mode step as ``phase_duration / tau`` grows (the transient decays
like exp(-T/tau) times a polynomial, from the chain of layers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_data
from neurosim import (SGD, Circuit, Given, Monitor, Phase, Protocol, Simulator, ValidationError,
                      compile_plan)
from neurosim.models import build_pepita_network

TAU, DT = 0.01, 0.0005          # dt / tau = 0.05
RATIOS = (2, 4, 8, 16)          # phase_duration / tau


def _train(sizes, convention, X, Y, **time_kw):
    net = build_pepita_network(sizes, convention=convention, dropout=0.1, **time_kw)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=0.1, momentum=0.9), batch=8, seed=7)
    sim = Simulator(plan)
    W0 = {k: np.array(sim.weights[k], np.float64) for k in net.layers}
    sim.train(X, Y)
    return sim, W0, net


@pytest.mark.parametrize("method", ["euler", "exp_euler"])
@pytest.mark.parametrize("sizes,convention", [((12, 10, 4), "icml2022"),
                                              ((12, 10, 8, 4), "iclr2024")], ids=["1h", "2h"])
def test_time_mode_converges_to_steady(method, sizes, convention):
    """3 minibatches of 8, same seed (same initial weights and dropout masks) in both modes.

    Deviation = ||W_time - W_steady|| / ||W_steady - W0|| per layer (relative to the update,
    since five PEPITA steps move W by < 1%): measured for 2 hidden layers, Euler,
    T/tau = 2, 4, 8, 16: W1 11, 1.5, 2e-2, 8e-5; W3 0.11, 2e-2, 7e-4, 2e-6 (the last is the
    float32 rounding floor). It must fall strictly at every doubling and end below 1e-3.
    """
    X, Y = make_data(24, sizes[0], sizes[-1], seed=3)
    steady, W0, net = _train(sizes, convention, X, Y)
    hidden = [p for p in net.circuit.populations if p.startswith("hidden")]
    devs, rate_devs = [], []
    for ratio in RATIOS:
        sim, W0t, _ = _train(sizes, convention, X, Y, mode="time", tau=TAU, dt=DT,
                             phase_duration=ratio * TAU, method=method)
        for k in W0:                                    # same initialisation in both modes
            np.testing.assert_array_equal(W0t[k], W0[k])
        devs.append([np.linalg.norm(sim.weights[k] - steady.weights[k].astype(np.float64))
                     / np.linalg.norm(steady.weights[k] - W0[k]) for k in net.layers])
        # rates held at the end of each phase of the last minibatch
        rate_devs.append(max(np.max(np.abs(sim.rate(p, ph) - steady.rate(p, ph)))
                             for p in hidden + ["output"] for ph in ("clean", "modulated")))
    devs = np.array(devs)                               # (ratio, layer)
    assert np.all(np.diff(devs, axis=0) < 0), f"not monotone: {devs}"
    assert np.all(devs[-1] < 1e-3), devs
    assert np.all(devs[0] > 30 * devs[-1]), devs        # the trend is real, not noise
    assert np.all(np.diff(rate_devs) < 0), rate_devs
    assert rate_devs[-1] < 1e-4, rate_devs


def _leaky_circuit(tau, weight=1.5, transfer="identity"):
    """x (instantaneous input) -> h (leaky, tau) with a fixed 2x2 weight."""
    c = Circuit("leaky")
    c.population("x", 2)
    c.population("h", 2, tau=tau, transfer=transfer)
    c.project("x", "h", name="W", init=Given(np.array([[weight, 0.0], [0.0, -weight]])))
    return c


@pytest.mark.parametrize("method", ["euler", "exp_euler"])
def test_free_run_matches_closed_form(method):
    """Identity transfer, constant drive d, r(0) = 0: Euler gives r_n = d (1 - (1 - dt/tau)^n);
    exponential Euler is exact, r_n = d (1 - exp(-n dt / tau)). Recorded every step."""
    tau, dt, n = 0.01, 0.001, 60
    c = _leaky_circuit(tau)
    proto = Protocol((Phase("run", clamp={"x": "x"}, duration=n * dt),), mode="time", dt=dt,
                     method=method)
    plan = compile_plan(c, proto, batch=2, monitors=[Monitor("h.r", sample=1)])
    sim = Simulator(plan)
    x = np.array([[1.0, 2.0], [0.5, -1.0]], np.float32)
    sim.set_stimulus("x", x)
    sim.run(steps=n)
    d = x[1] @ np.array([[1.5, 0.0], [0.0, -1.5]]).T
    k = np.arange(1, n + 1)[:, None]
    decay = (1 - dt / tau) ** k if method == "euler" else np.exp(-k * dt / tau)
    want = d * (1 - decay)
    tr = sim.traces["h.r"]
    np.testing.assert_allclose(tr.values, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tr.step, np.arange(1, n + 1))
    np.testing.assert_allclose(tr.t, np.arange(1, n + 1) * dt)
    assert tr.t_unit == "s"


def test_free_run_converges_to_steady_rates():
    """A PEPITA network free-run in its clean phase for 40 tau reaches the steady forward pass
    relu(W1 x) -> softmax(W2 h) (no dropout outside training)."""
    sizes = (12, 10, 4)
    net = build_pepita_network(sizes, mode="time", tau=TAU, dt=DT, phase_duration=4 * TAU)
    plan = compile_plan(net.circuit, net.protocol, batch=3, seed=2)
    sim = Simulator(plan)
    X, _ = make_data(3, 12, 4, seed=9)
    sim.set_stimulus("x", X)
    sim.run(duration=40 * TAU, phase="clean")
    W1 = np.array(sim.weights["W1"], np.float64)
    W2 = np.array(sim.weights["W2"], np.float64)
    h = np.maximum(X @ W1.T, 0.0)
    a = h @ W2.T
    o = np.exp(a - a.max(1, keepdims=True))
    o /= o.sum(1, keepdims=True)
    np.testing.assert_allclose(sim.rate("hidden", "clean"), h, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(sim.rate("output", "clean"), o, rtol=1e-4, atol=1e-6)
    assert sim.step == round(40 * TAU / DT)


def test_euler_rejects_dt_above_tau():
    """Forward Euler with dt > tau overshoots (alpha = dt/tau > 1): rejected at compile time,
    naming Protocol.dt, the dt and the population; exp_euler is stable and accepted; dt = tau
    (alpha = 1) is the largest Euler step allowed."""
    c = _leaky_circuit(tau=0.001)
    ph = (Phase("run", clamp={"x": "x"}, duration=0.01),)
    with pytest.raises(ValidationError) as ei:
        compile_plan(c, Protocol(ph, mode="time", dt=0.002, method="euler"))
    msg = str(ei.value)
    assert "Protocol.dt" in msg and "0.002" in msg and "'h'" in msg and "exp_euler" in msg
    compile_plan(c, Protocol(ph, mode="time", dt=0.002, method="exp_euler"))
    compile_plan(c, Protocol(ph, mode="time", dt=0.001, method="euler"))
    # in steady mode tau and dt play no role
    compile_plan(c, Protocol((Phase("run", clamp={"x": "x"}),), mode="steady", dt=0.002))


def test_exp_euler_large_step_converges():
    """exp_euler with dt = 5 tau still relaxes to f(drive) (alpha = 1 - e^-5)."""
    tau = 0.001
    c = _leaky_circuit(tau, transfer="tanh")
    proto = Protocol((Phase("run", clamp={"x": "x"}, duration=0.05),), mode="time", dt=5 * tau,
                     method="exp_euler")
    sim = Simulator(compile_plan(c, proto, batch=1))
    sim.set_stimulus("x", [0.3, 0.7])
    sim.run(steps=10)
    want = np.tanh(np.array([0.3 * 1.5, -0.7 * 1.5]))
    alpha = 1 - math.exp(-5)
    np.testing.assert_allclose(sim.rate("h", "run")[0], want * (1 - (1 - alpha) ** 10),
                               rtol=1e-5)
