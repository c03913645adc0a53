"""Rules as array expressions (neurosim.expr): lowering, loop accumulation, errors, and Oja's
rule (the worked example of docs/engine.md) against its closed form."""

from __future__ import annotations

import numpy as np
import pytest

from neurosim import (SGD, Circuit, CompileError, Oja, Phase, PlasticityRule, Population,
                      Projection, Protocol, Simulator, compile_plan, register_builder)
from neurosim.init import Given


def _linear(d_in, d_out, W0, mode="steady"):
    c = Circuit("lin")
    tau = "10 ms" if mode == "time" else 0.0
    c.add(Population("x", d_in))
    c.add(Population("y", d_out, tau=tau, transfer="identity"))
    c.add(Projection("W", "x", "y", init=Given(W0)))
    kw = dict(duration="100 ms") if mode == "time" else {}
    proto = Protocol((Phase("stim", clamp={"x": "x"}, **kw),), mode=mode, dt="1 ms")
    return c, proto


def test_oja_finds_the_first_principal_component():
    """Oja's fixed point is the unit-norm leading eigenvector of E[x x^T]; with a small learning
    rate the weight vector converges to it (up to sign). Data: correlated Gaussian with
    eigenvalues (4, 1, 0.25, ...): the spectral gap makes the convergence fast; after 20 epochs
    of 2000 samples at lr 0.01 the residual angle is set by the SGD noise, O(sqrt(lr)) ~ 0.1 rad
    at most, far below the 0.2 rad (cos 0.98) asserted."""
    rng = np.random.default_rng(1)
    d = 6
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.array([4.0, 1.0, 0.25, 0.1, 0.05, 0.02])
    X = (rng.normal(size=(2000, d)) * np.sqrt(lam)) @ Q.T
    X = X.astype(np.float32)
    W0 = rng.normal(scale=0.1, size=(1, d)).astype(np.float32)
    c, proto = _linear(d, 1, W0)
    plan = compile_plan(c, proto, rules=[Oja("W")], optimizer=SGD(lr=0.01, momentum=0.0),
                        batch=10, seed=0)
    sim = Simulator(plan)
    for _ in range(20):
        sim.train(X)
    w = sim.weights["W"][0].astype(np.float64)
    v1 = np.linalg.eigh(X.T.astype(np.float64) @ X / len(X))[1][:, -1]
    assert abs(np.dot(w, v1)) / np.linalg.norm(w) > 0.98
    assert np.linalg.norm(w) == pytest.approx(1.0, abs=0.05)


def test_oja_update_equals_numpy_one_minibatch():
    """One minibatch, momentum 0: W1 = W0 - lr/B * (Y^T Y W0 - Y^T X), Y = X W0^T."""
    rng = np.random.default_rng(2)
    X = rng.normal(size=(8, 5)).astype(np.float32)
    W0 = rng.normal(size=(3, 5)).astype(np.float32)
    c, proto = _linear(5, 3, W0)
    plan = compile_plan(c, proto, rules=[Oja("W")], optimizer=SGD(lr=0.1, momentum=0.0),
                        batch=8, seed=0)
    sim = Simulator(plan)
    sim.train(X)
    Xd, Wd = X.astype(np.float64), W0.astype(np.float64)
    Y = Xd @ Wd.T
    want = Wd - 0.1 / 8 * (Y.T @ Y @ Wd - Y.T @ Xd)
    np.testing.assert_allclose(sim.weights["W"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_continuous_update_accumulates_over_the_loop(backend):
    """A Hebbian update written in a <phase>:loop section accumulates over the time steps (the
    'beta trap' of v1: only the last step survived). With a constant input and y clamped by a
    long phase, the time-averaged update equals the mean over steps of y_t^T x."""
    if backend == "numpy":
        pytest.importorskip("neurosim.backends.numpy_backend")

    class Hebb(PlasticityRule):
        name = "hebb"

        def modifies(self, pb):
            return ["W"]

        def reads(self, pb):
            return []

    @register_builder(Hebb)
    def build(pb, rule):
        n = pb.protocol.n_steps(pb.protocol.phases[0])
        with pb.at("stim:loop"):
            pb.update("W", -(1.0 / n) * (pb.r("y", "stim").T @ pb.r("x", "stim")))

    W0 = np.full((1, 2), 0.5, np.float32)
    c, proto = _linear(2, 1, W0, mode="time")
    plan = compile_plan(c, proto, rules=[Hebb()], optimizer=SGD(lr=1.0, momentum=0.0),
                        batch=1, seed=0)
    sim = Simulator(plan, backend=backend)
    X = np.array([[1.0, 2.0]], np.float32)
    sim.train(X)
    # y_t: Euler steps of tau dy/dt = -y + W0 x (drive 1.5), alpha = dt/tau = 0.1
    y, ys = 0.0, []
    for _ in range(100):
        y += 0.1 * (1.5 - y)
        ys.append(y)
    dW = -np.mean(ys) * X[0]
    np.testing.assert_allclose(sim.weights["W"][0], W0[0] - dW, rtol=1e-5)


def test_expression_errors_name_the_problem():
    c, proto = _linear(4, 3, np.zeros((3, 4), np.float32))

    class Bad(PlasticityRule):
        name = "bad"

        def modifies(self, pb):
            return ["W"]

        def reads(self, pb):
            return []

    cases = {
        "transpose": lambda pb: pb.update("W", pb.W("W").T.T),
        "shape": lambda pb: pb.update("W", pb.r("x", "stim").T @ pb.r("y", "stim")),
        "inner": lambda pb: pb.update("W", pb.r("y", "stim") @ pb.r("x", "stim")),
        "broadcast": lambda pb: pb.update("W", (pb.r("y", "stim") - pb.r("x", "stim")).T
                                          @ pb.r("x", "stim")),
    }
    msgs = {"transpose": "operand of @", "shape": "expected the weights", "inner": "inner dimensions",
            "broadcast": "broadcast"}
    for key, body in cases.items():
        @register_builder(Bad)
        def build(pb, rule, body=body):
            with pb.at("trial_end"):
                body(pb)
        with pytest.raises(CompileError, match=msgs[key]):
            compile_plan(c, proto, rules=[Bad()], optimizer=SGD(lr=0.1), batch=2)
