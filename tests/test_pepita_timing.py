"""PEPITA with continuous plasticity (updates accumulated at every step of the modulated phase)."""

import numpy as np
import pytest

from neurosim import PEPITA, SGD, Simulator, ValidationError, compile_plan
from neurosim.models import build_pepita_network


def _update(duration, timing):
    rng = np.random.default_rng(0)
    X = rng.random((16, 30), dtype=np.float32)
    Y = rng.integers(0, 5, 16)
    if duration is None:
        net = build_pepita_network((30, 20, 5), dropout=0.0)
        rule = net.rule
    else:
        net = build_pepita_network((30, 20, 5), dropout=0.0, mode="time", tau=0.01, dt=0.001,
                                   phase_duration=duration)
        rule = PEPITA(feedback="F", timing=timing)
    plan = compile_plan(net.circuit, net.protocol, rules=[rule],
                        optimizer=SGD(lr=0.5, momentum=0.0), batch=16, seed=0)
    sim = Simulator(plan)
    w0 = sim.weights["W1"].copy()
    sim.train(X, Y)
    return sim.weights["W1"] - w0


def test_continuous_update_tends_to_the_phase_end_update():
    # The time-averaged update differs from the steady one by the transient of h~(t), whose
    # integral is O(tau): the relative deviation must fall roughly like tau / T once the clean
    # phase has settled (T >= 10 tau). Doubling T should about halve it (ratio in [1.6, 2.4]
    # allows for the O(exp(-T/tau)) remainder and float32 noise).
    ref = _update(None, "end")
    devs = [np.linalg.norm(_update(T, "continuous") - ref) / np.linalg.norm(ref)
            for T in (0.1, 0.2, 0.4)]
    assert devs[0] > devs[1] > devs[2]
    assert 1.6 < devs[0] / devs[1] < 2.4 and 1.6 < devs[1] / devs[2] < 2.4
    assert devs[2] < 0.05


def test_continuous_needs_time_mode():
    net = build_pepita_network((30, 20, 5), dropout=0.0)
    with pytest.raises(ValidationError, match="PEPITA.timing"):
        compile_plan(net.circuit, net.protocol, rules=[PEPITA(feedback="F", timing="continuous")],
                     optimizer=SGD(lr=0.1), batch=4)


def test_bad_timing_value():
    with pytest.raises(ValidationError, match="PEPITA.timing"):
        PEPITA(timing="sometimes")
