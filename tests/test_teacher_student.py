"""Teacher-student simulations on the engine against the ODEs of neurosim.theory.

Covers issue 4 parts 2-4: the engine's BP, FA, AFA and PEPITA rules realise the update equations
of docs/theory-reference.md §1.2 (one step, exactly up to float32 rounding); the ODE starts
from the simulated instance; ODE vs simulation (§7 items 7-10, 12, 13, and the plateau of item
11 at simulation level); the scenario and its outputs.

Every tolerance is argued next to it. The recurring ingredients:

* float32: the engine's arena is float32, so one step reproduces a float64 evaluation of the
  spec's update to ~1e-6 of the update (N-term dot products in float32) plus half an ulp of the
  weight; a wrong sign, factor or feedback changes the update by O(1) of itself.
* finite N: the simulated eps_g(t) of one data stream fluctuates around the N -> oo ODE with a
  relative standard deviation c(t)/sqrt(N), plus a deterministic bias O(1/N) (test_theory.py
  bounds it by 4 eps_g/N for these set-ups). The mean of S data streams has standard error
  c/sqrt(N S). Measured on the BP instance of the slow test with 24 streams at N = 1000: c/sqrt(N)
  = 1.8 % (t = 0.5), 2.4 % (t = 1), 2.0 % (t = 2), and below 1 % from t = 10 on.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import stats
from scipy.special import erf

from neurosim import Simulator, ValidationError
from neurosim import teacher_student as ts
from neurosim import theory as th
from neurosim.errors import NeurosimWarning

EPS32 = float(np.finfo(np.float32).eps)


def g(z):
    return erf(z / math.sqrt(2.0))


def gp(z):
    return math.sqrt(2.0 / math.pi) * np.exp(-0.5 * z * z)


# ------------------------------------------------------------------------------------------
# The engine's rules are the spec's update equations (one step)
# ------------------------------------------------------------------------------------------


def spec_step(inst, rule, W1, v, x, y, eta, eta_v):
    """One online step of the spec's §1.2 update in float64, theory normalisation.

    Returns the new (W1 = w / sqrt(N), v). BP/FA/AFA: w_k += eta/sqrt(N) Delta beta_k g'(lambda_k)
    x, v_k += eta_v/N Delta g(lambda_k). PEPITA (exact one-hidden-layer rule): x~ = x + F e,
    w_k -= eta/sqrt(N) [g(lambda_k) - g(lambda~_k)] x~, v_k -= eta_v/N e g(lambda~_k).
    """
    N = W1.shape[1]
    sq = math.sqrt(N)
    w = W1 * sq
    lam = w @ x / sq
    D = y - v @ g(lam)
    if rule == "pepita":
        F = inst.F.astype(float)
        e = -D
        xt = x + F * e
        lt = w @ xt / sq
        w1 = w - eta / sq * np.outer(g(lam) - g(lt), xt)
        v1 = v - eta_v / N * e * g(lt)
    else:
        beta = {"bp": v, "fa": inst.b_fa.astype(float),
                "afa": -(W1 @ inst.F.astype(float))}[rule]
        w1 = w + eta / sq * np.outer(D * beta * gp(lam), x)
        v1 = v + eta_v / N * D * g(lam)
    return w1 / sq, v1


@pytest.mark.parametrize("rule", ts.RULES)
def test_engine_rule_is_the_spec_update(rule):
    # N = 50, K = 3, M = 2, distinct eta and eta_v, F with Phi ~ 4.5 so that PEPITA's
    # modulation is not small. Five consecutive steps from the engine's own float32 weights;
    # the reference restarts from the engine's weights before every step, so only the step is
    # tested. Tolerance per step: 1e-4 of the largest update component (float32 dot products
    # over N = 50 terms and float32 erf/exp: relative ~1e-6) plus 2 ulp of the weight (the
    # rounding of W - lr dW): a wrong sign, factor or feedback is an O(1) relative error.
    inst = ts.make_instance(50, 3, 2, seed=3, f_scale=0.3)
    eta, eta_v = 0.5, 0.3
    sim = Simulator(ts.compile_student(inst, rule, eta=eta, eta_v=eta_v))
    rng = np.random.default_rng(0)
    for _ in range(5):
        x = rng.standard_normal(50).astype(np.float32)
        y = np.float32(rng.standard_normal())
        W1 = sim.weights["W1"].astype(float)
        v = sim.weights["W2"][0].astype(float)
        W1_ref, v_ref = spec_step(inst, rule, W1, v, x.astype(float), float(y), eta, eta_v)
        sim.train(x[None], T=np.array([[y]]))
        W1_new = sim.weights["W1"].astype(float)
        v_new = sim.weights["W2"][0].astype(float)
        for new, ref, old in ((W1_new, W1_ref, W1), (v_new, v_ref, v)):
            upd = np.max(np.abs(ref - old))
            assert upd > 1e-6  # the step moved the weights
            tol = 1e-4 * upd + 2 * EPS32 * np.abs(ref)
            assert np.all(np.abs(new - ref) <= tol), (rule, np.max(np.abs(new - ref)), upd)


def test_pepita_modulated_readout_error_is_not_the_spec_rule():
    # Negative control for the PEPITA readout: with last_layer_error="modulated" (the ICML 2022
    # code) the readout update uses e~ = y^~ - y instead of the clean e, which the spec's rule
    # and the §4.5 ODE do not describe. The difference e~ - e = sum_k v_k [g(l~_k) - g(l_k)] is
    # first order in |F e| and well above the float32 tolerance of the test above.
    inst = ts.make_instance(50, 3, 2, seed=3, f_scale=0.3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50).astype(np.float32)
    y = np.float32(2.0)
    res = {}
    for lle in ("clean", "modulated"):
        sim = Simulator(ts.compile_student(inst, "pepita", eta=0.5, last_layer_error=lle))
        sim.train(x[None], T=np.array([[y]]))
        res[lle] = sim.weights["W2"][0].astype(float)
    v = inst.v.astype(float)
    _, v_ref = spec_step(inst, "pepita", inst.W1.astype(float), v, x.astype(float), float(y),
                         0.5, 0.5)
    upd = np.max(np.abs(v_ref - v))
    assert np.max(np.abs(res["clean"] - v_ref)) <= 1e-4 * upd + 2 * EPS32
    assert np.max(np.abs(res["modulated"] - v_ref)) > 0.01 * upd


def test_fa_feedback_and_frozen_readout():
    # FA's fixed matrix B (1 x K, shaped like W2) is the instance's b; train_v=False leaves the
    # readout bit-identical (rate 1e-30 of a float32 weight of order 1 rounds away).
    inst = ts.make_instance(40, 3, 2, seed=1)
    plan = ts.compile_student(inst, "fa", eta=0.5, train_v=False)
    sim = Simulator(plan)
    np.testing.assert_array_equal(sim.buffer("fa.W2.B")[0], inst.b_fa)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 40)).astype(np.float32)
    sim.train(X, T=rng.standard_normal((200, 1)))
    np.testing.assert_array_equal(sim.weights["W2"][0], inst.v)
    assert not np.array_equal(sim.weights["W1"], inst.W1)


def test_engine_bp_is_exact_gradient_with_projection_gain():
    # Projection.gain multiplies a projection's drive (drive = gain W r_pre), but the BP rule
    # forms dW = delta^T r_pre and back-propagates through W, not gain W. With gain g on W1 the
    # exact gradient w.r.t. the stored W1 is g delta x^T; the engine returns delta x^T (ratio
    # 1/g; likewise 1/g for a gain on W2). Float32: agreement to 1e-4 expected when fixed.
    from neurosim import BP, SGD, Circuit, Given, Phase, Protocol, compile_plan

    rng = np.random.default_rng(0)
    W1 = rng.standard_normal((3, 4)).astype(np.float32)
    W2 = rng.standard_normal((1, 3)).astype(np.float32)
    x = rng.standard_normal((1, 4)).astype(np.float32)
    g1 = 0.5
    c = Circuit("gain")
    c.population("input", 4)
    c.population("hidden", 3, transfer="tanh")
    c.population("output", 1)
    c.error("error", "output")
    c.project("input", "hidden", name="W1", init=Given(W1), gain=g1)
    c.project("hidden", "output", name="W2", init=Given(W2))
    sim = Simulator(compile_plan(c, Protocol((Phase("clean", clamp={"input": "x"}),)),
                                 rules=[BP()], optimizer=SGD(lr=1.0, momentum=0.0),
                                 targets="values"))
    sim.train(x, T=np.array([[0.3]]))
    h = np.tanh(g1 * W1.astype(float) @ x[0])
    e = W2[0].astype(float) @ h - 0.3
    grad = np.outer(e * W2[0] * (1 - h**2) * g1, x[0])
    np.testing.assert_allclose(W1 - sim.weights["W1"], grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Teacher, data, instance construction
# ------------------------------------------------------------------------------------------


def test_teacher_circuit_is_the_scm():
    # y = sum_n v*_n g(w*_n . x / sqrt(N)) with W1* = w*/sqrt(N): float32 evaluation of an
    # N = 300 dot product and erf, errors ~1e-6 on outputs of order 1.
    inst = ts.make_instance(300, 2, 3, seed=4, v_star="normal")
    X = np.random.default_rng(0).standard_normal((50, 300)).astype(np.float32)
    y = ts.Teacher(inst, batch=16)(X)
    ref = g(X.astype(float) @ inst.W1_star.astype(float).T) @ inst.v_star.astype(float)
    np.testing.assert_allclose(y, ref, atol=1e-5)


def test_data_stream_is_independent_of_consumption():
    inst = ts.make_instance(20, 2, 2, seed=0)
    teacher = ts.Teacher(inst, batch=8)
    a = ts.DataStream(teacher, 20, seed=5, sigma=0.5, block=7)
    b = ts.DataStream(teacher, 20, seed=5, sigma=0.5, block=7)
    Xa, ya = a.take(30)
    parts = [b.take(n) for n in (3, 11, 0, 16)]
    np.testing.assert_array_equal(Xa, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(ya, np.concatenate([p[1] for p in parts]))
    # the noise is there: y - teacher(x) has std sigma
    c = ts.DataStream(teacher, 20, seed=6, sigma=0.5, block=4096)
    X, y = c.take(4000)
    r = y - teacher(X)
    # 4000 samples: the sample std of N(0, 0.25) is within 5 % with probability > 1 - 1e-5
    assert np.std(r) == pytest.approx(0.5, rel=0.05)


def test_simulation_does_not_depend_on_output_times():
    # Output times only decide where order parameters are read; the kernel calls are chunked
    # differently but the trajectory is the same (bit for bit).
    inst = ts.make_instance(60, 2, 2, seed=2, f_scale=0.2)
    for rule in ("bp", "pepita"):
        a = ts.simulate(inst, rule, eta=0.5, times=[0.0, 1.0, 2.0], seeds=(3,), block=50)
        b = ts.simulate(inst, rule, eta=0.5, times=[0.0, 0.3, 2.0], seeds=(3,), block=50)
        np.testing.assert_array_equal(a.Q[-1], b.Q[-1])
        np.testing.assert_array_equal(a.v[-1], b.v[-1])


def test_plant_feedback_and_student_are_exact():
    inst = ts.make_instance(400, 2, 3, seed=7)
    p = ts.plant_feedback(inst, [0.43, -0.25], [-0.25, -0.12, 0.1], 1.0, seed=1)
    op = p.order_parameters()
    # float32 storage of F (relative 6e-8 per entry) -> overlaps exact to ~1e-6
    np.testing.assert_allclose(op.b, [0.43, -0.25], atol=1e-5)
    np.testing.assert_allclose(op.b_star, [-0.25, -0.12, 0.1], atol=1e-5)
    assert op.Phi == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValidationError, match="Phi"):
        ts.plant_feedback(inst, [3.0, 0.0], [0.0, 0.0, 0.0], 1.0)
    MX = np.array([[0.1, 0.03, 0.0], [-0.02, 0.05, 0.01]])
    s = ts.plant_student(inst, np.eye(2), MX, seed=2)
    op = s.order_parameters()
    np.testing.assert_allclose(op.Q, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(op.R, MX, atol=1e-5)


def test_ode_starts_from_the_simulated_instance():
    # Spec §8 / issue item 3: Q, R, T, v, v* of the engine's weights at t = 0; FA: the engine's
    # B; AFA/PEPITA: b(0) = -W1 F and b* = -W1* F, Phi = ||F||^2 (the default icml2022 sign
    # s = +1 gives x~ = x + F e, hence b = -W1 F). eps_g at t = 0 agrees to rounding.
    inst = ts.make_instance(200, 2, 2, seed=8, f_scale=0.1)
    for rule in ts.RULES:
        run = ts.simulate(inst, rule, eta=0.5, times=[0.0, 0.1], seeds=(0,))
        tr = ts.theory(inst, rule, eta=0.5, times=[0.0, 0.1])
        assert run.eps_g[0, 0] == pytest.approx(tr.eps_g[0], rel=1e-12)
        np.testing.assert_allclose(run.Q[0, 0], tr.Q[0], rtol=1e-12)
        np.testing.assert_allclose(run.R[0, 0], tr.R[0], rtol=1e-12)
        np.testing.assert_allclose(run.b[0, 0], tr.b[0], rtol=1e-12)
        if rule in ("afa", "pepita"):
            W1, F = inst.W1.astype(float), inst.F.astype(float)
            np.testing.assert_allclose(tr.b[0], -W1 @ F, rtol=1e-12)
            np.testing.assert_allclose(tr.b_star, -inst.W1_star.astype(float) @ F, rtol=1e-12)
        if rule == "pepita":
            assert tr.Phi == pytest.approx(float(inst.F.astype(float) @ inst.F.astype(float)))


def test_E_helpers_match_the_ode_terms():
    # pepita_E is the E_k of the §4.5 corrections (db_pepita - db_afa = eta Phi b E) and afa_E2
    # the bracket of the eta^2 term of dQ_kk (from two learning rates); both are evaluations of
    # the same closed forms, so they agree to rounding.
    inst = ts.make_instance(500, 3, 2, seed=4, f_scale=0.05)
    op = inst.order_parameters()
    v, vs, b = inst.v.astype(float), inst.v_star.astype(float), inst.b_fa.astype(float)
    s = 0.3
    a = th.rhs_afa(op.Q, op.R, op.T, v, vs, op.b, op.b_star, eta=0.5, sigma=s)
    p = th.rhs_pepita(op.Q, op.R, op.T, v, vs, op.b, op.b_star, op.Phi, eta=0.5, sigma=s)
    np.testing.assert_allclose(ts.pepita_E(op.Q, op.R, op.T, v, vs, s),
                               (p.db - a.db) / (0.5 * op.Phi * op.b), rtol=1e-10)
    d1 = th.rhs_fa(op.Q, op.R, op.T, v, vs, b, eta=0.5, sigma=s)
    d2 = th.rhs_fa(op.Q, op.R, op.T, v, vs, b, eta=0.25, sigma=s)
    E2 = (np.diag(d1.dQ) / 0.5 - np.diag(d2.dQ) / 0.25) / (0.25 * b**2)
    np.testing.assert_allclose(ts.afa_E2(op.Q, op.R, op.T, v, vs, s), E2, rtol=1e-8)


def test_simulate_reports_divergence():
    # PEPITA with Phi = 0.09 N = 9 at eta = 2: b grows like exp(eta Phi E t) (spec §5) and the
    # weights pass SGD.max_weight; simulate warns, fills NaN and records when.
    inst = ts.make_instance(100, 2, 2, seed=0, f_scale=0.3)
    with pytest.warns(NeurosimWarning, match="diverged"):
        run = ts.simulate(inst, "pepita", eta=2.0, times=[0.0, 1.0, 200.0], seeds=(0,))
    assert run.t_fail[0] is not None and 1.0 < run.t_fail[0] <= 200.0
    assert np.isnan(run.eps_g[-1, 0]) and np.isfinite(run.eps_g[1, 0])


def test_bad_arguments():
    inst = ts.make_instance(30, 2, 2, seed=0)
    with pytest.raises(ValidationError, match="rule"):
        ts.build_student(inst, "dfa")
    with pytest.raises(ValidationError, match="F"):
        ts.build_student(inst, "afa")
    with pytest.raises(ValidationError, match="times"):
        ts.simulate(inst, "bp", eta=0.5, times=[0.0, 0.01, 0.02], seeds=(0,))  # same step at N=30
    with pytest.raises(ValidationError, match="seeds"):
        ts.simulate(inst, "bp", eta=0.5, times=[0.0, 1.0], seeds=())
    with pytest.raises(ValidationError, match="eta"):
        ts.compile_student(inst, "bp", eta=0.0)


# ------------------------------------------------------------------------------------------
# ODE vs simulation: the exact cases at moderate N (default suite)
# ------------------------------------------------------------------------------------------


def planted_instance(N, seed=0):
    """Regime (a) of spec §5 (§7 item 8): F with Phi = 1 and planted b(0) = (0.43, -0.25),
    b* = (-0.25, -0.12), so that b is an O(1), self-averaging overlap."""
    inst = ts.make_instance(N, 2, 2, seed=seed)
    return ts.plant_feedback(inst, [0.43, -0.25], [-0.25, -0.12], 1.0, seed=seed)


def _stat_check(run, tr, N, S, z):
    """|seed mean - ODE| <= z SE + 4 eps_g / N at every output time (see module docstring)."""
    mean = run.eps_g.mean(1)
    se = run.eps_g.std(1, ddof=1) / math.sqrt(S)
    tol = z * se + 4 * tr.eps_g / N
    assert mean[0] == pytest.approx(tr.eps_g[0], rel=1e-12)
    assert np.all(np.abs(mean - tr.eps_g) <= tol), np.c_[run.t, tr.eps_g, mean, tol]
    return tol


@pytest.mark.parametrize("rule", ["bp", "fa", "afa"])
def test_ode_tracks_engine_simulation_moderate_N(rule):
    # N = 500, K = M = 2, eta = 0.5, S = 8 data streams of one instance (AFA: the planted
    # regime (a), where (AFA-b) is exact). Tolerance: the two-sided 1e-3 quantile of Student's t
    # with S - 1 = 7 degrees of freedom (5.41) times the standard error estimated from the
    # spread, plus the O(1/N) bias bound 4 eps_g/N (module docstring). The curve must move by
    # much more than that (the test has power against an O(eta) error in the ODE).
    N, S = 500, 8
    inst = planted_instance(N) if rule == "afa" else ts.make_instance(N, 2, 2, seed=11)
    t = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 6.0])
    run = ts.simulate(inst, rule, eta=0.5, times=t, seeds=range(S))
    tr = ts.theory(inst, rule, eta=0.5, times=t)
    tol = _stat_check(run, tr, N, S, stats.t.ppf(1 - 0.0005, S - 1))
    assert tr.eps_g[0] - tr.eps_g[-1] > 5 * tol.max()


# ------------------------------------------------------------------------------------------
# Scenario and outputs
# ------------------------------------------------------------------------------------------


def _run_cli(tmp_path, *sets):
    from neurosim.cli import main

    out = tmp_path / "run"
    rc = main(["run", "scenarios/teacher_student.toml", "--out", str(out), "--no-progress",
               "--set", "model.N=100", "--set", "model.t_max=2.0", "--set", "model.n_times=6",
               "--set", "model.seeds=[0, 1]", *sum((["--set", s] for s in sets), [])])
    assert rc == 0
    return out


@pytest.fixture
def repo_root(monkeypatch):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    return root


def test_scenario_run_writes_csv_npz_plot_summary(tmp_path, repo_root):
    out = _run_cli(tmp_path)
    for f in ("scenario.toml", "teacher_student.csv", "teacher_student.npz",
              "teacher_student.png", "summary.json"):
        assert (out / f).is_file(), f
    with open(out / "teacher_student.csv") as fh:
        rows = list(csv.DictReader(fh))
    cols = rows[0].keys()
    for c in ("t", "ode_pepita_eps_g", "ode_afa_eps_g", "sim_pepita_eps_g_seed0",
              "sim_pepita_eps_g_seed1", "sim_pepita_eps_g_mean", "sim_afa_eps_g_seed0",
              "ode_pepita_R_01", "ode_pepita_Q_01", "ode_pepita_v_1", "ode_pepita_b_0",
              "ode_pepita_cos_vb", "sim_pepita_mean_R_10", "sim_pepita_mean_b_1",
              "sim_afa_mean_cos_vb"):
        assert c in cols, c
    t = np.array([float(r["t"]) for r in rows])
    assert t[0] == 0.0 and t[-1] == pytest.approx(2.0) and np.all(np.diff(t) > 0)
    # t = 0: theory and every simulated seed start from the same instance
    r0 = rows[0]
    for c in ("sim_pepita_eps_g_seed0", "sim_pepita_eps_g_seed1", "sim_afa_eps_g_seed0",
              "ode_afa_eps_g"):
        assert float(r0[c]) == pytest.approx(float(r0["ode_pepita_eps_g"]), rel=1e-12)
    npz = np.load(out / "teacher_student.npz")
    np.testing.assert_allclose(npz["sim_pepita_eps_g"][:, 1],
                               [float(r["sim_pepita_eps_g_seed1"]) for r in rows], rtol=1e-15)
    s = json.loads((out / "summary.json").read_text())
    assert s["rule"] == "pepita" and s["N"] == 100
    assert s["pepita_afa"]["Phi"] == pytest.approx(float(np.sum(
        ts.make_instance(100, 2, 2, seed=0, f_scale=0.03).F.astype(float) ** 2)))
    assert s["pepita_afa"]["eta_Phi_E0_tmax"] > 0
    assert "sim_pepita_vs_ode_pepita" in s["deviations"]
    assert "sim_afa_vs_ode_afa" in s["deviations"]


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_scenario_other_rules(tmp_path, repo_root, rule):
    out = _run_cli(tmp_path, f'model.rule="{rule}"', "model.n_times=3")
    with open(out / "teacher_student.csv") as fh:
        header = next(csv.reader(fh))
    assert f"ode_{rule}_eps_g" in header and f"sim_{rule}_eps_g_seed1" in header
    assert not any("afa" in h or "pepita" in h for h in header)
    s = json.loads((out / "summary.json").read_text())
    assert "pepita_afa" not in s


def test_scenario_validation(tmp_path, repo_root):
    from neurosim import scenario as sc
    from neurosim.cli import main

    assert main(["validate", "scenarios/teacher_student.toml"]) == 0
    with pytest.raises(ValidationError, match="model.planted_b"):
        m = sc.load("scenarios/teacher_student.toml", ['model.feedback="planted"',
                                                        'model.planted_b="0.1"'])
        sc.build(m)
    with pytest.raises(ValidationError, match="model.seeds"):
        sc.build(sc.load("scenarios/teacher_student.toml", ["model.seeds=[]"]))
    with pytest.raises(ValidationError, match="model.rule"):
        sc.load("scenarios/teacher_student.toml", ['model.rule="dfa"'])
    settings = sc.load("scenarios/teacher_student.toml")
    with pytest.raises(ValidationError, match="--resume"):
        sc.runner_for(settings)(settings, tmp_path / "r", resume=True)


# ------------------------------------------------------------------------------------------
# ODE vs simulation at N = 1000 (slow): spec §7 items 7-13
# ------------------------------------------------------------------------------------------

# Output times: log-spaced over the spec's window t <= 165 (item 7), rounded to whole steps.
T_LONG = np.unique(np.round(np.concatenate([[0.0], np.geomspace(0.5, 165.0, 16)]) * 1000)) / 1000
SEEDS3 = (0, 1, 2)


def _rel(a, b):
    return np.abs(a / b - 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_ode_vs_simulation_bp_fa_N1000(rule):
    # Issue acceptance criterion (spec §7 item 7): N = 1000, K = M = 2, eta = eta_v = 0.5,
    # w, w* ~ N(0, 1), v ~ N(0, 1), v* = 1, FA b ~ N(0, 1); the ODE from the instance's
    # Q, R, T, v (and b); mean of 3 data seeds within 3 % of the ODE for t <= 165.
    # Analysis: the 3-seed mean has standard error c/sqrt(3 N) <= 2.4 %/sqrt(3) = 1.4 % during
    # the initial decrease (t ~ 1) and <= 0.6 % from t ~ 10 on (module docstring), plus a bias
    # <= 4/N = 0.4 %; so 3 % is >= 1.9 standard errors at the single worst time and >= 4 from
    # t = 10 on. The criterion is the issue's; the margin is what 3 seeds allow at N = 1000.
    inst = ts.make_instance(1000, 2, 2, seed=1)
    run = ts.simulate(inst, rule, eta=0.5, times=T_LONG, seeds=SEEDS3)
    tr = ts.theory(inst, rule, eta=0.5, times=T_LONG)
    dev = _rel(run.eps_g.mean(1), tr.eps_g)
    assert np.all(dev <= 0.03), np.c_[T_LONG, tr.eps_g, run.eps_g.mean(1), dev]
    assert tr.eps_g[-1] < 0.05 * tr.eps_g[0]  # it learned: the comparison covers the curve


@pytest.fixture(scope="module")
def regime_a():
    """Planted regime (a) at N = 1000 (spec §7 items 8, 10, 13): AFA and PEPITA simulations of
    the identical instance and data streams, and the AFA and PEPITA (§4.5) ODEs on a fine grid."""
    inst = planted_instance(1000)
    fine = np.unique(np.concatenate([np.arange(0.0, 165.0, 0.05), T_LONG]))
    sims = {r: ts.simulate(inst, r, eta=0.5, times=T_LONG, seeds=SEEDS3) for r in ("afa",
                                                                                   "pepita")}
    odes = {r: ts.theory(inst, r, eta=0.5, times=fine) for r in ("afa", "pepita")}
    idx = np.searchsorted(fine, T_LONG)
    return inst, sims, odes, idx


@pytest.mark.slow
def test_afa_regime_a_exact_with_feedback_collapse(regime_a):
    # Spec §7 item 8: F with Phi = 1 and planted b(0), b*: b is a macroscopic overlap and
    # (AFA-b) is exact as N -> oo. eps_g: the 3 % criterion with the analysis of the BP
    # test (same fluctuation mechanism; measured seed spread here <= 0.6 %).
    # b: each step moves b_k by -(eta/N) delta_k x.F, so a single run's b_k(t) has variance
    # ~ (eta^2 Phi / N) int b_k^2 E[g'^2 Delta^2] ds (ts.feedback_variance, computed along the
    # ODE); the 3-seed mean is allowed 4 of its standard errors plus an O(1/N) bias 4|b(0)|/N.
    inst, sims, odes, idx = regime_a
    run, tr = sims["afa"], odes["afa"]
    e_ode = tr.eps_g[idx]
    dev = _rel(run.eps_g.mean(1), e_ode)
    assert np.all(dev <= 0.03), np.c_[T_LONG, e_ode, run.eps_g.mean(1), dev]
    var = ts.feedback_variance(tr, Phi=inst.order_parameters().Phi, N=inst.N)[idx]
    tol_b = 4 * np.sqrt(var / len(SEEDS3)) + 4 * np.abs(tr.b[0]) / inst.N
    assert np.all(np.abs(run.b.mean(1) - tr.b[idx]) <= tol_b), \
        np.c_[T_LONG, tr.b[idx], run.b.mean(1), tol_b]
    # Feedback collapse (spec §4.4, §7 item 8): b -> 0 in ODE and simulation; eps_g then stays
    # on a plateau (less than 1 % change over the last 65 time units) far above what BP reaches
    # on this instance (factor 3, spec: ~0.12 vs ~0.015).
    assert np.all(np.linalg.norm(run.b[-1], axis=-1) < 0.02 * np.linalg.norm(tr.b[0]))
    assert np.linalg.norm(tr.b[-1]) < 0.02 * np.linalg.norm(tr.b[0])
    j100 = np.searchsorted(T_LONG, 100.0)
    assert abs(run.eps_g[-1].mean() / run.eps_g[j100].mean() - 1) < 0.01 + 0.03
    bp = ts.theory(inst, "bp", eta=0.5, times=[165.0])
    assert run.eps_g[-1].mean() > 3 * bp.eps_g[-1]


@pytest.mark.slow
def test_pepita_regime_a_first_order_corrections(regime_a):
    # Spec §7 item 10 (same set-up, Phi = 1). The §4.5 ODE keeps PEPITA's corrections to first
    # order in the local-field perturbation Delta b_k; the next term of the expansion is smaller
    # by a factor of order |b|. So the §4.5 ODE should miss the simulation by at most
    # max|b| (running maximum along the ODE) times the size of the first-order correction
    # itself (the running maximum of |eps_g^PEPITA-ODE - eps_g^AFA-ODE|), plus 4 standard
    # errors of the 3-seed mean and the O(1/N) bias. And the pure AFA ODE, which drops the
    # correction, must be clearly worse wherever the correction is large.
    inst, sims, odes, idx = regime_a
    run = sims["pepita"]
    mean = run.eps_g.mean(1)
    se = run.eps_g.std(1, ddof=1) / math.sqrt(len(SEEDS3))
    e_pep, e_afa = odes["pepita"].eps_g, odes["afa"].eps_g
    corr = np.maximum.accumulate(np.abs(e_pep - e_afa))[idx]
    bmax = np.maximum.accumulate(np.max(np.abs(odes["pepita"].b), axis=1))[idx]
    tol = bmax * corr + 4 * se + 4 * e_pep[idx] / inst.N
    dev_pep = np.abs(mean - e_pep[idx])
    dev_afa = np.abs(mean - e_afa[idx])
    assert np.all(dev_pep <= tol), np.c_[T_LONG, e_pep[idx], mean, dev_pep, tol]
    big = np.abs(e_pep - e_afa)[idx] > 0.1 * e_afa[idx]
    assert big.sum() >= 5
    assert np.all(dev_pep[big] < 0.5 * dev_afa[big]), np.c_[T_LONG, dev_pep, dev_afa]
    # PEPITA does not collapse as fast: it ends well below AFA (spec: 0.051 vs 0.12).
    assert mean[-1] < 0.7 * sims["afa"].eps_g[-1].mean()


@pytest.mark.slow
@pytest.mark.parametrize("regime", ["a", "b"])
def test_pepita_approx_afa_only_while_eta_phi_E_t_small(regime_a, regime):
    # Spec §5 / §7 item 13. Identically initialised PEPITA and AFA runs (same instance, same data
    # streams) differ in the first layer by PEPITA's presynaptic term x~ = x + F e, which
    # amplifies the feedback at rate eta Phi E_k: to first order b_k^PEPITA = b_k^AFA e^{P_k},
    # P_k(t) = eta Phi int_0^t E_k ds (the other first-order corrections of §4.5 act on Q, R, v
    # and reach b only at second order). Hence, for the largest feedback component:
    #   while P <= 0.3: |b_PEPITA / b_AFA - 1| <= 2 P   (e^P - 1 = P + O(P^2); factor 2 for the
    #                                                    second-order remainder);
    #   once P >= 1:    b_PEPITA / b_AFA - 1 >= P / 2   (the runs have separated; e^P - 1 >= P).
    # Seed noise in b: one run's relative variance is kappa = Var(b)/b^2 (ts.feedback_variance
    # along the AFA ODE), so the ratio of two 3-seed means carries a relative noise of about
    # sqrt(2 kappa / 3); both bounds are widened by 4 of those.
    # Regime (a): the planted Phi = 1 instance (fixture). Regime (b): the PEPITA code's feedback
    # scale, F = 0.07 N(0, 1) at N = 1000 (Phi ~ 5), where PEPITA runs away after t ~ 10, so the
    # window stops at t = 6.
    if regime == "a":
        # window t <= 20: afterwards the AFA feedback collapses to 0 (item 8) and the ratio is
        # no longer a measure of the amplification
        inst, sims, odes, idx = regime_a
        win = T_LONG <= 20.0
        t, idx = T_LONG[win], idx[win]
        sims = {r: replace(s, b=s.b[win]) for r, s in sims.items()}
        afa_ode = odes["afa"]
    else:
        inst = ts.make_instance(1000, 2, 2, seed=0, f_scale=0.07)
        t = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0, 3.0, 4.0, 6.0])
        sims = {r: ts.simulate(inst, r, eta=0.5, times=t, seeds=SEEDS3) for r in ("afa",
                                                                                 "pepita")}
        fine = np.unique(np.concatenate([np.arange(0.0, 6.0, 0.01), t]))
        afa_ode = ts.theory(inst, "afa", eta=0.5, times=fine)
        idx = np.searchsorted(fine, t)
    Phi = inst.order_parameters().Phi
    k = int(np.argmax(np.abs(afa_ode.b[0])))
    E = ts.pepita_E(afa_ode.Q, afa_ode.R, afa_ode.T, afa_ode.v, afa_ode.v_star)[:, k]
    P = 0.5 * Phi * np.concatenate([[0.0], np.cumsum(0.5 * (E[1:] + E[:-1])
                                                     * np.diff(afa_ode.t))])[idx]
    kappa = (ts.feedback_variance(afa_ode, Phi, inst.N)[:, k] / afa_ode.b[:, k] ** 2)[idx]
    ratio = sims["pepita"].b[:, :, k].mean(1) / sims["afa"].b[:, :, k].mean(1) - 1
    noise = 4 * np.sqrt(2 * kappa / len(SEEDS3))
    small, sep = (P <= 0.3) & (t > 0), P >= 1.0
    assert small.sum() >= 2 and sep.sum() >= 2, np.c_[t, P]
    assert np.all(np.abs(ratio[small]) <= 2 * P[small] + noise[small]), np.c_[t, P, ratio, noise]
    assert np.all(ratio[sep] >= 0.5 * P[sep] - noise[sep]), np.c_[t, P, ratio, noise]


@pytest.mark.slow
def test_afa_regime_b_drift_closure():
    # Spec §7 item 9: F entries 0.3 N(0, 1) at N = 500 (Phi = 0.09 N = 45), random initial
    # weights: b(0), b* are O(eps) numbers measured on the instance and b diffuses at a rate
    # comparable to its drift, so (AFA-b) is only the drift closure (spec §5). Analysis: one run's
    # relative variance of b is kappa(t) = Var(b_k)/b_k^2 (ts.feedback_variance along the ODE,
    # O(1) here instead of O(1/N)); the closure neglects it, which biases the mean at second
    # order, i.e. by ~kappa relative. Statistical part: 8 data seeds, the two-sided 1e-3
    # Student-t quantile (7 dof) times the standard error from the spread, which is large while
    # eps_g falls steeply (the seeds learn at different times). Tolerance: their sum + 4 eps_g/N.
    N, S = 500, 8
    inst = ts.make_instance(N, 2, 2, seed=0, f_scale=0.3)
    op = inst.order_parameters()
    t = np.unique(np.round(np.concatenate([[0.0], np.geomspace(0.5, 165.0, 12)]) * N)) / N
    fine = np.unique(np.concatenate([np.arange(0.0, 165.0, 0.05), t]))
    idx = np.searchsorted(fine, t)
    tr = ts.theory(inst, "afa", eta=0.5, times=fine)
    run = ts.simulate(inst, "afa", eta=0.5, times=t, seeds=range(S))
    kappa = np.max(ts.feedback_variance(tr, op.Phi, N) / tr.b**2, axis=1)[idx]
    mean = run.eps_g.mean(1)
    se = run.eps_g.std(1, ddof=1) / math.sqrt(S)
    e = tr.eps_g[idx]
    tol = stats.t.ppf(1 - 0.0005, S - 1) * se + kappa * e + 4 * e / N
    assert np.all(np.abs(mean - e) <= tol), np.c_[t, e, mean, tol, kappa]
    # The closure is not vacuous: b changes by O(1) of itself and eps_g falls 20-fold.
    assert np.max(np.abs(tr.b[idx] / tr.b[0] - 1)) > 0.3
    assert e[-1] < 0.05 * e[0]


@pytest.mark.slow
def test_fa_align_then_memorise_in_simulation():
    # Spec §7 item 12 in the engine (the ODE version is in test_theory.py): small initialisation
    # w, v ~ 1e-2 N(0, 1), fixed b ~ N(0, 1) with cos(v, b) < 0, eta = 0.5, N = 1000, 3 seeds.
    # Definitions as in the ODE test: alignment = every seed's cos(v, b) reaches 0.9 while the
    # mean eps_g is within 5 % of eps_g(0); memorisation = eps_g(100) < 0.1 eps_g(0); cos stays
    # >= 0.9 afterwards. And the simulation tracks the ODE within the 3 % (same
    # fluctuation analysis as the BP test; relative spread here is below 0.5 %).
    inst = ts.make_instance(1000, 2, 2, seed=2, w_scale=1e-2, v_scale=1e-2)
    if float(inst.v.astype(float) @ inst.b_fa.astype(float)) > 0:
        inst = replace(inst, v=-inst.v)
    t = np.unique(np.round(np.concatenate([[0.0], np.geomspace(0.05, 100.0, 30)]) * 1000)) / 1000
    run = ts.simulate(inst, "fa", eta=0.5, times=t, seeds=SEEDS3)
    tr = ts.theory(inst, "fa", eta=0.5, times=t)
    c = run.cos_vb
    eg = run.eps_g.mean(1)
    assert np.all(c[0] < 0)
    j = int(np.argmax(np.all(c > 0.9, axis=1)))
    assert j > 0
    assert eg[j] > 0.95 * eg[0]
    assert eg[-1] < 0.1 * eg[0]
    assert np.all(c[j:] >= 0.9)
    assert np.all(_rel(eg, tr.eps_g) <= 0.03), np.c_[t, tr.eps_g, eg]
    # alignment time: the ODE's first time with cos >= 0.9 is within one output-grid step
    ja = int(np.argmax(tr.cos_vb > 0.9))
    assert abs(ja - j) <= 1


@pytest.mark.slow
def test_plateau_escape_in_simulation():
    # Spec §7 item 11 at simulation level (the exact ln(1/r0) law is tested on the ODE in
    # test_theory.py). SCM with v = v* = 1 frozen, an orthonormal teacher (T = I), Q(0) = I and
    # R(0) = r0 MX planted exactly, eta = 0.5, N = 1000, 3 data seeds, r0 = 0.2 and 0.05.
    # (i) Plateau level: simulation within 3 % of the ODE at t = 40 (as in the BP test).
    # (ii) Escape delay (crossing of half the plateau level) between the two r0: the ODE's
    # delay, up to the noise. On the plateau the per-sample noise kicks the unstable
    # (antisymmetric) mode by ~ sigma_xi = sqrt(eta^2 E[g'^2 Delta^2] / (2 lambda_u N)) in total
    # (diffusion rate eta^2 E[g'^2 Delta^2]/N, amplified at rate lambda_u), against a planted
    # amplitude >= r0 s_min(MX). So one run's escape time moves by
    # sigma_t = sigma_xi / (r0 s_min lambda_u); the 3-seed mean delay is allowed 4 standard errors
    # sqrt(sigma_t(r0a)^2 + sigma_t(r0b)^2)/sqrt(3). Also, with r0 >> sigma_xi the delay must be
    # positive and of the order ln(r0a/r0b)/lambda_u.
    N, eta = 1000, 0.5
    MX = np.array([[1.0, 0.3], [-0.2, 0.5]])
    base = ts.make_instance(N, 2, 2, seed=5)
    U, _ = np.linalg.qr(base.W1_star.astype(float).T)
    base = replace(base, W1_star=U.T, v=np.ones(2))
    t = np.arange(0.0, 200.0 + 1e-9, 2.0)
    fine = np.arange(0.0, 1200.0, 0.25)
    lam_probe = []
    for r0 in (1e-4, 1e-6):   # lambda_u from the ODE's own log law at tiny r0 (test_theory)
        tr = ts.theory(ts.plant_student(base, np.eye(2), r0 * MX), "bp", eta=eta, times=fine,
                       train_v=False)
        lam_probe.append(fine[np.argmax((tr.eps_g < 0.5 * tr.eps_g[160]) & (fine > 40))])
    lam_u = 2 * math.log(10) / (lam_probe[1] - lam_probe[0])
    esc, plateau = {}, {}
    for r0 in (0.2, 0.05):
        inst = ts.plant_student(base, np.eye(2), r0 * MX)
        tr = ts.theory(inst, "bp", eta=eta, times=t, train_v=False)
        run = ts.simulate(inst, "bp", eta=eta, times=t, seeds=SEEDS3, train_v=False)
        j40 = int(np.searchsorted(t, 40.0))
        assert _rel(run.eps_g[j40].mean(), tr.eps_g[j40]) <= 0.03
        thr = 0.5 * tr.eps_g[j40]

        def cross(e):
            k = int(np.argmax((e < thr) & (t > 40)))
            assert k > 0, "no escape before t = 200"
            return t[k - 1] + (e[k - 1] - thr) / (e[k - 1] - e[k]) * (t[k] - t[k - 1])

        esc[r0] = (cross(tr.eps_g), np.array([cross(run.eps_g[:, s]) for s in range(3)]))
        op = inst.order_parameters()
        E2 = float(np.max(ts.afa_E2(op.Q, op.R, op.T, np.ones(2), np.ones(2))))
        plateau[r0] = (tr.eps_g[j40], E2)
    # E[g'^2 Delta^2] on the plateau, from the plateau state of the r0 = 0.05 ODE at t = 40
    inst = ts.plant_student(base, np.eye(2), 0.05 * MX)
    tr40 = ts.theory(inst, "bp", eta=eta, times=[40.0], train_v=False)
    E2p = float(np.max(ts.afa_E2(tr40.Q[0], tr40.R[0], tr40.T, np.ones(2), np.ones(2))))
    sig_xi = math.sqrt(eta**2 * E2p / (2 * lam_u * N))
    smin = np.linalg.svd(MX, compute_uv=False).min()
    sig_t = {r0: sig_xi / (r0 * smin * lam_u) for r0 in esc}
    d_ode = esc[0.05][0] - esc[0.2][0]
    d_sim = esc[0.05][1].mean() - esc[0.2][1].mean()
    tol = 4 * math.sqrt(sig_t[0.2] ** 2 + sig_t[0.05] ** 2) / math.sqrt(3)
    assert abs(d_sim - d_ode) <= tol, (d_sim, d_ode, tol, esc, lam_u)
    assert d_sim > 0.5 * math.log(4) / lam_u
