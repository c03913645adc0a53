"""Units: every time or rate parameter takes a float in SI units, a brian2 quantity or a unit
string, and a wrong dimension is a ValidationError naming the parameter.

brian2 itself is only needed for the quantity cases (skipped without it); the last tests check
that neurosim never imports brian2 unless a brian2 object is handed to it.
"""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from neurosim import Circuit, Phase, Population, Protocol, Simulator, ValidationError, compile_plan
from neurosim.units import to_hertz, to_seconds


# -- to_seconds / to_hertz ----------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [
    (0.01, 0.01), (1, 1.0), (0, 0.0), (np.float32(0.25), 0.25), (np.float64(2e-4), 2e-4),
    (np.int64(3), 3.0), (np.array(0.5), 0.5),
    ("10 ms", 0.01), ("0.1ms", 1e-4), ("2 s", 2.0), ("100 us", 1e-4), ("1e-3 s", 1e-3),
    ("10*ms", 0.01), ("10 * ms", 0.01), ("  5 msecond ", 5e-3), ("3 usecond", 3e-6),
    ("2 ns", 2e-9), ("1 min", 60.0), ("0.5", 0.5), (".5 s", 0.5), ("+4ms", 4e-3),
    ("10. ms", 0.01), ("100. us", 1e-4), ("7 µs", 7e-6), ("7 μs", 7e-6),
])
def test_to_seconds_accepts_floats_and_unit_strings(value, seconds):
    assert to_seconds(value, "X.t") == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize("value, hertz", [
    (5, 5.0), (2.5, 2.5), ("5 Hz", 5.0), ("5Hz", 5.0), ("2 kHz", 2e3), ("3 MHz", 3e6),
    ("4 mHz", 4e-3), ("1 hertz", 1.0), ("0.5 khz", 500.0), ("12", 12.0),
])
def test_to_hertz_accepts_floats_and_unit_strings(value, hertz):
    assert to_hertz(value, "X.rate") == pytest.approx(hertz, rel=1e-12)


def test_unit_symbols_are_case_sensitive():
    # millihertz and megahertz differ by 1e9; 'Ms' is not milliseconds
    assert to_hertz("1 mHz", "r") == pytest.approx(1e-3)
    assert to_hertz("1 MHz", "r") == pytest.approx(1e6)
    with pytest.raises(ValidationError, match=r"X\.t.*unknown or wrong-dimension unit 'Ms'"):
        to_seconds("10 Ms", "X.t")
    with pytest.raises(ValidationError, match="'MS'"):
        to_seconds("10 MS", "X.t")


@pytest.mark.parametrize("value, match", [
    ("10 mV", "unknown or wrong-dimension unit 'mV'"),
    ("10 Hz", "unknown or wrong-dimension unit 'Hz'"),
    ("ten ms", "could not read"),
    ("10 ms 5", "could not read"),
    ("", "could not read"),
    (-0.01, "expected a time >= 0"),
    ("-3 ms", "expected a time >= 0"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    ("nan", "finite"),
    (10 ** 400, "finite"),
    (True, "boolean"),
    (np.True_, "boolean"),
    (None, "expected a time"),
    ([0.01], "expected a time"),
    (np.array([0.01, 0.02]), "expected a time"),
    (np.array([0.01]), "expected a time"),
    ({"ms": 10}, "expected a time"),
])
def test_to_seconds_rejects_bad_values_naming_the_parameter(value, match):
    with pytest.raises(ValidationError, match=match) as e:
        to_seconds(value, "Population('h').tau")
    assert e.value.where == "Population('h').tau"
    assert str(e.value).startswith("Population('h').tau: ")


def test_zero_time_where_not_allowed():
    assert to_seconds(0, "t") == 0.0
    with pytest.raises(ValidationError, match="expected a time > 0"):
        to_seconds(0, "Protocol.dt", allow_zero=False)
    with pytest.raises(ValidationError, match="Protocol.dt"):
        Protocol((Phase("a", duration=0.1),), mode="time", dt="0 ms")


@pytest.mark.parametrize("value, match", [
    ("10 ms", "unknown or wrong-dimension unit 'ms'"), (-5, "expected a rate >= 0"),
    ("5 Hz Hz", "could not read"), (False, "boolean"),
])
def test_to_hertz_rejects_bad_values(value, match):
    with pytest.raises(ValidationError, match=match) as e:
        to_hertz(value, "Input.rate")
    assert e.value.where == "Input.rate"


# -- brian2 quantities ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def u():
    """brian2's units module (skips without brian2)."""
    return pytest.importorskip("brian2.units")


def test_brian2_time_quantities(u):
    assert to_seconds(10 * u.ms, "t") == pytest.approx(0.01, rel=1e-15)
    assert to_seconds(0.1 * u.ms, "t") == pytest.approx(1e-4, rel=1e-15)
    assert to_seconds(2 * u.second, "t") == 2.0
    assert to_seconds(u.ms, "t") == pytest.approx(1e-3)            # a bare unit is a quantity
    assert to_seconds(250 * u.usecond, "t") == pytest.approx(2.5e-4)
    assert to_seconds(np.array(3.0) * u.ms, "t") == pytest.approx(3e-3)   # 0-d array quantity
    assert isinstance(to_seconds(10 * u.ms, "t"), float)


def test_brian2_rate_quantities(u):
    assert to_hertz(5 * u.Hz, "r") == pytest.approx(5.0)
    assert to_hertz(2 * u.kHz, "r") == pytest.approx(2000.0)
    assert to_hertz(1 / (10 * u.ms), "r") == pytest.approx(100.0)


def test_brian2_string_forms_round_trip(u):
    """str() of a brian2 quantity (what users paste into TOML) reads back."""
    for q in (10 * u.ms, 0.1 * u.ms, 2 * u.second, 37 * u.usecond):
        assert to_seconds(str(q), "t") == pytest.approx(float(q / u.second), rel=1e-12)
    assert to_hertz(str(5 * u.Hz), "r") == pytest.approx(5.0)


@pytest.mark.parametrize("make, kind", [
    (lambda u: 10 * u.mV, "time"), (lambda u: 5 * u.Hz, "time"), (lambda u: 3 * u.metre, "time"),
    (lambda u: 10 * u.ms, "rate"), (lambda u: 1 * u.nA, "rate"),
])
def test_brian2_wrong_dimension_names_the_parameter(u, make, kind):
    q = make(u)
    fn, where = (to_seconds, "Phase('clean').duration") if kind == "time" else (to_hertz, "In.rate")
    with pytest.raises(ValidationError, match=rf"expected a {kind} \(dimension of") as e:
        fn(q, where)
    assert e.value.where == where


def test_brian2_dimensionless_and_array_quantities_rejected(u):
    from brian2 import Quantity

    with pytest.raises(ValidationError, match="expected a time"):
        to_seconds(Quantity(0.5), "Protocol.dt")
    with pytest.raises(ValidationError, match="not an array"):
        to_seconds([1, 2] * u.ms, "Protocol.dt")
    with pytest.raises(ValidationError, match="expected a time >= 0"):
        to_seconds(-2 * u.ms, "Protocol.dt")


# -- every time parameter of the engine goes through the converter -------------------------------
def _tiny(tau, dt, duration):
    c = Circuit("tiny")
    c.population("x", 3)
    c.population("h", 2, tau=tau, transfer="relu")
    c.project("x", "h", name="W")
    p = Protocol((Phase("a", clamp={"x": "x"}, duration=duration),), mode="time", dt=dt)
    return c, p


@pytest.mark.parametrize("tau, dt, duration", [
    (0.01, 1e-3, 0.02), ("10 ms", "1 ms", "20 ms"), ("10ms", "1000 us", "0.02 s"),
])
def test_population_protocol_phase_accept_units(tau, dt, duration):
    c, p = _tiny(tau, dt, duration)
    assert c.populations["h"].tau == pytest.approx(0.01)
    assert p.dt == pytest.approx(1e-3)
    assert p.phases[0].duration == pytest.approx(0.02)
    assert p.n_steps(p.phases[0]) == 20


def test_population_protocol_phase_accept_brian2_quantities(u):
    c, p = _tiny(10 * u.ms, 1 * u.ms, 20 * u.ms)
    assert c.populations["h"].tau == pytest.approx(0.01)
    assert p.dt == pytest.approx(1e-3) and p.phases[0].duration == pytest.approx(0.02)
    assert isinstance(c.populations["h"].tau, float) and isinstance(p.dt, float)


def test_wrong_dimension_errors_name_each_parameter(u):
    with pytest.raises(ValidationError, match=r"^Population\('h'\)\.tau: .*dimension"):
        Population("h", 3, tau=10 * u.mV)
    with pytest.raises(ValidationError, match=r"^Phase\('a'\)\.duration: .*dimension"):
        Phase("a", duration=5 * u.Hz)
    with pytest.raises(ValidationError, match=r"^Protocol\.dt: .*dimension"):
        Protocol((Phase("a", duration=0.1),), mode="time", dt=1 * u.metre)
    with pytest.raises(ValidationError, match=r"^Population\('h'\)\.tau: unknown or wrong-dimension"):
        Population("h", 3, tau="10 mV")


def test_time_mode_checks_run_on_converted_values():
    with pytest.raises(ValidationError, match="shorter than dt"):
        Protocol((Phase("a", duration="0.5 ms"),), mode="time", dt="1 ms")
    # dt > tau is caught at compile time, whatever units were used
    c, p = _tiny("0.5 ms", "1 ms", "10 ms")
    with pytest.raises(ValidationError, match="exceeds tau"):
        compile_plan(c, p)


def test_simulator_run_duration_accepts_units(u):
    c, p = _tiny("10 ms", "1 ms", "20 ms")
    runs = {}
    for label, dur in (("float", 0.03), ("string", "30 ms"), ("quantity", 30 * u.ms),
                       ("steps", None)):
        sim = Simulator(compile_plan(c, p, seed=1))
        sim.set_stimulus("x", [1.0, 0.5, -0.25])
        if dur is None:
            sim.run(steps=30)
        else:
            sim.run(dur)
        assert sim.step == 30
        runs[label] = sim.rate("h")
    for label in ("string", "quantity", "steps"):
        np.testing.assert_array_equal(runs[label], runs["float"])


def test_simulator_run_rejects_wrong_dimension(u):
    c, p = _tiny("10 ms", "1 ms", "20 ms")
    sim = Simulator(compile_plan(c, p))
    with pytest.raises(ValidationError, match=r"^Simulator\.run\.duration: .*dimension"):
        sim.run(10 * u.mV)
    with pytest.raises(ValidationError, match=r"^Simulator\.run\.duration: unknown"):
        sim.run("10 Hz")
    with pytest.raises(ValidationError, match=r"^Simulator\.run\.duration: .*>= 0"):
        sim.run(-0.01)


def test_pepita_builder_accepts_units(u):
    from neurosim.models import build_pepita_network

    a = build_pepita_network((6, 5, 3), mode="time", tau=10 * u.ms, dt="1 ms",
                             phase_duration=0.05)
    b = build_pepita_network((6, 5, 3), mode="time", tau=0.01, dt=0.001, phase_duration="50 ms")
    assert a.circuit.populations["hidden"].tau == pytest.approx(b.circuit.populations["hidden"].tau)
    assert a.protocol.dt == pytest.approx(b.protocol.dt)
    assert [ph.duration for ph in a.protocol.phases] == pytest.approx(
        [ph.duration for ph in b.protocol.phases])


# -- scenario files ------------------------------------------------------------------------------
SCENARIO = """
name = "units"
[model]
name = "pepita"
sizes = [6, 5, 3]
[simulation]
mode = "time"
tau = {tau}
dt = {dt}
phase_duration = {dur}
"""


def _load(tmp_path, overrides=(), **kw):
    from neurosim import scenario as sc

    vals = dict(tau='"10 ms"', dt='"0.1 ms"', dur='"20 ms"')
    vals.update(kw)
    f = tmp_path / "s.toml"
    f.write_text(SCENARIO.format(**vals))
    return sc.load(f, overrides)


def test_scenario_unit_strings(tmp_path):
    s = _load(tmp_path)["simulation"]
    assert s["tau"] == pytest.approx(0.01)
    assert s["dt"] == pytest.approx(1e-4)
    assert s["phase_duration"] == pytest.approx(0.02)
    s = _load(tmp_path, tau="0.01", dt='"100 us"', dur='"0.02 s"')["simulation"]
    assert (s["tau"], s["dt"], s["phase_duration"]) == pytest.approx((0.01, 1e-4, 0.02))


def test_scenario_unit_strings_reach_the_circuit(tmp_path):
    from neurosim import scenario as sc

    settings = _load(tmp_path)
    circuit, protocol, _, _ = sc.build(settings)
    assert circuit.populations["hidden"].tau == pytest.approx(0.01)
    assert protocol.dt == pytest.approx(1e-4)
    assert protocol.n_steps(protocol.phases[0]) == 200


def test_scenario_overrides_with_units(tmp_path):
    s = _load(tmp_path, overrides=['simulation.dt="0.5 ms"', "simulation.tau=20ms"])["simulation"]
    assert s["dt"] == pytest.approx(5e-4)
    assert s["tau"] == pytest.approx(0.02)


@pytest.mark.parametrize("key, value, match", [
    ("dt", '"10 mV"', r"^simulation\.dt: unknown or wrong-dimension unit 'mV'"),
    ("tau", '"5 Hz"', r"^simulation\.tau: unknown or wrong-dimension unit 'Hz'"),
    ("dur", '"fast"', r"^simulation\.phase_duration: could not read"),
    ("dt", '"0 ms"', r"^simulation\.dt: .*expected a time > 0"),
    ("dt", "true", r"^simulation\.dt: .*boolean"),
])
def test_scenario_bad_units_name_the_key(tmp_path, key, value, match):
    with pytest.raises(ValidationError, match=match):
        _load(tmp_path, **{key: value})


# -- brian2 is loaded lazily -------------------------------------------------------------------------
_LAZY = textwrap.dedent("""
    import sys
    {block}
    import numpy as np
    import neurosim
    from neurosim import Circuit, Phase, Protocol, Simulator, compile_plan, scenario
    from neurosim.models import build_pepita_network
    import neurosim.interop, neurosim.interop.crosscheck, neurosim.cli
    neurosim.cli._parser(neurosim.cli._extra_modules())
    assert "brian2" not in sys.modules, "import"
    c = Circuit("c")
    c.population("x", 3)
    c.population("h", 2, tau="10 ms", transfer="relu")
    c.project("x", "h", name="W")
    p = Protocol((Phase("a", clamp={{"x": "x"}}, duration="20 ms"),), mode="time", dt=1e-3)
    sim = Simulator(compile_plan(c, p))
    sim.set_stimulus("x", [1.0, 2.0, 3.0])
    sim.run("5 ms")
    net = build_pepita_network((6, 5, 3), mode="time", tau="10 ms", dt="1 ms",
                               phase_duration="5 ms", dropout=0.0)
    sim = Simulator(compile_plan(net.circuit, net.protocol, rules=[net.rule],
                                 optimizer=neurosim.SGD(lr=0.01), seed=0))
    sim.train(np.random.default_rng(0).random((4, 6), dtype=np.float32), np.array([0, 1, 2, 0]))
    settings = scenario.load("scenarios/crosscheck_small.toml")
    scenario.build(settings)
    assert "brian2" not in sys.modules, "run"
    {tail}
    print("OK")
""")

_BLOCK = """
class _NoBrian2:
    def find_spec(self, name, path=None, target=None):
        if name == "brian2" or name.startswith("brian2."):
            raise ImportError("brian2 blocked for this test")
sys.meta_path.insert(0, _NoBrian2())
"""

_TAIL_BLOCKED = """
from neurosim.interop import export_brian2, ExportError
try:
    export_brian2(c, p)
except ExportError as e:
    assert "brian2 is not installed" in str(e), e
else:
    raise AssertionError("export without brian2 should fail")
"""


def _run_script(code):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, timeout=300)


def test_neurosim_does_not_import_brian2():
    r = _run_script(_LAZY.format(block="", tail=""))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_neurosim_works_without_brian2():
    """A brian2-free install: importing, building, compiling and running all work; only the
    export says brian2 is missing."""
    r = _run_script(_LAZY.format(block=_BLOCK, tail=_TAIL_BLOCKED))
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-3000:]


def test_unit_conversion_of_floats_never_imports_brian2():
    r = _run_script("import sys\nfrom neurosim.units import to_seconds, to_hertz\n"
                    "to_seconds('10 ms', 'a'); to_seconds(0.1, 'b'); to_hertz('5 Hz', 'c')\n"
                    "assert 'brian2' not in sys.modules\nprint('OK')")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_seconds_are_exact_enough_for_step_counts():
    """'0.1 ms' -> 1e-4 up to rounding; n_steps rounds, so 20 ms / 0.1 ms is 200 steps."""
    p = Protocol((Phase("a", duration="20 ms"),), mode="time", dt="0.1 ms")
    assert p.n_steps(p.phases[0]) == 200
    assert math.isclose(p.dt, 1e-4, rel_tol=1e-12)
