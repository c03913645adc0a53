"""The two-phase contrastive rule: PEPITA-Hebbian and the softmax-readout delta rule as its
configurations, each against an independent numpy implementation; time mode; validation.

(Forward-Forward, the third configuration, is checked against its numpy twin in
tests/test_forward_forward.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from neurosim import (SGD, Circuit, Phase, Protocol, Simulator, ValidationError, Zeros,
                      compile_plan)
from neurosim.models import build_pepita_network
from neurosim.plasticity import (Contrastive, ForwardForward, NormalizedPopulation, PepitaHebbian,
                                 SoftmaxReadout)


def _data(n, d, C, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d), dtype=np.float32), rng.integers(0, C, n).astype(np.int64)


def _softmax(z):
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


class NumpyPepitaHebbian:
    """dW_l = h_l^T h_{l-1} - h~_l^T h~_{l-1} (hidden), dW_L = h_L^T h_{L-1} - t^T h~_{L-1};
    x~ = x + s e F^T; reference momentum V <- m V + lr dW / B, W <- W - V. float64."""

    def __init__(self, W, F, s, lr, momentum=0.9):
        self.W = [np.array(w, np.float64) for w in W]
        self.F = np.array(F, np.float64)      # (d_in, n_out), as the engine stores it
        self.V = [np.zeros_like(w) for w in self.W]
        self.s, self.lr, self.m = s, lr, momentum

    def forward(self, x):
        hs = [x]
        for w in self.W[:-1]:
            hs.append(np.maximum(hs[-1] @ w.T, 0.0))
        hs.append(_softmax(hs[-1] @ self.W[-1].T))
        return hs

    def step(self, x, y):
        B = x.shape[0]
        t = np.eye(self.W[-1].shape[0])[y]
        h = self.forward(x.astype(np.float64))
        e = h[-1] - t
        hm = self.forward(x + self.s * e @ self.F.T)
        for l in range(len(self.W)):
            hebb_post = t if l == len(self.W) - 1 else hm[l + 1]
            dW = h[l + 1].T @ h[l] - hebb_post.T @ hm[l]
            self.V[l] = self.m * self.V[l] + self.lr * dW / B
            self.W[l] = self.W[l] - self.V[l]


@pytest.mark.parametrize("sizes,convention", [((20, 16, 5), "icml2022"),
                                              ((20, 12, 10, 5), "iclr2024")])
def test_pepita_hebbian_equals_numpy(sizes, convention):
    """PEPITA-Hebbian on the PEPITA circuit (no dropout): three minibatches of 8, every weight
    equals the numpy twin's (both modulation signs)."""
    X, Y = _data(24, sizes[0], sizes[-1], seed=1)
    net = build_pepita_network(sizes, convention=convention, dropout=0.0)
    plan = compile_plan(net.circuit, net.protocol, rules=[PepitaHebbian()],
                        optimizer=SGD(lr=0.05, momentum=0.9), batch=8, seed=2)
    sim = Simulator(plan)
    L = len(sizes) - 1
    s = -1.0 if convention == "iclr2024" else 1.0
    ref = NumpyPepitaHebbian([sim.weights[f"W{i}"] for i in range(1, L + 1)], sim.weights["F"],
                             s, 0.05)
    W0 = sim.weights["W1"].copy()
    for t in range(3):
        idx = np.arange(8 * t, 8 * t + 8, dtype=np.int64)
        sim.train(X, Y, idx)
        ref.step(X[idx], Y[idx])
    for i in range(L):
        np.testing.assert_allclose(sim.weights[f"W{i + 1}"], ref.W[i], rtol=1e-4, atol=1e-6)
    assert np.abs(sim.weights["W1"] - W0).max() > 1e-4


def test_pepita_hebbian_differs_from_pepita_by_the_correlation_terms():
    """For one minibatch with momentum 0, the Hebbian form's hidden update minus PEPITA's
    (h - h~)^T x~ is h^T (x - x~): zero only where the input is unmodulated."""
    from neurosim import PEPITA

    X, Y = _data(8, 15, 4, seed=3)
    upd = {}
    for rule in (PepitaHebbian(), PEPITA()):
        net = build_pepita_network((15, 9, 4), dropout=0.0)
        plan = compile_plan(net.circuit, net.protocol, rules=[rule],
                            optimizer=SGD(lr=1.0, momentum=0.0), batch=8, seed=4, fuse=False)
        sim = Simulator(plan)
        w0 = sim.weights["W1"].copy()
        sim.train(X, Y)
        upd[type(rule).__name__] = (w0 - sim.weights["W1"]) * 8
        h = sim.rate("hidden", "clean").astype(np.float64)
        xm = sim.rate("input", "modulated").astype(np.float64)
    diff = upd["PepitaHebbian"] - upd["PEPITA"]
    np.testing.assert_allclose(diff, h.T @ (X - xm), rtol=1e-3, atol=1e-5)


def test_delta_rule_configuration_is_the_cross_entropy_gradient():
    """Contrastive with both terms in one phase and a softmax target population is the delta rule
    dW = (softmax(W x) - t)^T x (plus weight cost), here on normalised inputs."""
    X, Y = _data(16, 12, 4, seed=5)
    c = Circuit("readout")
    c.add(NormalizedPopulation("input", 12))
    c.population("out", 4, transfer="softmax")
    c.project("input", "out", name="R", init=Zeros())
    proto = Protocol((Phase("only", clamp={"input": "x"}),))
    rule = Contrastive(hebbian="only", anti_hebbian="only", target="out", weight_cost=0.01,
                       gain=2.0, normalization="rms")
    plan = compile_plan(c, proto, rules=[rule], optimizer=SGD(lr=1.0, momentum=0.0), batch=16,
                        seed=0, output="out")
    sim = Simulator(plan)
    R0 = np.random.default_rng(6).standard_normal((4, 12)).astype(np.float32)
    sim.set_weights("R", R0)
    sim.train(X, Y)
    xn = X / (1e-8 + np.sqrt(np.mean(X.astype(np.float64) ** 2, 1, keepdims=True)))
    P = _softmax(xn @ R0.T)
    dW = 2.0 * ((P - np.eye(4)[Y]).T @ xn + 0.01 * 16 * R0)
    np.testing.assert_allclose(sim.weights["R"], R0 - dW / 16, rtol=1e-5, atol=1e-6)
    assert SoftmaxReadout().hebbian == SoftmaxReadout().anti_hebbian == "neutral"


def test_pepita_hebbian_in_time_mode_approaches_steady_state():
    """The same rule in time mode (tau 10 ms, phases of 20 tau): the update after two
    minibatches is within 1e-3 of the steady-state one."""
    X, Y = _data(16, 10, 3, seed=7)
    out = {}
    for mode in ("steady", "time"):
        net = build_pepita_network((10, 8, 3), dropout=0.0, mode=mode, tau=0.01, dt=0.002,
                                   phase_duration=0.2, method="exp_euler")
        plan = compile_plan(net.circuit, net.protocol, rules=[PepitaHebbian()],
                            optimizer=SGD(lr=0.05, momentum=0.9), batch=8, seed=8)
        sim = Simulator(plan)
        sim.train(X, Y)
        out[mode] = sim.weights
    for name in ("W1", "W2"):
        np.testing.assert_allclose(out["time"][name], out["steady"][name], rtol=1e-3, atol=1e-6)


def test_configurations_share_one_rule():
    """FF, PEPITA-Hebbian and the readout are Contrastive configurations (one description type,
    one build function); what differs is phases, third factor and normalisation."""
    ff, ph, ro = ForwardForward(), PepitaHebbian(), SoftmaxReadout()
    assert all(isinstance(r, Contrastive) for r in (ff, ph, ro))
    assert (ff.hebbian, ff.anti_hebbian, ff.third_factor, ff.normalization) == \
        ("positive", "negative", "goodness", "rms")
    assert (ph.hebbian, ph.anti_hebbian, ph.third_factor, ph.normalization, ph.target) == \
        ("modulated", "clean", "none", "none", "output")


def test_contrastive_validation():
    with pytest.raises(ValidationError, match="third_factor"):
        Contrastive(third_factor="energy")
    with pytest.raises(ValidationError, match="target"):
        Contrastive(third_factor="goodness", target="out")
    with pytest.raises(ValidationError, match="temperature"):
        Contrastive(temperature=0.0)
    net = build_pepita_network((10, 8, 3), dropout=0.0)
    with pytest.raises(ValidationError, match="hebbian"):
        compile_plan(net.circuit, net.protocol, rules=[Contrastive(hebbian="nope",
                                                                   anti_hebbian="clean")],
                     optimizer=SGD(), batch=4)
    with pytest.raises(ValidationError, match="normalised layer inputs"):
        compile_plan(net.circuit, net.protocol,
                     rules=[PepitaHebbian(normalization="rms")], optimizer=SGD(), batch=4)
    with pytest.raises(ValidationError, match="softmax"):
        NormalizedPopulation("o", 3, transfer="softmax")


def test_two_term_update_is_fused_into_the_momentum_step():
    """PEPITA-Hebbian's two GEMMs (h^T x, then - h~^T x~) are rewritten into V = m V + lr/B (...)
    with no pass over dW (the optimizer's SGD instruction then only does W -= V), and train
    exactly like the unfused plan up to float32 rounding of the reordered sums (one rounding of
    lr/B per term: relative 1e-6 per step; tolerance 1e-5 after 3 steps)."""
    from neurosim.kernels import ops as K

    X, Y = _data(24, 20, 5, seed=6)
    res = {}
    for fuse in (True, False):
        net = build_pepita_network((20, 16, 5), dropout=0.0)
        plan = compile_plan(net.circuit, net.protocol, rules=[PepitaHebbian()],
                            optimizer=SGD(lr=0.05, momentum=0.9), batch=8, seed=2, fuse=fuse)
        sgd = [row for row in plan.train.prog if row[0] == K.SGD]
        assert all((row[4] >= 2) == fuse for row in sgd) and len(sgd) == 2
        sim = Simulator(plan)
        sim.train(X, Y)
        res[fuse] = [sim.weights[w].copy() for w in ("W1", "W2")]
    for a, b in zip(res[True], res[False]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
