"""BP, FA, DFA and AFA on the engine equal independent numpy implementations of algorithms.md
section 1.3 / 2, for several minibatches; BP also equals finite differences of the loss.

The reference (``_updates``) is float64 numpy written from the definitions; it borrows from the
engine only the *inputs*: the current weights, the fixed random feedback matrices (FA's B, DFA's
D, read from the plan's persistent buffers) and the trial's dropout masks (read back from the
plan after the trial; they are a pure function of the seed and trial).

Tolerances. Each summed update is one or two GEMMs over float32 data (inputs in [0, 1), weights
~ 0.3, errors ~ 1), so the engine/reference difference is float32 rounding of sums of at most a
few tens of terms: relative Frobenius error ~ sqrt(k) * 6e-8 ~ 1e-7..1e-6. Measured: <= 2e-7.
Tolerance 2e-5 (100x margin). The momentum trajectories compare the accumulated weight change
after 3 steps, which is ~1e-3 of |W|, so the float32 rounding of the stored W (6e-8 |W| per step)
is ~3e-5 of it: measured <= 2.1e-5, tolerance 2e-4. A wrong sign, layer pairing or
transpose changes the update by O(1) relative. The finite-difference check of BP uses central
differences in float64 with h = 1e-5 (truncation error O(h^2 * |d3L|) ~ 1e-10, round-off ~
1e-16/h ~ 1e-11) on a loss evaluated in float64 from the float32 weights; the engine's dW is a
float32 sum, so the tolerance is relative 1e-4 of the largest entry (measured ~ 1e-6).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_data, relu as _relu, softmax as _softmax
from neurosim import BP, SGD, Simulator, compile_plan
from neurosim.models.feedforward import build_feedforward_network

RTOL = 2e-5
BATCH = 8


def _forward(W, x, masks):
    hs, acts = [x], []
    h = x
    for l, w in enumerate(W[:-1]):
        a = h @ w.T
        acts.append(a)
        h = _relu(a) * (masks[l] if masks is not None else 1.0)
        hs.append(h)
    out = _softmax(h @ W[-1].T)
    return hs, acts, out


def _updates(rule, W, x, t, masks, fb):
    """Summed-over-batch updates (descent direction) of ``rule`` at weights W (float64)."""
    hs, acts, out = _forward(W, x, masks)
    e = out - t
    L = len(W)
    dW = [None] * L
    dW[L - 1] = e.T @ hs[L - 1]

    def fprime(l):
        d = (acts[l] > 0).astype(np.float64)
        return d * masks[l] if masks is not None else d

    if rule == "afa":
        s, F = fb
        u = s * (e @ F.T)                       # input space: s F e
        for l in range(L - 1):
            u = (u @ W[l].T) * fprime(l)        # u_l = D_l W_l u_{l-1}
            dW[l] = -(u.T @ hs[l])              # dW_l = (h_l - h~_l) x^T ~ -u_l h_{l-1}^T
        return dW
    delta = e
    for l in range(L - 2, -1, -1):
        if rule == "bp":
            back = delta @ W[l + 1]
        elif rule == "fa":
            back = delta @ fb[l + 1]            # B_{l+1} shaped like W_{l+1}
        else:                                   # dfa
            back = e @ fb[l]                    # D_l: (n_out, n_l)
        delta = back * fprime(l)
        dW[l] = delta.T @ hs[l]
    return dW


def _compile(rule, sizes, dropout, mode="steady", fuse=False, momentum=0.0, lr=0.05, seed=1,
             monitors=()):
    net = build_feedforward_network(sizes, rule, dropout=dropout, mode=mode,
                                    phase_duration=0.2, tau=0.01, dt=0.001)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=lr, momentum=momentum), batch=BATCH, seed=seed,
                        fuse=fuse, monitors=monitors)
    return net, Simulator(plan)


def _feedback(rule, sim, net):
    layers = net.layers
    if rule == "fa":
        return {l: sim.buffer(f"fa.{layers[l]}.B").astype(np.float64)
                for l in range(1, len(layers))}
    if rule == "dfa":
        hidden = [n for n in net.circuit.populations if n.startswith("hidden")]
        return {l: sim.buffer(f"dfa.{hidden[l]}.D").astype(np.float64) for l in range(len(hidden))}
    if rule == "afa":
        return (net.circuit.projections["F"].gain, sim.weights["F"].astype(np.float64))
    return None


def _masks(sim, net, nb):
    hidden = [n for n in net.circuit.populations if n.startswith("hidden")]
    if net.circuit.populations[hidden[0]].dropout == 0:
        return None
    return [sim.view(f"{h}.mask", nb).astype(np.float64) for h in hidden]


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "afa"])
@pytest.mark.parametrize("sizes,dropout", [((12, 9, 4), 0.0), ((12, 9, 7, 4), 0.2)])
def test_update_equals_numpy(rule, sizes, dropout):
    """dW of every layer, minibatch after minibatch (explicit dW buffers, fuse=False)."""
    X, Y = make_data(4 * BATCH - 3, sizes[0], sizes[-1], seed=5)   # last minibatch is short
    net, sim = _compile(rule, sizes, dropout)
    fb0 = _feedback(rule, sim, net)
    n_trials = -(-len(X) // BATCH)
    worst = 0.0
    for j in range(n_trials):
        idx = np.arange(j * BATCH, min((j + 1) * BATCH, len(X)))
        W = [sim.weights[n].astype(np.float64) for n in net.layers]
        sim.train(X, Y, idx)
        nb = len(idx)
        t = np.eye(sizes[-1])[Y[idx]]
        ref = _updates(rule, W, X[idx].astype(np.float64), t, _masks(sim, net, nb),
                       _feedback(rule, sim, net))
        for l, name in enumerate(net.layers):
            got = sim.buffer(f"{name}.dW").astype(np.float64)
            err = np.linalg.norm(got - ref[l]) / np.linalg.norm(ref[l])
            worst = max(worst, err)
            assert err < RTOL, (rule, name, j, err)
    # the fixed feedback matrices stayed fixed
    fb1 = _feedback(rule, sim, net)
    if rule in ("fa", "dfa"):
        for k in fb0:
            np.testing.assert_array_equal(fb0[k], fb1[k])


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "afa"])
def test_fused_training_trajectory(rule):
    """With the default fused momentum step, several minibatches of SGD with momentum give the
    weights a numpy momentum-SGD loop on the reference updates gives (float64)."""
    sizes, lr, m = (10, 8, 3), 0.1, 0.9
    X, Y = make_data(3 * BATCH, sizes[0], sizes[-1], seed=7)
    net, sim = _compile(rule, sizes, 0.1, fuse=True, momentum=m, lr=lr)
    W = [sim.weights[n].astype(np.float64) for n in net.layers]
    W0 = [w.copy() for w in W]
    V = [np.zeros_like(w) for w in W]
    fb = _feedback(rule, sim, net)
    for j in range(3):
        idx = np.arange(j * BATCH, (j + 1) * BATCH)
        sim.train(X, Y, idx)
        ref = _updates(rule, W, X[idx].astype(np.float64), np.eye(sizes[-1])[Y[idx]],
                       _masks(sim, net, BATCH), fb)
        for l in range(len(W)):
            V[l] = m * V[l] + lr * ref[l] / BATCH
            W[l] = W[l] - V[l]
    for l, name in enumerate(net.layers):
        got = sim.weights[name].astype(np.float64)
        # compare the accumulated change (see module docstring: float32 rounding of W)
        err = np.linalg.norm((got - W0[l]) - (W[l] - W0[l])) / np.linalg.norm(W[l] - W0[l])
        assert err < 2e-4, (rule, name, err)


def test_bp_equals_finite_differences():
    """BP's dW is the gradient of the summed cross-entropy (with the trial's dropout mask)."""
    sizes = (7, 6, 5, 3)
    X, Y = make_data(BATCH, sizes[0], sizes[-1], seed=11)
    net, sim = _compile("bp", sizes, 0.25)
    W = [sim.weights[n].astype(np.float64) for n in net.layers]
    sim.train(X, Y, np.arange(BATCH))
    masks = _masks(sim, net, BATCH)
    x, t = X.astype(np.float64), np.eye(sizes[-1])[Y]

    def loss(Ws):
        out = _forward(Ws, x, masks)[2]
        return -np.sum(t * np.log(out))

    rng = np.random.default_rng(0)
    h = 1e-5
    for l, name in enumerate(net.layers):
        got = sim.buffer(f"{name}.dW").astype(np.float64)
        for _ in range(12):
            i, k = rng.integers(W[l].shape[0]), rng.integers(W[l].shape[1])
            Wp = [w.copy() for w in W]
            Wm = [w.copy() for w in W]
            Wp[l][i, k] += h
            Wm[l][i, k] -= h
            fd = (loss(Wp) - loss(Wm)) / (2 * h)
            assert abs(fd - got[i, k]) <= 1e-4 * np.abs(got).max() + 1e-9, (name, i, k, fd,
                                                                            got[i, k])


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "afa"])
def test_time_mode_matches_steady_state(rule):
    """In time mode (phase = 20 tau, Euler) the rules read the settled rates: dW is the steady
    dW up to the relaxation residual exp(-20) * (chain-length polynomial) ~ 1e-7 (measured
    <= 2e-6 relative, float32 Euler included); tolerance 1e-4."""
    sizes = (8, 6, 3)
    X, Y = make_data(BATCH, sizes[0], sizes[-1], seed=3)
    _, s_steady = _compile(rule, sizes, 0.0)
    net, s_time = _compile(rule, sizes, 0.0, mode="time")
    for s in (s_steady, s_time):
        s.train(X, Y, np.arange(BATCH))
    for name in net.layers:
        a, b = s_steady.buffer(f"{name}.dW"), s_time.buffer(f"{name}.dW")
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4, (rule, name)


def test_bp_is_flagged_non_local():
    assert "non-local" in (BP.__doc__ or "").lower()


def test_identical_initialisation_with_pepita():
    """AFA/BP networks start from PEPITA's weights (same projection names, seeds and inits)."""
    from neurosim.models import build_pepita_network

    sizes = (12, 9, 4)
    p = build_pepita_network(sizes)
    a = build_feedforward_network(sizes, "afa")
    pp = compile_plan(p.circuit, p.protocol, rules=[p.rule], optimizer=SGD(), batch=4, seed=5)
    ap = compile_plan(a.circuit, a.protocol, rules=[a.rule], optimizer=SGD(), batch=4, seed=5)
    for name in ("W1", "W2", "F"):
        np.testing.assert_array_equal(pp.view(f"{name}.W"), ap.view(f"{name}.W"))


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "afa"])
def test_scenario_models_registered(rule):
    from neurosim import scenario as sc

    raw = {"model": {"name": rule, "sizes": [12, 9, 4]}, "training": {"batch_size": 4}}
    settings = sc.validate(raw)
    circuit, protocol, rules, out = sc.build(settings)
    assert out == "output" and len(rules) == 1
    assert type(rules[0]).__name__ == {"bp": "BP", "fa": "FA", "dfa": "DFA", "afa": "AFA"}[rule]
