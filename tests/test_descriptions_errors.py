"""Every bad-input path raises a clear error naming ``Object.attribute`` and the value given.

Errors a user can trigger are ValidationError (a ValueError) raised before anything runs;
inconsistent descriptions that only show up when compiling are CompileError; failures in
compiled code are SimulationError naming phase and population/projection.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from conftest import make_data
from neurosim import (PEPITA, SGD, Circuit, CompileError, ErrorPopulation, Given, Monitor,
                      NeurosimWarning, Phase, Population, Projection, Protocol, SimulationError,
                      Simulator, ValidationError, compile_plan)
from neurosim.models import build_pepita_network


@contextlib.contextmanager
def raises(exc, *fragments):
    """``exc`` is raised inside the block and its message contains every fragment."""
    with pytest.raises(exc) as ei:
        yield ei
    msg = str(ei.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def _chain(tau_h=0.0):
    c = Circuit("net")
    c.population("input", 4)
    c.population("hidden", 3, transfer="relu", tau=tau_h)
    c.population("output", 2, transfer="softmax", tau=tau_h)
    c.error("error", "output")
    c.project("input", "hidden", name="W1")
    c.project("hidden", "output", name="W2")
    return c


def _proto(mode="steady", **kw):
    dur = dict(duration=0.01) if mode == "time" else {}
    return Protocol((Phase("clean", clamp={"input": "x"}, **dur),), mode=mode, **kw)


@pytest.fixture
def pepita_sim():
    net = build_pepita_network((20, 16, 5), dropout=0.1)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=0.1, momentum=0.9), batch=8, seed=1)
    return Simulator(plan)


# ---- populations --------------------------------------------------------------------------------
def test_unknown_transfer():
    with raises(ValidationError, "Population('h').transfer", "'rleu'", "did you mean 'relu'"):
        Population("h", 3, transfer="rleu")


@pytest.mark.parametrize("tau,shown", [(-0.01, "-0.01"), ("-5 ms", "-5 ms"), (float("nan"), "nan"),
                                       (True, "True")])
def test_bad_tau(tau, shown):
    with raises(ValidationError, "Population('h').tau", shown):
        Population("h", 3, tau=tau)


@pytest.mark.parametrize("size", [0, -2, 2.5, True])
def test_bad_size(size):
    with raises(ValidationError, "Population('h').size", repr(size) if size is not True else
                "True"):
        Population("h", size)


@pytest.mark.parametrize("name", ["", "a b", "x@y", 3])
def test_bad_names(name):
    with raises(ValidationError, "Population.name", repr(name)):
        Population(name, 3)
    with raises(ValidationError, "Projection.name"):
        Projection(name, "a", "b")


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_bad_dropout(p):
    with raises(ValidationError, "Population('h').dropout", str(p)):
        Population("h", 3, dropout=p)


def test_dropout_on_softmax_rejected():
    with raises(ValidationError, "Population('o').dropout", "softmax"):
        Population("o", 3, transfer="softmax", dropout=0.1)


def test_bad_bias():
    with raises(ValidationError, "Population('h').bias", "(2,)", "(3,)"):
        Population("h", 3, bias=[1.0, 2.0])
    with raises(ValidationError, "Population('h').bias", "NaN"):
        Population("h", 3, bias=[1.0, np.nan, 0.0])


# ---- times: floats, unit strings, brian2 quantities --------------------------------------------
@pytest.mark.parametrize("given,seconds", [(0.01, 0.01), ("10 ms", 0.01), ("10ms", 0.01),
                                           ("0.5 s", 0.5), ("250 us", 2.5e-4), ("10*ms", 0.01),
                                           ("1e-2", 0.01), (np.float32(0.25), 0.25), (0, 0.0)])
def test_time_values_accepted(given, seconds):
    assert Population("h", 3, tau=given).tau == pytest.approx(seconds, rel=1e-6)


@pytest.mark.parametrize("given,fragment", [("10 mV", "'mV'"), ("10 parsec", "'parsec'"),
                                            ("fast", "'fast'"), ("inf", "'inf'"),
                                            ([10], "list")])
def test_time_values_rejected(given, fragment):
    with raises(ValidationError, "Population('h').tau", fragment):
        Population("h", 3, tau=given)


def test_brian2_quantities():
    b2 = pytest.importorskip("brian2")
    assert Population("h", 3, tau=10 * b2.ms).tau == pytest.approx(0.01)
    p = Protocol((Phase("a", duration=50 * b2.ms),), mode="time", dt=0.1 * b2.ms)
    assert p.dt == pytest.approx(1e-4) and p.phases[0].duration == pytest.approx(0.05)
    with raises(ValidationError, "Population('h').tau", "10. * mvolt", "time"):
        Population("h", 3, tau=10 * b2.mV)
    with raises(ValidationError, "Protocol.dt", "hertz"):
        Protocol((Phase("a", duration=0.05),), mode="time", dt=10 * b2.Hz)
    with raises(ValidationError, "Population('h').tau", "-10"):
        Population("h", 3, tau=-10 * b2.ms)


# ---- protocols ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dt,shown", [(0, "0"), (-1e-3, "-0.001"), ("0 ms", "0 ms"),
                                      ("-1 ms", "-1 ms")])
def test_bad_dt(dt, shown):
    with raises(ValidationError, "Protocol.dt", shown, "> 0"):
        _proto("time", dt=dt)


def test_duration_shorter_than_dt():
    with raises(ValidationError, "Phase('clean').duration", "0.0005", "dt = 0.001"):
        Protocol((Phase("clean", duration=0.0005),), mode="time", dt=0.001)


def test_missing_or_bad_duration():
    with raises(ValidationError, "Phase('clean').duration", "missing"):
        Protocol((Phase("clean"),), mode="time")
    with raises(ValidationError, "Phase('clean').duration", "0"):
        Phase("clean", duration=0)
    with raises(ValidationError, "Phase('clean').duration", "-3 ms"):
        Phase("clean", duration="-3 ms")


def test_bad_protocol_fields():
    ph = (Phase("a"),)
    with raises(ValidationError, "Protocol.mode", "'stedy'", "did you mean 'steady'"):
        Protocol(ph, mode="stedy")
    with raises(ValidationError, "Protocol.method", "'rk4'"):
        Protocol(ph, method="rk4")
    with raises(ValidationError, "Protocol.phases", "duplicate", "'a'"):
        Protocol((Phase("a"), Phase("a")))
    with raises(ValidationError, "Protocol.phases"):
        Protocol(())
    with raises(ValidationError, "Protocol.inference_phase", "'b'"):
        Protocol(ph, inference_phase="b")
    with raises(ValidationError, "Phase('a').clamp"):
        Phase("a", clamp={"x": 3})
    with raises(ValidationError, "Phase('a').gates", "'W1'"):
        Phase("a", gates="W1")
    with raises(ValidationError, "Phase('a').reset", "1"):
        Phase("a", reset=1)


# ---- circuits ----------------------------------------------------------------------------------
def test_duplicate_names():
    c = _chain()
    with raises(ValidationError, "Circuit('net')", "'hidden'", "already used"):
        c.population("hidden", 5)
    with raises(ValidationError, "Circuit('net')", "'W1'"):
        c.project("input", "output", name="W1")
    with raises(ValidationError, "Circuit('net')", "'input'"):       # across kinds
        c.project("input", "output", name="input")


def test_projection_to_unknown_population_suggests_name():
    c = _chain()
    with raises(ValidationError, "Projection('x').pre", "'inptu'", "did you mean 'input'"):
        c.add(Projection("x", "inptu", "hidden"))
    with raises(ValidationError, "Projection('y').post", "'hiden'", "did you mean 'hidden'"):
        c.add(Projection("y", "input", "hiden"))
    with raises(ValidationError, "Projection('z').pre", "'error'"):   # held trace, wrong pop
        c.add(Projection("z", "eror@clean", "input"))
    assert "x" not in c.projections and "y" not in c.projections


def test_error_population_cannot_receive_projection():
    c = _chain()
    with raises(ValidationError, "Projection('bad').post", "'error'", "error population"):
        c.project("hidden", "error", name="bad")
    with raises(ValidationError, "Projection('bad').post", "'error@clean'"):
        Projection("bad", "hidden", "error@clean")


def test_error_population_size_and_output():
    c = _chain()
    with raises(ValidationError, "ErrorPopulation('e2').size", "got 3", "2"):
        c.add(ErrorPopulation("e2", "output", 3))
    with raises(ValidationError, "ErrorPopulation('e3').output", "'outptu'", "'output'"):
        c.error("e3", "outptu")


def test_bad_projection_fields():
    with raises(ValidationError, "Projection('p').role", "'backward'"):
        Projection("p", "a", "b", role="backward")
    with raises(ValidationError, "Projection('p').init", "'glorot'"):
        Projection("p", "a", "b", init="glorot")
    with raises(ValidationError, "Projection('p').phases", "'clean'"):
        Projection("p", "a", "b", phases="clean")
    with raises(ValidationError, "Projection('p').gain", "'big'"):
        Projection("p", "a", "b", gain="big")
    with raises(ValidationError, "Projection('p').plastic", "1"):
        Projection("p", "a", "b", plastic=1)


def test_given_init_shape_mismatch():
    c = Circuit("net")
    c.population("input", 4)
    c.population("hidden", 3)
    c.project("input", "hidden", name="W1", init=Given(np.zeros((4, 3))))
    with raises(ValidationError, "(4, 3)", "(3, 4)", "W.T"):
        compile_plan(c, _proto())
    c2 = Circuit("net")
    c2.population("input", 4)
    c2.population("hidden", 3)
    c2.project("input", "hidden", name="W1", init=np.ones((3, 4)))   # a raw array is Given
    sim = Simulator(compile_plan(c2, _proto()))
    np.testing.assert_array_equal(sim.weights["W1"], np.ones((3, 4)))


def test_given_init_shape_mismatch_names_projection():
    c = Circuit("net")
    c.population("input", 4)
    c.population("hidden", 3)
    c.project("input", "hidden", name="W1", init=Given(np.zeros((4, 3))))
    with raises(ValidationError, "Projection('W1').init"):
        compile_plan(c, _proto())


# ---- compile-time consistency ------------------------------------------------------------------
def _loop_circuit(tau):
    c = Circuit("loop")
    c.population("x", 2)
    c.population("a", 2, tau=tau, transfer="tanh")
    c.population("b", 2, tau=tau, transfer="tanh")
    c.project("x", "a", name="Wxa")
    c.project("a", "b", name="Wab")
    c.project("b", "a", name="Wba")
    return c


def test_cycle_of_instantaneous_populations_rejected_in_steady_mode():
    for tau in (0.0, 0.01):          # steady mode treats every population as instantaneous
        with raises(CompileError, "cycle", "a -> b -> a", "Phase('run')", "tau > 0"):
            compile_plan(_loop_circuit(tau), Protocol((Phase("run", clamp={"x": "x"}),)))


def test_cycle_allowed_with_tau_in_time_mode():
    proto = Protocol((Phase("run", clamp={"x": "x"}, duration=0.02),), mode="time", dt=0.001)
    sim = Simulator(compile_plan(_loop_circuit(0.01), proto, batch=2))
    sim.set_stimulus("x", [1.0, -1.0])
    sim.run(steps=20)
    assert np.all(np.isfinite(sim.rate("a", "run"))) and np.any(sim.rate("b", "run"))
    with raises(CompileError, "cycle"):
        compile_plan(_loop_circuit(0.0), proto)       # tau = 0: still a loop in time mode


def test_held_trace_read_before_its_phase():
    c = _chain()
    c.feedback("error@clean", "input", name="F")      # active in every phase, including clean
    proto = Protocol((Phase("clean", clamp={"input": "x"}), Phase("modulated",
                                                                  clamp={"input": "x"})))
    with raises(ValidationError, "Projection('F').pre", "'error@clean'", "'clean'",
                "phases=('modulated',)"):
        compile_plan(c, proto)
    c2 = _chain()
    c2.feedback("error@nope", "input", name="F")
    with raises(ValidationError, "Projection('F').pre", "'nope'"):
        compile_plan(c2, proto)
    c3 = _chain()
    c3.feedback("error@clean", "input", name="F", phases=("modulated", "later"))
    with raises(ValidationError, "Projection('F').phases", "'later'"):
        compile_plan(c3, proto)


def test_clamp_and_gate_references():
    c = _chain()
    with raises(ValidationError, "Phase('clean').clamp", "'inpt'"):
        compile_plan(c, Protocol((Phase("clean", clamp={"inpt": "x"}),)))
    with raises(ValidationError, "Phase('clean').clamp", "'error'", "error population"):
        compile_plan(c, Protocol((Phase("clean", clamp={"error": "x"}),)))
    with raises(ValidationError, "Phase('clean').gates", "'W9'"):
        compile_plan(c, Protocol((Phase("clean", clamp={"input": "x"}, gates=("W9",)),)))
    c.population("other", 5)
    with raises(ValidationError, "Phase('clean').clamp", "'x'", "sizes"):
        compile_plan(c, Protocol((Phase("clean", clamp={"input": "x", "other": "x"}),)))


@pytest.mark.parametrize("batch", [0, -1, 2.5, True, "8"])
def test_bad_batch(batch):
    with raises(ValidationError, "compile.batch", repr(batch)):
        compile_plan(_chain(), _proto(), batch=batch)


def test_bad_compile_arguments():
    with raises(ValidationError, "compile.optimizer"):
        compile_plan(_chain(), _proto(), rules=[PEPITA()])
    with raises(ValidationError, "compile.circuit", "str"):
        compile_plan("net", _proto())
    with raises(ValidationError, "compile.protocol", "dict"):
        compile_plan(_chain(), {})
    with raises(ValidationError, "Simulator.plan"):
        Simulator(_chain())
    with raises(ValidationError, "Simulator.threads", "0"):
        Simulator(compile_plan(_chain(), _proto()), threads=0)


# ---- rules and optimizer -----------------------------------------------------------------------
def test_bad_sgd_and_rule_fields():
    with raises(ValidationError, "SGD.lr", "0"):
        SGD(lr=0)
    with raises(ValidationError, "SGD.momentum", "1.0"):
        SGD(momentum=1.0)
    with raises(ValidationError, "SGD.style", "'adam'"):
        SGD(style="adam")
    with raises(ValidationError, "SGD.milestones", "(90, 60)"):
        SGD(milestones=(90, 60))
    with raises(ValidationError, "PEPITA.convention", "'icml'", "did you mean 'icml2022'"):
        PEPITA(convention="icml")
    with raises(ValidationError, "PEPITA.presynaptic", "'forward'"):
        PEPITA(presynaptic="forward")
    with raises(ValidationError, "build_pepita_network.sizes", "(20, 5)"):
        build_pepita_network((20, 5))


def test_pepita_references_checked():
    net = build_pepita_network((8, 6, 3), dropout=0.0)
    opt = SGD()
    with raises(ValidationError, "PEPITA.modulated", "'mod'"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(modulated="mod")], optimizer=opt)
    with raises(ValidationError, "PEPITA.error", "'output'"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(error="output")], optimizer=opt)
    with raises(ValidationError, "PEPITA.projections", "'W7'"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(projections=("W7",))],
                     optimizer=opt)
    with raises(ValidationError, "pepita.projections", "'F'", "plastic=False"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(projections=("W1", "F"))],
                     optimizer=opt)
    with raises(CompileError, "PEPITA.feedback", "'G'"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(feedback="G")], optimizer=opt)


def test_convention_sign_mismatch_warns():
    net = build_pepita_network((8, 6, 3), convention="iclr2024")     # F gain -1
    with pytest.warns(NeurosimWarning, match="icml2022.*'F'"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(convention="icml2022")],
                     optimizer=SGD())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD())


# ---- monitors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,fragments", [
    (dict(target="hidden"), ["Monitor('hidden').target", "'hidden'"]),
    (dict(target="hidden.r", every=0), ["Monitor('hidden.r').every", "0"]),
    (dict(target="hidden.r", per="epoch"), ["Monitor('hidden.r').per", "'epoch'"]),
    (dict(target="hidden.r", sample=-1), ["Monitor('hidden.r').sample", "-1"]),
    (dict(target="hidden.r", units=(3, 1)), ["Monitor('hidden.r').units", "(3, 1)"]),
])
def test_bad_monitor_spec(kw, fragments):
    with raises(ValidationError, *fragments):
        Monitor(**kw)


@pytest.mark.parametrize("mon,fragments", [
    (Monitor("hiden.r"), ["Monitor('hiden.r').target", "'hiden'"]),
    (Monitor("hidden.v"), ["Monitor('hidden.v').target", "'v'"]),
    (Monitor("W1.grad"), ["Monitor('W1.grad').target", "'grad'"]),
    (Monitor("F.update_norm"), ["Monitor('F.update_norm').target", "'F'"]),
    (Monitor("error.drive"), ["Monitor('error.drive').target", "'error'"]),
    (Monitor("angle:G"), ["Monitor('angle:G').target", "'G'"]),
    (Monitor("angle:W1"), ["Monitor('angle:W1').target"]),
    (Monitor("hidden.r", phase="late"), ["Monitor('hidden.r').phase", "'late'"]),
    (Monitor("hidden.r", units=(0, 17)), ["Monitor('hidden.r').units", "(0, 17)", "16"]),
    (Monitor("hidden.r", sample=8), ["Monitor('hidden.r').sample", "8"]),
    (Monitor("hidden.r", per="step"), ["Monitor('hidden.r').per", "time-mode"]),
])
def test_bad_monitor_target(mon, fragments):
    net = build_pepita_network((20, 16, 5))
    with raises(ValidationError, *fragments):
        compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(), batch=8,
                     monitors=[mon])


# ---- data given to the simulator ---------------------------------------------------------------
def test_bad_X(pepita_sim):
    X, Y = make_data(16, 20, 5)
    with raises(ValidationError, "Simulator.train.X", "(16,)"):
        pepita_sim.train(X[:, 0], Y)
    with raises(ValidationError, "Simulator.train.X", "19", "20"):
        pepita_sim.train(X[:, :19], Y)
    with raises(ValidationError, "Simulator.predict.X", "21", "20"):
        pepita_sim.predict(np.zeros((3, 21)))
    with raises(ValidationError, "Simulator.evaluate.X"):
        pepita_sim.evaluate(np.zeros((3, 2, 2)), np.zeros(3, int))
    assert pepita_sim.trial == 0
    pepita_sim.train(np.asfortranarray(X, dtype=np.float64), Y)   # float64, F-ordered: OK


@pytest.mark.parametrize("Y,fragments", [
    (np.full(16, 5), ["Simulator.train.Y", "[5, 5]", "[0, 4]"]),
    (np.full(16, -1), ["Simulator.train.Y", "[-1, -1]", "[0, 4]"]),
    (np.zeros(15, int), ["Simulator.train.Y", "(15,)", "(16,)"]),
    (np.zeros((16, 1), int), ["Simulator.train.Y", "(16, 1)", "(16,)"]),
])
def test_bad_labels(pepita_sim, Y, fragments):
    X, _ = make_data(16, 20, 5)
    with raises(ValidationError, *fragments):
        pepita_sim.train(X, Y)
    assert pepita_sim.trial == 0


def test_non_integer_labels_rejected(pepita_sim):
    X, Y = make_data(16, 20, 5)
    with raises(ValidationError, "Simulator.train.Y"):
        pepita_sim.train(X, Y + 0.7)


def test_bad_order_shape(pepita_sim):
    X, Y = make_data(16, 20, 5)
    with raises(ValidationError, "Simulator.train.order"):
        pepita_sim.train(X, Y, order=np.zeros((2, 2), int))


def test_out_of_range_order_rejected():
    """Run in a subprocess: today this crashes the Python process."""
    code = textwrap.dedent("""
        import numpy as np
        from neurosim import SGD, Simulator, ValidationError, compile_plan
        from neurosim.models import build_pepita_network
        net = build_pepita_network((20, 16, 5), dropout=0.0)
        sim = Simulator(compile_plan(net.circuit, net.protocol, rules=[net.rule],
                                     optimizer=SGD(), batch=8, seed=1))
        X = np.zeros((20, 20), np.float32); Y = np.zeros(20, np.int64)
        try:
            sim.train(X, Y, order=np.array([0, 1, 10**6]))
        except ValidationError as e:
            assert "Simulator.train.order" in str(e), str(e)
            print("REJECTED")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "REJECTED" in proc.stdout, (proc.returncode, proc.stderr)




def test_nan_input_reported_at_input_in_training(pepita_sim):
    X, Y = make_data(16, 20, 5)
    X[3, 4] = np.nan
    with pytest.raises(SimulationError) as ei:
        pepita_sim.train(X, Y)
    assert ei.value.population == "input" and ei.value.phase == "clean"


def test_nan_input_reported_in_predict(pepita_sim):
    X, _ = make_data(16, 20, 5)
    X[3, 4] = np.nan
    with pytest.raises(SimulationError):
        pepita_sim.predict(X)


def test_runaway_weights_reported():
    net = build_pepita_network((20, 16, 5), dropout=0.0)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=0.1, max_weight=0.01), batch=8)
    sim = Simulator(plan)
    X, Y = make_data(16, 20, 5)
    with pytest.raises(SimulationError) as ei:
        sim.train(X, Y)
    assert ei.value.projection in ("W1", "W2") and "trial 0" in str(ei.value)
    assert "max_weight" in str(ei.value)


# ---- simulator API misuse ----------------------------------------------------------------------
def test_simulator_api_errors(pepita_sim):
    s = pepita_sim
    with raises(ValidationError, "Simulator.set_weights", "'W3'", "W1"):
        s.set_weights("W3", np.zeros((16, 20)))
    with raises(ValidationError, "Simulator.set_weights('W1')", "(20, 16)", "(16, 20)", "W.T"):
        s.set_weights("W1", np.zeros((20, 16)))
    with raises(ValidationError, "Simulator.set_stimulus", "'y'"):
        s.set_stimulus("y", np.zeros(20))
    with raises(ValidationError, "Simulator.set_stimulus('x')", "(19,)"):
        s.set_stimulus("x", np.zeros(19))
    with raises(ValidationError, "Simulator.rate", "hidden@late"):
        s.rate("hidden", "late")
    with raises(ValidationError, "Simulator.run", "time-mode"):
        s.run(steps=10)
    with pytest.raises(ValueError, match="read-only"):
        s.weights["W1"][0, 0] = 1.0                     # weights are read-only views


def test_free_run_argument_errors():
    net = build_pepita_network((6, 5, 3), mode="time", tau=0.01, dt=0.001, phase_duration=0.005)
    sim = Simulator(compile_plan(net.circuit, net.protocol, batch=2))
    with raises(ValidationError, "Simulator.run.phase", "'late'"):
        sim.run(steps=3, phase="late")
    with raises(ValidationError, "Simulator.run", "exactly one"):
        sim.run()
    with raises(ValidationError, "Simulator.run", "exactly one"):
        sim.run("3 ms", steps=3)
    with raises(ValidationError, "Simulator.run.steps", "-1"):
        sim.run(steps=-1)
    with raises(ValidationError, "Simulator.run.steps", "2.5"):
        sim.run(steps=2.5)
    with raises(ValidationError, "Simulator.run.duration", "'3 mV'"):
        sim.run("3 mV")
    assert sim.step == 0


def test_population_normalize():
    """``Population(normalize="rms")``: validated; refused by rules that need f' (BP) and by the
    Brian2 export, each naming the population."""
    from neurosim import Circuit, CompileError, Population, Protocol, Phase, compile_plan
    from neurosim.interop import export_brian2
    from neurosim.interop.brian2_export import ExportError
    from neurosim.kernels import ops as K
    from neurosim.plasticity import BP

    assert Population("h", 4, transfer="relu", normalize="rms").code == K.RELU + K.RMS_NORM
    assert Population("h", 4, transfer="relu").code == K.RELU
    with pytest.raises(ValidationError, match=r"Population\('h'\)\.normalize.*'rms'"):
        Population("h", 4, normalize="l2")
    with pytest.raises(ValidationError, match=r"Population\('o'\)\.transfer.*softmax"):
        Population("o", 4, transfer="softmax", normalize="rms")
    c = Circuit("n")
    c.population("x", 5)
    c.population("h", 4, transfer="relu", normalize="rms", tau=0.01)
    c.population("o", 3, transfer="softmax")
    c.error("error", "o")
    c.project("x", "h", name="W1")
    c.project("h", "o", name="W2")
    proto = Protocol([Phase("clean", clamp={"x": "x"})], mode="steady")
    with pytest.raises(CompileError, match="'h'.*not element-wise"):
        compile_plan(c, proto, rules=[BP()], optimizer=SGD(lr=0.1), batch=2)
    tproto = Protocol([Phase("clean", clamp={"x": "x"}, duration=0.05)], mode="time", dt=0.005)
    c2 = Circuit("n2")
    c2.population("x", 5)
    c2.population("h", 4, transfer="relu", normalize="rms", tau=0.01)
    c2.project("x", "h", name="W1")
    with pytest.raises(ExportError, match=r"Population\('h'\)\.normalize"):
        export_brian2(c2, tproto)
