"""Local rules (neurosim.plasticity.local: Hebbian with decay, Oja, BCM, PES) against numpy
twins and closed forms, on feedforward, recurrent and feedback projections, in steady and time
mode, at the phase end and continuously.

The twin circuit: input ``x`` (3) -> ``E`` (4, tanh) through ``Win``; ``E`` -> ``E`` through
``R`` (recurrent: live in time mode, from the held trace ``E@stim`` in steady mode, where a live
loop of instantaneous populations is a cycle); ``E`` -> ``y`` (2, identity) through ``D``;
``mis = y - t`` (an error population); ``Fb`` from ``mis@stim`` back onto ``E`` in phase
``fb`` (feedback). Phases ``stim`` (x clamped) and ``fb``. The twin integrates the same
equations in float64 (time mode: explicit Euler, every drive from the state at t, then the
rates, then the instantaneous populations) and applies each rule's formula to its traces.

Tolerance of the one-trial comparisons: the engine computes in float32; a trial is a chain of
at most ~50 Euler steps of a few float32 operations each on values of order 1, so the rates
differ from the float64 twin by at most ~250 eps32 ~ 2e-5 relative (typically far less), and
the update inherits that: ``||step - step_twin|| <= 1e-4 ||step||`` holds with margin.
"""

from __future__ import annotations

import numpy as np
import pytest

from neurosim import (BCM, PES, SGD, Circuit, ErrorPopulation, Hebbian, Oja, Phase, Population,
                      Projection, Protocol, Simulator, ValidationError, compile_plan)
from neurosim.init import Given

DT, TAU = 1e-3, 20e-3
N_STIM, N_FB = 30, 20


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"Win": rng.normal(0, 0.6, (4, 3)), "R": rng.normal(0, 0.3, (4, 4)),
            "D": rng.normal(0, 0.5, (2, 4)), "Fb": rng.normal(0, 0.5, (4, 2))}


def _circuit(mode, W):
    W = {k: v.astype(np.float32) for k, v in W.items()}
    c = Circuit("twin")
    c.add(Population("x", 3))
    c.add(Population("E", 4, tau=TAU if mode == "time" else 0.0, transfer="tanh"))
    c.add(Population("y", 2))
    c.add(ErrorPopulation("mis", "y", 2, target="t"))
    c.add(Projection("Win", "x", "E", init=Given(W["Win"])))
    if mode == "time":
        c.add(Projection("R", "E", "E", init=Given(W["R"])))
    else:
        c.add(Projection("R", "E@stim", "E", init=Given(W["R"]), phases=("fb",)))
    c.add(Projection("D", "E", "y", init=Given(W["D"])))
    c.add(Projection("Fb", "mis@stim", "E", init=Given(W["Fb"]), role="feedback",
                     phases=("fb",)))
    kw = (lambda n: dict(duration=f"{n} ms")) if mode == "time" else (lambda n: {})
    proto = Protocol((Phase("stim", clamp={"x": "x"}, **kw(N_STIM)), Phase("fb", **kw(N_FB))),
                     mode=mode, dt=DT)
    return c, proto


def _twin(mode, W, X, T):
    """Per phase: the list of states after each time step (time mode) and the end state."""
    f = np.tanh
    out = {}
    if mode == "steady":
        E = f(X @ W["Win"].T)
        y = E @ W["D"].T
        s = dict(x=X, E=E, y=y, mis=y - T)
        out["stim"] = dict(steps=[s], end=s)
        E2 = f(E @ W["R"].T + s["mis"] @ W["Fb"].T)
        y2 = E2 @ W["D"].T
        s2 = dict(x=np.zeros_like(X), E=E2, y=y2, mis=y2 - T)
        out["fb"] = dict(steps=[s2], end=s2)
        return out
    alpha = DT / TAU
    E = np.zeros((len(X), 4))
    held = None
    for ph, n, x in (("stim", N_STIM, X), ("fb", N_FB, np.zeros_like(X))):
        steps = []
        for _ in range(n):
            drive = x @ W["Win"].T + E @ W["R"].T
            if ph == "fb":
                drive = drive + held @ W["Fb"].T
            E = E + alpha * (f(drive) - E)
            y = E @ W["D"].T
            steps.append(dict(x=x, E=E, y=y, mis=y - T))
        out[ph] = dict(steps=steps, end=steps[-1])
        held = steps[-1]["mis"]
    return out


# (rule, projection, pre, post/error) cases: every rule on a feedforward, a recurrent and a
# feedback projection; the traces are the projection's own unless named (pre None: the
# projection's source, "E" in time mode and the held "E@stim" in steady mode)
CASES = {
    "hebbian-recurrent": (lambda **kw: Hebbian("R", decay=0.3, phase="fb", **kw), "R", None,
                          "E"),
    "hebbian-feedback": (lambda **kw: Hebbian("Fb", decay=0.5, phase="fb", pre="mis@stim", **kw),
                         "Fb", "mis@stim", "E"),
    "oja-feedforward": (lambda **kw: Oja("Win", **kw), "Win", "x", "E"),
    "oja-recurrent": (lambda **kw: Oja("R", phase="fb", **kw), "R", None, "E"),
    "bcm-feedforward": (lambda **kw: BCM("Win", theta_tau=4.0, theta_init=0.2, **kw),
                        "Win", "x", "E"),
    "bcm-recurrent": (lambda **kw: BCM("R", theta_tau=3.0, theta_init=0.1, **kw), "R", None,
                      "E"),
    "pes-feedforward": (lambda **kw: PES("D", "mis", **kw), "D", "E", "mis"),
    "pes-feedback": (lambda **kw: PES("Fb", "E", phase="fb", **kw), "Fb", "mis@stim", "E"),
}


def _trace(states, spec, phase, k):
    """The twin's value of trace ``spec`` ("pop" live in ``phase``, or "pop@phase" held) at
    step k of ``phase``'s steps."""
    pop, _, ph = spec.partition("@")
    if ph and ph != phase:
        return states[ph]["end"][pop]
    return states[phase]["steps"][k][pop]


def _twin_update(rule, W, states, proj, pre, post, nb):
    """The summed descent update dW of ``rule`` and the final BCM threshold."""
    phase = rule.phase or "stim"
    steps = range(len(states[phase]["steps"])) if rule.timing == "continuous" else [-1]
    avg = 1.0 / len(steps)
    dW = np.zeros_like(W[proj])
    theta = np.full((1, W[proj].shape[0]), getattr(rule, "theta_init", 0.0))
    a = 1.0 / rule.theta_tau if isinstance(rule, BCM) else 0.0
    for k in steps:
        x, y = _trace(states, pre, phase, k), _trace(states, post, phase, k)
        if isinstance(rule, Hebbian):
            dW -= avg * y.T @ x
        elif isinstance(rule, Oja):
            dW += avg * ((y.T @ y) @ W[proj] - y.T @ x)
        elif isinstance(rule, BCM):
            dW -= avg * (y * (y - theta)).T @ x
            theta = (1 - a) * theta + a * np.mean(y ** 2, axis=0, keepdims=True)
        else:
            dW += avg * y.T @ x
    if isinstance(rule, Hebbian):
        dW += rule.decay * nb * W[proj]
    return dW, theta


def _one_trial(mode, timing, case, backend="numba", nb=5, batch=8):
    make, proj, pre, post = CASES[case]
    rule = make(timing=timing)
    W = _weights()
    c, proto = _circuit(mode, W)
    pre = pre or c.projections[proj].pre
    rng = np.random.default_rng(3)
    X = rng.normal(0, 1.0, (nb, 3)).astype(np.float32)
    T = rng.normal(0, 0.5, (nb, 2)).astype(np.float32)
    lr = 0.05
    plan = compile_plan(c, proto, rules=[rule], optimizer=SGD(lr=lr, momentum=0.0),
                        batch=batch, seed=0, targets="values")
    sim = Simulator(plan, backend=backend)
    sim.train(X, T=T)
    states = _twin(mode, W, X.astype(np.float64), T.astype(np.float64))
    dW, theta = _twin_update(rule, W, states, proj, pre, post, nb)
    want = W[proj] - lr / nb * dW
    got = sim.weights[proj].astype(np.float64)
    step, step_twin = got - W[proj].astype(np.float32), want - W[proj].astype(np.float32)
    assert np.linalg.norm(step_twin) > 1e-3 * np.linalg.norm(W[proj])   # a real update
    assert np.linalg.norm(step - step_twin) <= 1e-4 * np.linalg.norm(step_twin), case
    for other in set(W) - {proj}:
        assert np.array_equal(sim.weights[other], W[other].astype(np.float32))
    if isinstance(rule, BCM):
        got_theta = sim.buffer(f"bcm.{proj}.theta").astype(np.float64)
        np.testing.assert_allclose(got_theta, theta, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode,timing", [("steady", "end"), ("time", "end"),
                                         ("time", "continuous")])
def test_one_trial_equals_the_numpy_twin(mode, timing, case):
    """One minibatch of 5 samples in a plan compiled for 8 (a short last minibatch: the decay
    term and the optimizer's 1/nb use the run-time size), momentum 0."""
    _one_trial(mode, timing, case)


@pytest.mark.parametrize("case", ["hebbian-recurrent", "bcm-recurrent", "pes-feedback",
                                  "oja-feedforward"])
def test_numpy_backend_agrees_with_the_twin(case):
    pytest.importorskip("array_api_compat")
    _one_trial("time", "continuous", case, backend="numpy")


def test_bcm_threshold_follows_its_recurrence_over_many_trials():
    """theta_{k+1} = (1 - a) theta_k + a mean_b(y_k^2) with y_k = W_k x from the weights of
    trial k, W_{k+1} = W_k + lr/B sum_b y (y - theta_k) x^T: the engine's threshold and weights
    over 60 trials match the float64 recurrence (linear neuron, steady mode). Float32 rounding
    grows at most linearly over the trials of this contracting recurrence (|1 - a| < 1 and
    small lr), ~60 x 1e-6 relative, so 1e-3 relative is safe."""
    rng = np.random.default_rng(5)
    d, n_out, B, K = 4, 3, 10, 60
    X = np.abs(rng.normal(0, 1, (B * K, d))).astype(np.float32)
    W0 = rng.uniform(0.1, 0.4, (n_out, d)).astype(np.float32)
    c = Circuit("bcm")
    c.add(Population("x", d))
    c.add(Population("y", n_out))
    c.add(Projection("W", "x", "y", init=Given(W0)))
    proto = Protocol((Phase("p", clamp={"x": "x"}),))
    lr, tau = 0.02, 5.0
    plan = compile_plan(c, proto, rules=[BCM("W", theta_tau=tau, theta_init=0.5)],
                        optimizer=SGD(lr=lr, momentum=0.0), batch=B)
    sim = Simulator(plan)
    W, theta = W0.astype(np.float64), np.full((1, n_out), 0.5)
    for k in range(K):
        x = X[k * B:(k + 1) * B].astype(np.float64)
        sim.train(X[k * B:(k + 1) * B])
        y = x @ W.T
        W = W + lr / B * (y * (y - theta)).T @ x
        theta = (1 - 1 / tau) * theta + (1 / tau) * np.mean(y ** 2, axis=0, keepdims=True)
    assert np.abs(theta - 0.5).max() > 0.1          # the threshold moved
    np.testing.assert_allclose(sim.buffer("bcm.W.theta"), theta, rtol=1e-3)
    np.testing.assert_allclose(sim.weights["W"], W, rtol=1e-3)
    sim.reset(rule=True)
    assert np.all(sim.buffer("bcm.W.theta") == np.float32(0.5))


def test_bcm_continuous_threshold_in_time_units():
    """theta_tau given as a time with continuous timing: a = dt / theta_tau per step."""
    W = _weights()
    c, proto = _circuit("time", W)
    rules = [BCM("Win", timing="continuous", theta_tau="5 ms")]
    plan = compile_plan(c, proto, rules=rules, optimizer=SGD(lr=0.01, momentum=0.0), batch=4,
                        targets="values")
    sim = Simulator(plan)
    X = np.ones((4, 3), np.float32)
    sim.train(X, T=np.zeros((4, 2), np.float32))
    states = _twin("time", W, X.astype(np.float64), np.zeros((4, 2)))
    theta = np.zeros((1, 4))
    for s in states["stim"]["steps"]:
        theta = 0.8 * theta + 0.2 * np.mean(s["E"] ** 2, axis=0, keepdims=True)
    np.testing.assert_allclose(sim.buffer("bcm.Win.theta"), theta, rtol=1e-4)


def test_hebbian_with_decay_reaches_its_closed_form():
    """With the post rate clamped to a target (the projection gated off in the learning phase),
    full-batch Hebbian learning with decay is the linear recurrence W_{k+1} = W_k - lr (decay
    W_k - C), C = T^T X / N, whose solution is W_k = W* + (1 - lr decay)^k (W0 - W*) with the
    fixed point W* = C / decay."""
    rng = np.random.default_rng(7)
    N, d, m = 40, 5, 3
    X = rng.normal(size=(N, d)).astype(np.float32)
    T = rng.normal(size=(N, m)).astype(np.float32)
    W0 = rng.normal(size=(m, d)).astype(np.float32)
    c = Circuit("hebb")
    c.add(Population("x", d))
    c.add(Population("y", m))
    c.add(Projection("W", "x", "y", init=Given(W0)))
    proto = Protocol((Phase("teach", clamp={"x": "x", "y": "t"}, gates=()),))
    lr, decay, K = 0.1, 0.5, 30
    plan = compile_plan(c, proto, rules=[Hebbian("W", decay=decay)],
                        optimizer=SGD(lr=lr, momentum=0.0), batch=N, targets="values")
    sim = Simulator(plan)
    for _ in range(K):
        sim.train(X, T=T)
    C = T.astype(np.float64).T @ X / N
    Wstar = C / decay
    want = Wstar + (1 - lr * decay) ** K * (W0 - Wstar)
    np.testing.assert_allclose(sim.weights["W"], want, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(want - Wstar) < 0.3 * np.linalg.norm(W0 - Wstar)   # on its way


def test_pes_converges_to_a_known_linear_map():
    """PES on a linear readout, error population ``mis = y - t`` with t = M x: W_{k+1} - M =
    (W_k - M)(I - lr X_k^T X_k / B), a contraction for whitened inputs (E[x x^T] = I) and
    lr < 2: the distance to M shrinks by about (1 - lr) per trial, to float32 rounding after
    300 trials at lr = 0.2 ((0.8)^300 ~ 1e-29)."""
    rng = np.random.default_rng(11)
    d, m, B, K = 6, 3, 32, 300
    M = rng.normal(size=(m, d)).astype(np.float32)
    X = rng.normal(size=(B * K, d)).astype(np.float32)
    c = Circuit("pes")
    c.add(Population("x", d))
    c.add(Population("y", m))
    c.add(ErrorPopulation("mis", "y", m, target="t"))
    c.add(Projection("W", "x", "y", init="zeros"))
    proto = Protocol((Phase("p", clamp={"x": "x"}),))
    plan = compile_plan(c, proto, rules=[PES("W", "mis")], optimizer=SGD(lr=0.2, momentum=0.0),
                        batch=B, targets="values")
    sim = Simulator(plan)
    sim.train(X, T=X @ M.T)
    assert np.linalg.norm(sim.weights["W"] - M) < 1e-4 * np.linalg.norm(M)


def test_errors_name_the_parameter():
    W = _weights()
    c, proto = _circuit("time", W)
    sc, sproto = _circuit("steady", W)

    def comp(rule, circ=c, pr=proto):
        return compile_plan(circ, pr, rules=[rule], optimizer=SGD(lr=0.1), batch=2,
                            targets="values")

    cases = [
        (lambda: comp(PES("D", "E")), "PES.error", "4 units"),
        (lambda: comp(PES("D", "nope")), "PES.error", "no population 'nope'"),
        (lambda: comp(Oja("Win", pre="E")), "Oja.pre", "4 units"),
        (lambda: comp(Hebbian("Win", post="E@later")), "Hebbian.post", "no phase 'later'"),
        (lambda: comp(Hebbian("Q")), "Hebbian.projection", "no projection 'Q'"),
        (lambda: comp(Oja("Win", phase="late")), "Oja.phase", "no phase 'late'"),
        (lambda: comp(BCM("Win", timing="continuous"), sc, sproto), "BCM.timing",
         "time-mode"),
        (lambda: BCM("Win", theta_tau="20 ms"), "BCM.theta_tau", "number of trials"),
        (lambda: BCM("Win", theta_tau=0.5), "BCM.theta_tau", ">= 1.0"),
        (lambda: comp(BCM("Win", timing="continuous", theta_tau="0.5 ms")), "BCM.theta_tau",
         "shorter than the time step"),
        (lambda: Hebbian("W", decay=-1.0), "Hebbian.decay", ">= 0.0"),
        (lambda: Oja("W", timing="always"), "Oja.timing", "'end', 'continuous'"),
        (lambda: PES("W", "e", post="y"), "PES.post", "reads the error"),
    ]
    for fn, where, text in cases:
        with pytest.raises(ValidationError) as e:
            fn()
        assert e.value.where == where and text in str(e.value), (where, str(e.value))


def test_keyword_only_parameters():
    with pytest.raises(TypeError):
        Oja("W", "stim")
    assert PES("D", "mis").error == "mis"
