"""Brian2 export and cross-check: the exported network reproduces neurosim's time course step
by step (float32 vs float64 rounding only), across phase switches, resets, held traces and
instantaneous populations; unsupported features fail clearly.

The default tests use Brian2's numpy target (no compiler) on circuits of a few dozen units and
a few hundred steps; the cython and cpp_standalone checks are marked slow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("brian2")

from neurosim import (Circuit, ErrorPopulation, Monitor, Phase, Protocol, SGD, Simulator,  # noqa: E402
                      ValidationError, compile_plan)
from neurosim import scenario as sc  # noqa: E402
from neurosim.interop import ExportError, export_brian2  # noqa: E402
from neurosim.interop.brian2_export import exportable_copy  # noqa: E402
from neurosim.interop.crosscheck import crosscheck, default_tolerance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "scenarios" / "crosscheck_small.toml"

# brian2's equation parser calls a deprecated pyparsing spelling; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*parseAll.*:DeprecationWarning")


def _run_both(circuit, protocol, trials=2, seed=0, record_drive=True, weights=None, **export_kw):
    """Run ``trials`` trials (batch 1) in neurosim and in the exported Brian2 network; return
    (sim, bn, {(pop, var, phase): (neurosim rows, brian2 rows)})."""
    vars_ = [(n, v, ph.name) for n in circuit.populations for ph in protocol.phases
             for v in (("r", "drive") if record_drive and not isinstance(
                 circuit.populations[n], ErrorPopulation) else ("r",))]
    mons = [Monitor(f"{n}.{v}", phase=ph, every=1, per="step", sample=0, name=f"{n}.{v}@{ph}")
            for n, v, ph in vars_]
    plan = compile_plan(circuit, protocol, monitors=mons, batch=1, seed=seed,
                        output=export_kw.pop("output", None))
    sim = Simulator(plan)
    if weights:
        for k, w in weights.items():
            sim.set_weights(k, w)
    bn = export_brian2(sim, target="numpy", **export_kw)
    rng = np.random.default_rng(seed + 1)
    stim_sizes = {name: plan.view(f"stim.{name}").shape[1] for name in plan.stimuli}
    X = rng.random((trials, stim_sizes.get("x", 1)), dtype=np.float32)
    n_t = stim_sizes.get("t", 1)
    Y = rng.integers(0, n_t, trials)
    for k in range(trials):
        bn.run_trial({"x": X[k], "t": np.eye(n_t)[Y[k]]})
    sim.train(X, Y)
    traces = sim.traces
    out = {}
    for n, v, ph in vars_:
        out[(n, v, ph)] = (np.asarray(traces[f"{n}.{v}@{ph}"].values, np.float64),
                           bn.trace(n, v, ph))
    return sim, bn, out


def _max_rel(pairs):
    worst = 0.0
    for key, (a, b) in pairs.items():
        assert a.shape == b.shape, key
        ok = ~np.isnan(b)
        if not ok.any():
            continue
        dev = np.max(np.abs(a[ok] - b[ok]))
        rng = np.max(b[ok]) - np.min(b[ok])
        worst = max(worst, dev / (rng if rng > 0 else max(np.max(np.abs(b[ok])), 1.0)))
    return worst


def _chain(method="euler", reset=None, dur=0.005, dt=1e-4):
    """x (inst) -> h (tanh, tau 10 ms, bias) -> o (sigmoid, tau 5 ms); B: o -> h on in 'b'."""
    c = Circuit("chain")
    c.population("x", 5)
    c.population("h", 7, tau="10 ms", transfer="tanh", bias=0.2)
    c.population("o", 3, tau="5 ms", transfer="sigmoid")
    c.project("x", "h", name="W1")
    c.project("h", "o", name="W2")
    c.feedback("o", "h", name="B", gain=-0.7, phases=("b",), init="he_uniform")
    p = Protocol((Phase("a", clamp={"x": "x"}, duration=dur),
                  Phase("b", clamp={"x": "x", "o": "t"}, duration=dur, reset=reset)),
                 mode="time", dt=dt, method=method)
    return c, p


# -- the shipped scenario ---------------------------------------------------------------------
def test_crosscheck_small_scenario_passes_with_phase_switch():
    settings = sc.load(SMALL, ["simulation.phase_duration=\"8 ms\""])
    lines = []
    res = crosscheck(settings, trials=2, log=lines.append)
    assert res["passed"], "\n".join(lines)
    names = {r["variable"] for r in res["rows"]}
    assert {"hidden.r@forward", "hidden.r@feedback", "output.r@feedback",
            "hidden.drive@feedback"} <= names
    assert res["max_rel"] < 1e-5          # float32 vs float64: measured ~1e-6
    assert res["tolerance"] == pytest.approx(default_tolerance(*sc.build(settings)[:2])[0])
    assert lines[-1].startswith("PASS")


def test_crosscheck_cli_exit_codes(capsys):
    from neurosim.cli import main

    assert main(["crosscheck", str(SMALL), "--trials", "1",
                 "--set", "simulation.phase_duration=\"5 ms\""]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "hidden.r@feedback" in out and "tolerance" in out
    assert main(["crosscheck", str(SMALL), "--trials", "1", "--tolerance", "1e-12",
                 "--set", "simulation.phase_duration=\"2 ms\""]) == 1
    assert "FAIL" in capsys.readouterr().out
    # a steady-mode scenario is a usage error (exit 2), not a failed comparison
    assert main(["crosscheck", str(ROOT / "scenarios" / "pepita_mnist.toml")]) == 2
    assert "needs mode" in capsys.readouterr().err


def test_default_tolerance_formula():
    c, p = _chain(dt=1e-4)
    tol, why = default_tolerance(c, p)
    # slowest population tau = 10 ms -> 100 steps; widest fan-in: h gets 5 + 3
    assert tol == pytest.approx(10 * 2.0 ** -24 * (100 + 8))
    assert "tau/dt 100" in why and "fan-in 8" in why


# -- exporter semantics ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["euler", "exp_euler"])
def test_export_matches_across_phase_switch(method):
    c, p = _chain(method=method)
    _, bn, pairs = _run_both(c, p, trials=2)
    assert _max_rel(pairs) < default_tolerance(c, p)[0]
    # the switch matters: the top-down drive (and the target nudge) change h's drive at once
    a_ns, a_b2 = pairs[("h", "drive", "a")]
    b_ns, b_b2 = pairs[("h", "drive", "b")]
    n = p.n_steps(p.phases[0])
    jump = np.abs(b_b2[0] - a_b2[n - 1]).max()
    assert jump > 1e-2
    np.testing.assert_allclose(b_ns[0] - a_ns[n - 1], b_b2[0] - a_b2[n - 1], atol=1e-5)
    # the feedback projection is gated: its Synapses ran only in phase 'b'
    assert bn.input_vars["B"] == ("h", "I_fb") and bn.input_vars["W1"] == ("h", "I_ff")
    assert [s.phase for s in bn.segments] == ["a", "b", "a", "b"]


def test_export_reset_phase():
    c, p = _chain(reset=True)
    _, _, pairs = _run_both(c, p, trials=1)
    assert _max_rel(pairs) < default_tolerance(c, p)[0]
    # reset: the first step of 'b' starts from zero rates
    _, h_b = pairs[("h", "r", "b")]
    assert np.abs(h_b[0]).max() < 0.05


def test_export_pepita_held_error_and_instantaneous_input():
    """PEPITA's circuit: error = output - target (linked), held at the end of 'clean', fed back
    through F onto the instantaneous input during 'modulated'."""
    from neurosim.models import build_pepita_network

    net = build_pepita_network((10, 8, 4), mode="time", tau="10 ms", dt="0.2 ms",
                               phase_duration="6 ms", dropout=0.0, f_scale=0.5)
    c = exportable_copy(net.circuit, transfers={"output": "sigmoid"})
    _, bn, pairs = _run_both(c, net.protocol, trials=2)
    assert set(bn.holds) == {"error@clean"}
    assert _max_rel(pairs) < default_tolerance(c, net.protocol)[0]
    x_ns, x_b2 = pairs[("input", "r", "modulated")]
    assert not np.isnan(x_b2).any()
    # F really acts: the modulated input differs from the clean one
    assert np.abs(x_b2 - pairs[("input", "r", "clean")][1]).max() > 1e-3


def test_export_instantaneous_population_fed_by_dynamic_one():
    """y = relu(W h) is instantaneous but changes every step: Brian2 refreshes it at the start
    of the next step, so all rows but the last of each phase are comparable."""
    c = Circuit("lag")
    c.population("x", 4)
    c.population("h", 6, tau="4 ms", transfer="tanh")
    c.population("y", 5, transfer="relu")
    c.population("z", 3, tau="8 ms", transfer="identity")
    c.project("x", "h", name="A")
    c.project("h", "y", name="Bm")
    c.project("y", "z", name="C")
    p = Protocol((Phase("a", clamp={"x": "x"}, duration="4 ms"),
                  Phase("b", clamp={"x": "x", "y": "x2"}, duration="4 ms")),
                 mode="time", dt="0.1 ms")
    _, bn, pairs = _run_both(c, p, trials=1)
    ns, b2 = pairs[("y", "r", "a")]
    assert np.isnan(b2[-1]).all() and not np.isnan(b2[:-1]).any()
    assert _max_rel(pairs) < default_tolerance(c, p)[0]
    # z depends on y every step: full rows, and they match
    assert not np.isnan(pairs[("z", "r", "b")][1]).any()


def test_export_several_projections_per_role_and_gates():
    c = Circuit("multi")
    c.population("x1", 3)
    c.population("x2", 4)
    c.population("h", 5, tau="5 ms", transfer="relu")
    c.project("x1", "h", name="P")
    c.project("x2", "h", name="Q", gain=-0.5)
    p = Protocol((Phase("one", clamp={"x1": "x", "x2": "u"}, duration="3 ms", gates=("P",)),
                  Phase("two", clamp={"x1": "x", "x2": "u"}, duration="3 ms")),
                 mode="time", dt="0.1 ms")
    plan_stims = {"x": np.linspace(0, 1, 3), "u": np.linspace(1, -1, 4)}
    sim = Simulator(compile_plan(c, p, monitors=[Monitor("h.r", phase=ph.name, every=1,
                                                          name=f"h@{ph.name}")
                                                  for ph in p.phases], batch=1, seed=3))
    bn = export_brian2(sim, target="numpy")
    assert bn.input_vars["P"] == ("h", "I_ff_P") and bn.input_vars["Q"] == ("h", "I_ff_Q")
    bn.run_trial(plan_stims)
    sim.set_stimulus("u", plan_stims["u"])
    sim.train(plan_stims["x"].reshape(1, -1).astype(np.float32), np.zeros(1, np.int64))
    for ph in ("one", "two"):
        a = sim.traces[f"h@{ph}"].values
        b = bn.trace("h", "r", ph)
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_export_copies_learned_weights():
    """Plasticity stays in neurosim; the current weights (gain folded in) are copied."""
    from neurosim.models import build_pepita_network

    net = build_pepita_network((6, 5, 3), mode="time", tau="10 ms", dt="1 ms",
                               phase_duration="5 ms", dropout=0.0)
    c = exportable_copy(net.circuit, transfers={"output": "sigmoid"})
    sim = Simulator(compile_plan(c, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.5),
                                 seed=0))
    w0 = {k: v.copy() for k, v in sim.weights.items()}
    rng = np.random.default_rng(0)
    sim.train(rng.random((8, 6), dtype=np.float32), rng.integers(0, 3, 8))
    assert not np.allclose(w0["W1"], sim.weights["W1"])
    bn = export_brian2(sim, target="numpy", record=False)
    for name, proj in c.projections.items():
        post, pre = c.shape_of(proj)
        w = np.asarray(bn.synapses[name].w[:]).reshape(pre, post).T
        np.testing.assert_array_equal(w, proj.gain * sim.weights[name].astype(np.float64))
    # default weights: sampled exactly as compile_plan does for the same seed
    bn0 = export_brian2(c, net.protocol, seed=0, target="numpy", record=False)
    post, pre = c.shape_of(c.projections["W1"])
    np.testing.assert_array_equal(np.asarray(bn0.synapses["W1"].w[:]).reshape(pre, post).T, w0["W1"])
    with pytest.raises(ValidationError, match=r"set_weights\('W1'\).*expected \(post, pre\)"):
        bn.set_weights("W1", w0["W1"].T)
    with pytest.raises(ValidationError, match="no projection 'nope'"):
        bn.set_weights("nope", w0["W1"])


def test_equations_are_documented_forms():
    c, p = _chain()
    bn = export_brian2(c, p, target="numpy", record=["h"])
    eq = bn.equations["h"]
    assert "dr/dt = (-r + tanh(drive)) / tau : 1" in eq
    assert "drive = I_ff + I_fb + b : 1" in eq
    assert "r = drive : 1" in bn.equations["x"]
    assert "clip" not in bn.describe() and "1 / (1 + exp(-(drive)))" in bn.equations["o"]
    with pytest.raises(ValidationError, match="not recorded"):
        bn.trace("o", "r")


# -- what is not exported -----------------------------------------------------------------------
def _pop_circuit(**kw):
    c = Circuit("bad")
    c.population("x", 3)
    c.population("h", 2, tau="5 ms", **kw)
    c.project("x", "h", name="W")
    p = Protocol((Phase("a", clamp={"x": "x"}, duration="2 ms"),), mode="time", dt="1 ms")
    return c, p


@pytest.mark.parametrize("kw, match", [
    (dict(transfer="softmax"), r"Population\('h'\)\.transfer: softmax is not exported"),
    (dict(transfer="erf"), r"Population\('h'\)\.transfer: transfer 'erf' is not exported"),
    (dict(transfer="relu", dropout=0.2), r"Population\('h'\)\.dropout: .*not exported"),
])
def test_unsupported_populations_fail_clearly(kw, match):
    c, p = _pop_circuit(**kw)
    with pytest.raises(ExportError, match=match):
        export_brian2(c, p)


def test_steady_mode_and_bad_arguments_fail_clearly():
    c, _ = _pop_circuit(transfer="relu")
    steady = Protocol((Phase("a", clamp={"x": "x"}),))
    with pytest.raises(ExportError, match=r"^Protocol\.mode: .*only time-mode"):
        export_brian2(c, steady)
    c, p = _pop_circuit(transfer="relu")
    with pytest.raises(ValidationError, match="export_brian2.target"):
        export_brian2(c, p, target="cuda")
    with pytest.raises(ValidationError, match="export_brian2.circuit"):
        export_brian2("circuit", p)
    with pytest.raises(ValidationError, match="no population 'q'"):
        export_brian2(c, p, record=["q"])


def test_held_trace_of_lagging_instantaneous_population_is_refused():
    c = Circuit("held")
    c.population("x", 3)
    c.population("h", 4, tau="5 ms", transfer="tanh")
    c.population("y", 4, transfer="relu")
    c.project("x", "h", name="A")
    c.project("h", "y", name="Bm")
    c.project("y@a", "h", name="Back", phases=("b",), role="feedback")
    p = Protocol((Phase("a", clamp={"x": "x"}, duration="2 ms"),
                  Phase("b", clamp={"x": "x"}, duration="2 ms")), mode="time", dt="1 ms")
    compile_plan(c, p)  # fine in neurosim
    with pytest.raises(ExportError, match=r"pre='y@a'.*held trace of instantaneous"):
        export_brian2(c, p)


def test_missing_brian2_is_a_clear_error(monkeypatch):
    c, p = _pop_circuit(transfer="relu")
    monkeypatch.setitem(sys.modules, "brian2", None)
    with pytest.raises(ExportError, match="brian2 is not installed.*pip install brian2"):
        export_brian2(c, p)


def test_exportable_copy_keeps_weights_and_structure():
    from neurosim.models import build_pepita_network

    net = build_pepita_network((6, 5, 3), dropout=0.1)
    c = exportable_copy(net.circuit, transfers={"output": "sigmoid"}, dropout=0.0)
    assert c.populations["output"].transfer == "sigmoid"
    assert c.populations["hidden"].dropout == 0.0
    assert list(c.projections) == list(net.circuit.projections)
    with pytest.raises(ValidationError, match="no population 'nope'"):
        exportable_copy(net.circuit, transfers={"nope": "relu"})


# -- slow: compiled Brian2 targets --------------------------------------------------------------
@pytest.mark.slow
def test_crosscheck_small_scenario_cython():
    pytest.importorskip("Cython")
    settings = sc.load(SMALL)
    lines = []
    res = crosscheck(settings, trials=2, target="cython", log=lines.append)
    assert res["passed"], "\n".join(lines)


@pytest.mark.slow
def test_export_cpp_standalone_matches(tmp_path):
    """The same exported network built as a C++ standalone project (in a subprocess: the
    device is process-global)."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import numpy as np, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from brian2 import set_device, device, prefs
        prefs.devices.cpp_standalone.openmp_threads = 0
        set_device("cpp_standalone", build_on_run=False, directory={str(tmp_path / 'sa')!r})
        from neurosim import Monitor, Simulator, compile_plan
        from neurosim.interop import export_brian2
        from test_brian2_interop import _chain
        c, p = _chain()
        mons = [Monitor(f"{{n}}.r", phase=ph.name, every=1, name=f"{{n}}@{{ph.name}}")
                for n in c.populations for ph in p.phases]
        sim = Simulator(compile_plan(c, p, monitors=mons, batch=1, seed=0))
        bn = export_brian2(sim)
        x = np.linspace(0, 1, 5, dtype=np.float32)
        bn.run_trial({{"x": x, "t": np.eye(3)[1]}})
        device.build(directory={str(tmp_path / 'sa')!r}, compile=True, run=True)
        sim.train(x.reshape(1, -1), np.array([1]))
        worst = max(np.abs(sim.traces[f"{{n}}@{{ph.name}}"].values - bn.trace(n, "r", ph.name)).max()
                    for n in c.populations for ph in p.phases)
        print("WORST", worst)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    worst = float(r.stdout.split("WORST")[1].split()[0])
    assert worst < 1e-5


def test_crosscheck_pepita_scenario_with_plasticity_and_replacements():
    """A scenario with a learning rule: softmax and dropout replaced in both simulators, the
    weights learned by neurosim copied into Brian2 before each trial."""
    settings = sc.load(ROOT / "scenarios" / "pepita_mnist_time.toml",
                       ["model.sizes=[6,5,3]", 'simulation.dt="1 ms"',
                        'simulation.phase_duration="6 ms"', "training.lr=0.5"])
    with pytest.raises(ExportError, match=r"Population\('hidden'\)\.dropout"):
        crosscheck(settings, trials=1, log=lambda *_: None)
    with pytest.raises(ExportError, match=r"Population\('output'\)\.transfer: softmax"):
        crosscheck(settings, trials=1, no_dropout=True, log=lambda *_: None)
    lines = []
    res = crosscheck(settings, trials=3, plasticity=True, softmax_as="sigmoid", no_dropout=True,
                     log=lines.append)
    text = "\n".join(lines)
    assert res["passed"], text
    assert "softmax -> sigmoid" in text and "dropout -> 0" in text and "plasticity on" in text
    assert "monitor 'angle:F' skipped" in text
    assert {r["variable"] for r in res["rows"]} >= {"error.r@clean", "input.r@modulated"}


def test_export_makes_the_compile_checks():
    c, _ = _pop_circuit(transfer="relu")
    p = Protocol((Phase("a", clamp={"x": "x"}, duration="20 ms"),), mode="time", dt="10 ms")
    with pytest.raises(ValidationError, match="exceeds tau"):
        export_brian2(c, p)
    p = Protocol((Phase("a", clamp={"nope": "x"}, duration="2 ms"),), mode="time", dt="1 ms")
    with pytest.raises(ValidationError, match=r"Phase\('a'\)\.clamp: no population 'nope'"):
        export_brian2(c, p)


def test_crosscheck_out_writes_traces_table_and_overlay(tmp_path):
    """``neurosim crosscheck --out DIR``: both simulators' traces (the same arrays the table
    compares), the table and an overlay plot."""
    import json

    from neurosim.cli import main

    out = tmp_path / "xc"
    assert main(["crosscheck", str(SMALL), "--trials", "2", "--out", str(out),
                 "--set", "simulation.phase_duration=\"5 ms\""]) == 0
    table = json.loads((out / "crosscheck.json").read_text())
    assert table["passed"] and table["rows"]
    with np.load(out / "crosscheck_traces.npz") as z:
        for row in table["rows"]:
            key = row["variable"]
            a, b, t = z[f"{key}/neurosim"], z[f"{key}/brian2"], z[f"{key}/t"]
            assert a.shape == b.shape and len(t) == len(a) == 2 * 50     # 2 trials x 5 ms / 0.1 ms
            ok = ~np.isnan(b)
            assert np.max(np.abs(a[ok] - b[ok])) == pytest.approx(row["max_dev"])
    png = out / "crosscheck.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["crosscheck", str(SMALL), "--trials", "1", "--out", str(png)]) == 2  # a file
