"""What the contrastive / Forward-Forward port onto array expressions added: the lowering
patterns one op computes (AFFINE, SUB, COL_MEAN), the PlanBuilder's label and data helpers and
their errors, and the Goodness monitor with ``every`` > 1."""

from __future__ import annotations

import numpy as np
import pytest

from neurosim import (SGD, Circuit, CompileError, Phase, PlasticityRule, Population, Projection,
                      Protocol, Simulator, compile_plan, register_builder)
from neurosim.init import Given
from neurosim.models.forward_forward import build_ff_network, ff_optimizer
from neurosim.optable import OPS
from neurosim.plasticity import Goodness


def _linear(W0):
    c = Circuit("lin")
    c.add(Population("x", W0.shape[1]))
    c.add(Population("y", W0.shape[0], transfer="identity"))
    c.add(Projection("W", "x", "y", init=Given(W0)))
    return c, Protocol((Phase("stim", clamp={"x": "x"}),))


class _Probe(PlasticityRule):
    """A rule that changes no weight: it only writes expressions into rule state."""

    name = "probe"

    def modifies(self, pb):
        return []

    def reads(self, pb):
        return []


def _compile_probe(body, W0, batch):
    @register_builder(_Probe)
    def build(pb, rule):
        with pb.at("trial_end"):
            body(pb)

    c, proto = _linear(W0)
    return compile_plan(c, proto, rules=[_Probe()], optimizer=SGD(lr=0.1), batch=batch, seed=0)


def _rule_ops(plan):
    """Op names of the training program's trial_end section (where the probe writes)."""
    names = {s.code: s.name for s in OPS.values()}
    return [names[int(row[0])] for row, (sec, _) in zip(plan.train.prog, plan.train.where)
            if sec == "trial_end"]


def test_one_op_patterns_compute_what_the_expressions_say():
    """``s x + c`` lowers to AFFINE, ``a - b`` of two leaves to one SUB, ``d m + (1 - d)
    x.mean(0)`` to the running mean COL_MEAN; each equals its numpy meaning to float32 rounding
    (a few operations on values of order 1: rtol 1e-6)."""
    rng = np.random.default_rng(0)
    W0 = rng.normal(size=(3, 4)).astype(np.float32)
    C0 = rng.normal(size=(3, 4)).astype(np.float32)
    X = rng.normal(size=(5, 4)).astype(np.float32)

    def body(pb):
        y = pb.r("y", "stim")
        pb.assign(pb.state("t.affine", 1, 3), 2.0 * y.mean(0) - 0.5)
        pb.assign(pb.state("t.sub", 3, 4), pb.W("W") - pb.state("t.c", 3, 4, init=C0))
        m = pb.state("t.m", 1, 3, init=np.full((1, 3), 0.5))
        pb.assign(m, 0.9 * m + 0.1 * y.mean(0))

    plan = _compile_probe(body, W0, batch=5)
    ops = _rule_ops(plan)
    # the reductions' temporaries (COL_SUM) and the three ops, nothing else (no COPY, no AXPY)
    assert sorted(ops) == ["AFFINE", "COL_MEAN", "COL_SUM", "SUB"]
    sim = Simulator(plan)
    sim.train(X)
    ym = (X.astype(np.float64) @ W0.T).mean(0, keepdims=True)
    np.testing.assert_allclose(sim.buffer("t.affine"), 2.0 * ym - 0.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(sim.buffer("t.sub"), W0 - C0)
    np.testing.assert_allclose(sim.buffer("t.m"), 0.9 * 0.5 + 0.1 * ym, rtol=1e-6, atol=1e-6)


def test_label_helpers_check_their_operands():
    W0 = np.zeros((3, 4), np.float32)
    cases = {
        "cannot hold 5 label columns": lambda pb: pb.embed_label(pb.stim("x"), 5, on=1.0),
        "must be a \\(batch, 1\\)": lambda pb: pb.embed_label(pb.stim("x"), 2, on=1.0,
                                                             labels=pb.r("y", "stim")),
        "must be a \\(batch, 4\\)": lambda pb: pb.wrong_labels("w", 4, "s",
                                                          probs=pb.r("y", "stim")),
        "has no dropout": lambda pb: pb.mask("y"),
        "expected a buffer handle": lambda pb: pb.count_correct("y"),
    }
    for msg, body in cases.items():
        with pytest.raises(CompileError, match=msg):
            _compile_probe(body, W0, batch=2)


def test_goodness_monitor_every_n_subsamples_the_every_1_record():
    """A Goodness monitor with every = 3 records trials 0, 3, 6, ... with the same values as one
    with every = 1 (the guarded block only skips the computation); the last record is the batch
    mean of sum_j relu(drive)^2 of that trial, from the drive left in the plan."""
    rng = np.random.default_rng(1)
    X = rng.random((64, 20)).astype(np.float32)
    Y = rng.integers(0, 5, 64)
    net = build_ff_network((20, 16, 12), n_classes=5)
    mons = [Goodness("h2", "negative", every=1, name="g1"),
            Goodness("h2", "negative", every=3, name="g3")]
    plan = compile_plan(net.circuit, net.protocol, rules=list(net.rules),
                        optimizer=ff_optimizer(0.05, 1), monitors=mons, batch=8, seed=2)
    sim = Simulator(plan)
    sim.train(X[:56], Y[:56])          # trials 0..6
    g1, g3 = sim.traces["g1"], sim.traces["g3"]
    assert list(g1.trial) == list(range(7)) and list(g3.trial) == [0, 3, 6]
    np.testing.assert_array_equal(g3.values, g1.values[[0, 3, 6]])
    d = sim.view("h2.drive@negative").astype(np.float64)
    want = np.mean(np.sum(np.maximum(d, 0.0) ** 2, axis=1))
    assert g3.values[-1, 0] == pytest.approx(want, rel=1e-5)
