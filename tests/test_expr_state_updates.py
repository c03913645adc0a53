"""The expression features weight mirroring added (neurosim.expr, PlanBuilder): in-place
accumulation into rule state (``pb.accumulate``), a product over the minibatch divided by the
run-time minibatch size (``(a.T @ b).batch_mean()``, exact for a short last minibatch), and this
trial's random draws (``pb.noise``), each against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from neurosim import (SGD, Circuit, CompileError, Phase, PlasticityRule, Population, Projection,
                      Protocol, Simulator, compile_plan, register_builder)
from neurosim.init import Given
from neurosim.kernels.rng import normal01_reference, uniform01_reference
from neurosim.rng import component_key


def _linear(d_in, d_out, W0):
    c = Circuit("lin")
    c.add(Population("x", d_in))
    c.add(Population("y", d_out, transfer="identity"))
    c.add(Projection("W", "x", "y", init=Given(W0), plastic=False))
    return c, Protocol((Phase("stim", clamp={"x": "x"}),))


class _Rule(PlasticityRule):
    name = "probe"

    def modifies(self, pb):
        return []

    def reads(self, pb):
        return []


def test_accumulate_batch_mean_into_state():
    """S += 0.5 mean_b x_b^T y_b + C per trial: 12 samples at batch 8 are a full minibatch and a
    short one of 4, which batch_mean divides by 4. Float32 products of <= 8 terms: 1e-6."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 5)).astype(np.float32)
    W0 = rng.normal(size=(3, 5)).astype(np.float32)
    C = rng.normal(size=(5, 3)).astype(np.float32)
    c, proto = _linear(5, 3, W0)

    class Acc(_Rule):
        pass

    @register_builder(Acc)
    def build(pb, rule):
        with pb.at("trial_end"):
            S = pb.state("probe.S", 5, 3)
            x, y = pb.r("x", "stim"), pb.r("y", "stim")
            pb.accumulate(S, 0.5 * (x.T @ y).batch_mean() + pb.state("probe.C", 5, 3, init=C))

    plan = compile_plan(c, proto, rules=[Acc()], optimizer=SGD(), batch=8, seed=0)
    sim = Simulator(plan)
    sim.train(X)
    Xd, Wd = X.astype(np.float64), W0.astype(np.float64)
    want = sum(0.5 * Xd[s].T @ (Xd[s] @ Wd.T) / len(Xd[s]) + C for s in (slice(0, 8),
                                                                         slice(8, 12)))
    np.testing.assert_allclose(sim.buffer("probe.S"), want, rtol=1e-6, atol=1e-6)


def test_batch_mean_needs_a_product_over_the_batch():
    c, proto = _linear(4, 3, np.zeros((3, 4), np.float32))

    class Bad(_Rule):
        pass

    @register_builder(Bad)
    def build(pb, rule):
        with pb.at("trial_end"):
            pb.assign(pb.state("probe.T", 3, 4), (pb.W("W") @ pb.state("probe.I", 4, 4))
                      .batch_mean())

    with pytest.raises(CompileError, match="batch_mean"):
        compile_plan(c, proto, rules=[Bad()], optimizer=SGD(), batch=2)


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_noise_draws_the_documented_stream(dist):
    """pb.noise: counter trial*batch*cols + row*cols + unit of the stream's key; gaussian =
    scale * Box-Muller normal, rademacher = +-scale for u < 1/2 / u >= 1/2, bit for bit."""
    c, proto = _linear(4, 3, np.zeros((3, 4), np.float32))

    class Noisy(_Rule):
        pass

    @register_builder(Noisy)
    def build(pb, rule):
        with pb.at("trial_start"):
            pb.noise("probe:xi", 6, dist, 0.3)

    plan = compile_plan(c, proto, rules=[Noisy()], optimizer=SGD(), batch=4, seed=7)
    sim = Simulator(plan)
    X = np.zeros((10, 4), np.float32)      # trials 0, 1 (full) and 2 (short: 2 rows)
    sim.train(X)
    key = int(component_key(7, "probe:xi"))
    counters = (np.uint64(2 * 4) + np.arange(2, dtype=np.uint64)[:, None]) * np.uint64(6) + \
        np.arange(6, dtype=np.uint64)[None, :]
    if dist == "gaussian":
        want = np.float32(0.3) * normal01_reference(key, counters)
    else:
        want = np.where(uniform01_reference(key, counters) < np.float32(0.5), np.float32(0.3),
                        np.float32(-0.3))
    np.testing.assert_array_equal(sim.view("noise.probe:xi", 2), want.astype(np.float32))
    with pytest.raises(CompileError, match="dist"):
        @register_builder(Noisy)
        def bad(pb, rule):
            with pb.at("trial_start"):
                pb.noise("probe:xi", 6, "uniform")
        compile_plan(c, proto, rules=[Noisy()], optimizer=SGD(), batch=4)
