"""Simulator semantics: continuation, reset, seeding, chunking, monitors.

All comparisons here are bit-exact: the engine promises that a run depends only on the seed,
the data order and the trial/step counters, never on how the work is split into calls.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import make_data
from neurosim import SGD, Monitor, Simulator, compile_plan
from neurosim.models import build_pepita_network



def _time_net(sizes=(6, 5, 3), **kw):
    kw.setdefault("dropout", 0.0)
    return build_pepita_network(sizes, mode="time", tau=0.01, dt=0.001,
                                phase_duration=kw.pop("phase_duration", 0.004), **kw)


def _steady_sim(sizes=(20, 16, 5), seed=1, monitors=(), dropout=0.1, fuse=True, lr=0.1,
                **netkw):
    net = build_pepita_network(sizes, dropout=dropout, **netkw)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=lr, momentum=0.9), batch=8, seed=seed,
                        monitors=list(monitors), fuse=fuse)
    return Simulator(plan), net


def _assert_traces_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k].values, b[k].values, err_msg=k)
        np.testing.assert_array_equal(a[k].t, b[k].t, err_msg=k)
        np.testing.assert_array_equal(a[k].trial, b[k].trial, err_msg=k)
        np.testing.assert_array_equal(a[k].step, b[k].step, err_msg=k)
        assert a[k].t_unit == b[k].t_unit


def _state(sim, pops, phases):
    return {(p, ph): sim.rate(p, ph) for p in pops for ph in phases}


# ---- free runs: continuation ------------------------------------------------------------------
def _free_sim():
    net = _time_net()
    mons = [Monitor("hidden.r", phase="clean"),                       # every step, row 0
            Monitor("output.r", phase="clean", every=7, sample="mean", name="out7"),
            Monitor("hidden.drive", phase="clean", units=(1, 4), sample=1)]
    sim = Simulator(compile_plan(net.circuit, net.protocol, batch=2, seed=3, monitors=mons))
    X, _ = make_data(2, 6, 3, seed=5)
    sim.set_stimulus("x", X)
    sim.set_stimulus("t", np.eye(3)[[0, 2]])
    return sim


def test_run_300_equals_100_then_200():
    a, b = _free_sim(), _free_sim()
    a.run(steps=300, phase="clean")
    b.run(steps=100, phase="clean")
    b.run(steps=200, phase="clean")
    assert a.step == b.step == 300
    for pop in ("hidden", "output", "error", "input"):
        np.testing.assert_array_equal(a.rate(pop, "clean"), b.rate(pop, "clean"))
    _assert_traces_equal(a.traces, b.traces)
    tr = a.traces
    np.testing.assert_array_equal(tr["hidden.r@clean"].step, np.arange(1, 301))
    np.testing.assert_allclose(tr["hidden.r@clean"].t, np.arange(1, 301) * 0.001)
    np.testing.assert_array_equal(tr["out7"].step, np.arange(7, 301, 7))
    assert tr["hidden.drive@clean"].values.shape == (300, 3)
    # the recorded value at the last step is the state now
    np.testing.assert_array_equal(tr["hidden.r@clean"].values[-1], a.rate("hidden", "clean")[0])
    np.testing.assert_allclose(tr["out7"].values[-1], a.rate("output", "clean").mean(0),
                               rtol=1e-6)


def test_run_by_duration_equals_steps():
    a, b = _free_sim(), _free_sim()
    a.run(steps=50, phase="clean")
    b.run("50 ms", phase="clean")
    np.testing.assert_array_equal(a.rate("hidden", "clean"), b.rate("hidden", "clean"))
    _assert_traces_equal(a.traces, b.traces)


def test_run_single_steps_equal_one_run():
    a, b = _free_sim(), _free_sim()
    a.run(steps=3, phase="clean")
    for _ in range(3):
        b.run(steps=1, phase="clean")
    np.testing.assert_array_equal(a.rate("hidden", "clean"), b.rate("hidden", "clean"))
    _assert_traces_equal(a.traces, b.traces)


def test_training_with_one_step_phases_counts_steps(data_6_3):
    """phase_duration == dt: 2 steps per trial (one per phase), recorded at steps 1, 3 (clean)
    and 2, 4 (modulated) for two minibatches."""
    X, Y = data_6_3
    net = _time_net(phase_duration=0.001)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                        batch=8, seed=1, monitors=[Monitor("hidden.r", phase="clean"),
                                                   Monitor("hidden.r", phase="modulated")])
    sim = Simulator(plan)
    sim.train(X, Y)
    assert sim.step == 4
    np.testing.assert_array_equal(sim.traces["hidden.r@clean"].step, [1, 3])
    np.testing.assert_array_equal(sim.traces["hidden.r@modulated"].step, [2, 4])


# ---- reset ------------------------------------------------------------------------------------
def test_reset_rates_keeps_weights(data_20_5):
    X, Y = data_20_5
    sim, net = _steady_sim(monitors=[Monitor("W1.norm")])
    W_init = {k: np.array(v) for k, v in sim.weights.items()}
    sim.train(X, Y)
    W = {k: np.array(v) for k, v in sim.weights.items()}
    V = sim.buffer("W1.V")
    assert not np.array_equal(W["W1"], W_init["W1"])
    assert np.any(sim.rate("hidden", "clean") != 0) and sim.trial == 3
    sim.reset()                                          # rates=True only
    assert sim.trial == 0 and sim.step == 0
    for pop in ("input", "hidden", "output", "error"):
        for ph in ("clean", "modulated"):
            assert not np.any(sim.rate(pop, ph)), (pop, ph)
    assert not np.any(sim.buffer("stim.x"))
    for k in W:
        np.testing.assert_array_equal(sim.weights[k], W[k])
    np.testing.assert_array_equal(sim.buffer("W1.V"), V)   # optimizer kept
    assert len(sim.traces["W1.norm"]) == 3                 # monitors kept


def test_reset_weights_optimizer_monitors(data_20_5):
    X, Y = data_20_5
    sim, net = _steady_sim(monitors=[Monitor("W1.norm")])
    W_init = {k: np.array(v) for k, v in sim.weights.items()}
    sim.train(X, Y)
    r = sim.rate("hidden", "modulated")
    sim.reset(rates=False, weights=True)
    for k in W_init:
        np.testing.assert_array_equal(sim.weights[k], W_init[k])
    np.testing.assert_array_equal(sim.rate("hidden", "modulated"), r)   # rates untouched
    assert sim.trial == 3                                                # counters untouched
    assert np.any(sim.buffer("W1.V"))
    sim.reset(rates=False, optimizer=True)
    assert not np.any(sim.buffer("W1.V")) and not np.any(sim.buffer("W2.V"))
    assert len(sim.traces["W1.norm"]) == 3
    sim.reset(rates=False, monitors=True)
    assert len(sim.traces["W1.norm"]) == 0
    assert sim.traces["W1.norm"].values.shape == (0,)


def test_full_reset_equals_fresh_simulator(data_20_5):
    X, Y = data_20_5
    mons = [Monitor("angle:F"), Monitor("hidden.r", phase="modulated")]
    a, _ = _steady_sim(monitors=mons)
    a.train(X, Y)
    a.train(X, Y, order=np.arange(23, -1, -1))
    a.reset(rates=True, weights=True, optimizer=True, monitors=True)
    a.train(X, Y)
    b, _ = _steady_sim(monitors=mons)
    b.train(X, Y)
    for k in b.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    _assert_traces_equal(a.traces, b.traces)


def test_reset_then_free_run_repeats(data_6_3):
    sim = _free_sim()
    sim.run(steps=40, phase="clean")
    first = sim.traces["hidden.r@clean"].values.copy()
    X = sim.buffer("stim.x")
    sim.reset(monitors=True)                     # rates (and stimuli) back to zero
    sim.set_stimulus("x", X)
    sim.set_stimulus("t", np.eye(3)[[0, 2]])
    sim.run(steps=40, phase="clean")
    np.testing.assert_array_equal(sim.traces["hidden.r@clean"].values, first)


# ---- seeds ------------------------------------------------------------------------------------
def test_same_seed_same_weights_different_seed_different(data_20_5):
    X, Y = data_20_5
    runs = {}
    for tag, seed in (("a", 4), ("b", 4), ("c", 5)):
        sim, _ = _steady_sim(seed=seed)
        runs[tag + "0"] = {k: np.array(v) for k, v in sim.weights.items()}
        sim.train(X, Y)
        runs[tag] = {k: np.array(v) for k, v in sim.weights.items()}
    for k in runs["a"]:
        np.testing.assert_array_equal(runs["a"][k], runs["b"][k])
        assert not np.array_equal(runs["a0"][k], runs["c0"][k])   # init differs
        assert not np.array_equal(runs["a"][k], runs["c"][k])


def test_seed_changes_dropout_but_monitors_do_not_change_init(data_20_5):
    """Same initial weights (set explicitly), different seeds: only the dropout masks differ,
    and that changes the trained weights. Adding a monitor changes nothing."""
    X, Y = data_20_5
    a, _ = _steady_sim(seed=4)
    b, _ = _steady_sim(seed=9)
    c, _ = _steady_sim(seed=4, monitors=[Monitor("angle:F"), Monitor("W2.norm")])
    for k, v in a.weights.items():
        b.set_weights(k, v)
        np.testing.assert_array_equal(c.weights[k], v)
    for s in (a, b, c):
        s.train(X, Y)
    assert not np.array_equal(a.buffer("hidden.mask"), b.buffer("hidden.mask"))
    assert not np.array_equal(a.weights["W1"], b.weights["W1"])
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], c.weights[k])


# ---- chunking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fuse", [True, False])
def test_chunking_invariance_steady(fuse):
    X, Y = make_data(45, 20, 5, seed=8)                    # 6 minibatches, the last of 5 rows
    order = np.random.default_rng(0).permutation(45)
    mons = [Monitor("angle:F"), Monitor("W1.norm", every=2), Monitor("hidden.r", sample="mean")]
    a, _ = _steady_sim(monitors=mons, fuse=fuse)
    b, _ = _steady_sim(monitors=mons, fuse=fuse)
    c, _ = _steady_sim(monitors=mons, fuse=fuse)
    assert a.train(X, Y, order, chunk=1) == 6
    b.train(X, Y, order, chunk=64)
    c.train(X, Y, order[:16], chunk=64)                    # two calls split at a minibatch edge
    c.train(X, Y, order[16:], chunk=3)
    for s in (b, c):
        assert s.trial == 6
        for k in a.weights:
            np.testing.assert_array_equal(a.weights[k], s.weights[k])
        _assert_traces_equal(a.traces, s.traces)
    assert len(a.traces["W1.norm"]) == 3                   # trials 0, 2, 4


def test_chunking_invariance_time_mode(data_6_3):
    X, Y = data_6_3
    X = np.concatenate([X, X[:5]])                         # 21 rows: 3 minibatches, last short
    Y = np.concatenate([Y, Y[:5]])
    net = _time_net(dropout=0.2)
    mons = [Monitor("hidden.r", phase="modulated", every=3), Monitor("output.r", per="trial")]
    sims = []
    for chunk in (1, 64):
        plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                            optimizer=SGD(lr=0.1, momentum=0.9), batch=8, seed=2, monitors=mons)
        s = Simulator(plan)
        s.train(X, Y, chunk=chunk)
        sims.append(s)
    a, b = sims
    assert a.step == b.step == 3 * 2 * 4
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], b.weights[k])
    _assert_traces_equal(a.traces, b.traces)
    # steps 8t+1..8t+4 are the clean phase of trial t, 8t+5..8t+8 the modulated one; every=3
    # counts global steps: modulated steps divisible by 3 are 6, 15, 21, 24
    np.testing.assert_array_equal(a.traces["hidden.r@modulated"].step, [6, 15, 21, 24])
    np.testing.assert_array_equal(a.traces["hidden.r@modulated"].trial, [0, 1, 2, 2])


def test_state_dict_resume(data_20_5):
    X, Y = data_20_5
    mons = [Monitor("angle:F")]
    a, _ = _steady_sim(monitors=mons)
    a.train(X, Y)
    a.train(X, Y)
    b, _ = _steady_sim(monitors=mons)
    b.train(X, Y)
    state = b.state_dict()
    c, _ = _steady_sim(monitors=mons)
    c.load_state_dict(state)
    c.train(X, Y)
    for k in a.weights:
        np.testing.assert_array_equal(a.weights[k], c.weights[k])
    _assert_traces_equal(a.traces, c.traces)


def test_set_lr_fused_and_unfused(data_20_5):
    """set_lr reaches the optimizer step and the fused momentum GEMM alike."""
    X, Y = data_20_5
    out = []
    for fuse in (True, False):
        s, _ = _steady_sim(fuse=fuse)
        s.train(X, Y)
        s.set_lr(0.02)
        s.train(X, Y)
        out.append({k: np.array(v, np.float64) for k, v in s.weights.items()})
    ref, _ = _steady_sim(fuse=False)
    ref.train(X, Y)
    W_mid = {k: np.array(v, np.float64) for k, v in ref.weights.items()}
    for k in ("W1", "W2"):
        scale = np.max(np.abs(out[1][k]))
        assert np.max(np.abs(out[0][k] - out[1][k])) <= 2e-6 * scale
        assert not np.allclose(out[1][k], W_mid[k])        # the second call did train


# ---- dropout masks of a short minibatch ---------------------------------------------------------
def test_short_minibatch_mask_is_function_of_trial_row_unit():
    X24, Y24 = make_data(24, 20, 5, seed=1)
    a, _ = _steady_sim(dropout=0.5)
    b, _ = _steady_sim(dropout=0.5)
    a.train(X24[:20], Y24[:20])                # trials 0, 1 full, trial 2 has 4 rows
    b.train(X24[:16], Y24[:16])
    mask_trial1 = b.buffer("hidden.mask")
    b.train(X24[16:], Y24[16:])                # trial 2 full
    short = a.buffer("hidden.mask")[:4]
    assert not np.array_equal(short, mask_trial1[:4]), "copy of trial 1's rows 0-3"
    np.testing.assert_array_equal(short, b.buffer("hidden.mask")[:4])


# ---- monitors against numpy -------------------------------------------------------------------
def _angle(F, P):
    F, P = F.astype(np.float64).ravel(), P.astype(np.float64).T.ravel()
    return math.degrees(math.acos(np.clip(F @ P / np.linalg.norm(F) / np.linalg.norm(P), -1, 1)))


@pytest.mark.parametrize("sizes,every", [((20, 16, 5), 1), ((20, 16, 12, 5), 2)])
def test_angle_monitor_matches_numpy(sizes, every):
    """angle:F at trial k = angle between F and (W_L ... W_1)^T with the weights after trial k's
    update; recorded every `every` trials. Values are float32 (angles to ~1e-5 degree)."""
    X, Y = make_data(40, sizes[0], sizes[-1], seed=6)
    sim, net = _steady_sim(sizes, monitors=[Monitor("angle:F", every=every),
                                            Monitor("W1.norm")])
    want, norms = [], []
    for k in range(5):
        sim.train(X, Y, order=np.arange(8 * k, 8 * k + 8))
        W = [np.array(sim.weights[n], np.float64) for n in net.layers]
        P = W[0]
        for w in W[1:]:
            P = w @ P
        want.append(_angle(np.array(sim.weights["F"]), P))
        norms.append(np.linalg.norm(W[0]))
    tr = sim.traces["angle:F"]
    idx = np.arange(0, 5, every)
    np.testing.assert_array_equal(tr.trial, idx)
    assert tr.t_unit == "trial"
    np.testing.assert_allclose(tr.values, np.array(want)[idx], atol=1e-3)
    assert np.ptp(want) > 1e-3                 # it moves, so the per-trial match means something
    np.testing.assert_allclose(sim.traces["W1.norm"].values, norms, rtol=1e-6)


def test_trial_monitor_of_rates(data_20_5):
    """Steady mode: hidden.r recorded per trial at the end of its phase (row 0, the mean,
    a unit range)."""
    X, Y = data_20_5
    sim, _ = _steady_sim(monitors=[Monitor("hidden.r", phase="modulated", name="row0"),
                                   Monitor("hidden.r", phase="clean", sample="mean",
                                           units=(3, 9), name="mean")])
    rows, means = [], []
    for k in range(3):
        sim.train(X, Y, order=np.arange(8 * k, 8 * k + 8))
        rows.append(sim.rate("hidden", "modulated")[0])
        means.append(sim.rate("hidden", "clean")[:, 3:9].mean(0))
    tr = sim.traces
    np.testing.assert_array_equal(tr["row0"].values, rows)
    np.testing.assert_allclose(tr["mean"].values, means, rtol=1e-6)
    np.testing.assert_array_equal(tr["row0"].trial, [0, 1, 2])
