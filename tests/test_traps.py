"""The traps of issue 12, item 5: initialiser parameters in numpy's order and keyword-only where
a positional call would be ambiguous, and a warning for a bare number of seconds >= 1 s given as
a time constant, duration or time step."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from _tinyrun import write_tiny_scenario
from neurosim import (BareTimeWarning, FanInUniform, Normal, Phase, Population, Protocol,
                      ValidationError)
from neurosim import scenario as sc
from neurosim.init import as_init


# -- initialisers ---------------------------------------------------------------------------------
def test_normal_is_keyword_only_in_numpys_order():
    init = Normal(mean=2.0, std=0.0)
    assert (init.mean, init.std) == (2.0, 0.0)
    assert np.all(init.sample((3, 4), np.random.default_rng(0)) == 2.0)
    assert repr(Normal(std=0.3)) == "Normal(mean=0.0, std=0.3)"     # numpy's order
    with pytest.raises(ValidationError, match=r"Normal: got the positional arguments \(0.0, 0.3\)"
                                              r".*keyword-only.*Normal\(std=0.0\)"):
        Normal(0.0, 0.3)
    with pytest.raises(ValidationError, match="Normal.std"):
        Normal(std=-1.0)
    assert as_init("normal", "x") == Normal()


def test_normal_samples_have_the_requested_moments():
    a = Normal(mean=-1.0, std=0.5).sample((400, 500), np.random.default_rng(1)).astype(np.float64)
    # 2e5 draws: the standard errors are 0.5/sqrt(2e5) ~ 1.1e-3 (mean) and ~ 0.8e-3 (std)
    assert abs(a.mean() + 1.0) < 6e-3 and abs(a.std() - 0.5) < 6e-3


def test_fan_in_uniform_fan_is_keyword_only():
    assert FanInUniform(0.05, fan=784).fan == 784
    with pytest.raises(TypeError):
        FanInUniform(0.05, 784)


# -- bare numbers of seconds ----------------------------------------------------------------------
def test_bare_tau_of_a_second_or_more_warns():
    with pytest.warns(BareTimeWarning, match=r"Population\('E'\)\.tau: the bare number 10 is read "
                                             r"as 10 s.*'10 ms'"):
        Population("E", 4, tau=10)
    with pytest.warns(BareTimeWarning, match=r"Phase\('a'\)\.duration.*1\.5"):
        Phase("a", duration=1.5)
    with pytest.warns(BareTimeWarning, match=r"Protocol\.dt"):
        Protocol((Phase("a", duration="2 s"),), mode="time", dt=1)
    with pytest.warns(BareTimeWarning):
        Population("E", 4, tau="3")                        # a number in a string has no unit


@pytest.mark.parametrize("tau", [0.02, 0.0, 0.999, "10 ms", "2 s", "1 min"])
def test_small_or_explicit_times_do_not_warn(tau):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Population("E", 4, tau=tau)
        Phase("a", duration=tau if tau not in (0.0,) else 0.1)


def test_scenario_warns_once_under_its_key_and_keeps_quiet_with_a_unit(tmp_path):
    base = write_tiny_scenario(tmp_path, epochs=1)
    with pytest.warns(BareTimeWarning) as rec:
        settings = sc.load(base, ["simulation.mode=\"time\"", "simulation.tau=2",
                                  "simulation.phase_duration=\"20 s\"", "simulation.dt=\"5 ms\""])
        sc.build(settings)                                 # the builder does not warn again
    assert [str(w.message).split(":")[0] for w in rec] == ["simulation.tau"]
    # the resolved scenario.toml writes such times with their unit, so reading it back is quiet
    text = sc.to_toml(settings)
    assert 'tau = "2.0 s"' in text and 'phase_duration = "20.0 s"' in text
    again = tmp_path / "again.toml"
    again.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sc.load(again)["simulation"]["tau"] == 2.0
