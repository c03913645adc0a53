"""Engine core v2, for every shipped scenario: the plan is immutable data, the simulator owns the
state, a full reset equals a fresh simulator, and no module outside the compiler emits raw
opcodes.

The scenarios run on a tiny synthetic MNIST-format data set (tests/_tinyrun.py), a few
minibatches each: the circuits, rules, monitors and optimizers are the shipped ones."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from _tinyrun import dataset_scenarios
from neurosim import Simulator
from neurosim import scenario as sc
from neurosim import training
from neurosim.simulator import shuffled_order

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = dataset_scenarios()


def _settings(name, data):
    return sc.load(REPO / "scenarios" / name,
                   [f"data.dir={data}", "data.verify=false", "data.dataset=mnist"])


def _train(sim, ds, n_batches, epoch=0):
    B = sim.plan.batch
    sim.set_lr(sim.plan.optimizer.lr_at(epoch))
    sim.set_epoch(epoch)
    order = shuffled_order(0, epoch, ds.x_train.shape[0])[: n_batches * B]
    sim.train(ds.x_train, ds.y_train, order)


def _state(sim):
    return sim.mem.copy(), sim.scal.copy(), sim.trial, sim.step


@pytest.mark.parametrize("name", SCENARIOS)
def test_reset_everything_equals_a_fresh_simulator(name, data):
    """reset(everything=True) restores every buffer kind (weights, optimizer, rule state such
    as learned factors, counters and running means, rates) and the scalar slots: training again
    gives the same bits as the first time, and as a fresh simulator."""
    settings = _settings(name, data)
    ds, _, _ = training.load_data(settings)
    sim = training.simulator_for(settings)
    _train(sim, ds, 3)
    first = _state(sim)
    sim.reset(everything=True)
    assert np.array_equal(sim.mem, sim.plan.init_mem)
    _train(sim, ds, 3)
    again = _state(sim)
    fresh = training.simulator_for(settings)
    _train(fresh, ds, 3)
    for a, b, c in zip(first, again, _state(fresh)):
        assert np.array_equal(np.asarray(a), np.asarray(b)), name
        assert np.array_equal(np.asarray(a), np.asarray(c)), name


@pytest.mark.parametrize("name", ["pepita_mnist.toml", "pepita_wm_mnist.toml", "ff_mnist.toml"])
def test_two_simulators_on_one_plan_are_independent(name, data):
    settings = _settings(name, data)
    ds, _, _ = training.load_data(settings)
    a = training.simulator_for(settings)
    b = Simulator(a.plan) if type(a) is Simulator else training.simulator_for(settings)
    before = b.mem.copy()
    _train(a, ds, 2)
    assert not np.array_equal(a.mem, before)
    assert np.array_equal(b.mem, before)


def test_the_plan_is_read_only(data):
    sim = training.simulator_for(_settings("pepita_mnist.toml", data))
    plan = sim.plan
    for arr in (plan.init_mem, plan.bufs, plan.train.prog, plan.train.fprm, plan.scalar_init):
        with pytest.raises(ValueError):
            arr.reshape(-1)[0] = 1
    with pytest.raises(AttributeError):
        plan.batch = 3
    # set_lr changes the simulator's scalar slot, not the plan
    sim.set_lr(0.5)
    assert sim.lr == 0.5 and plan.scalar_init[plan.scalar_index["lr"]] == 0.1


def test_no_module_outside_the_compiler_and_kernels_emits_raw_ops():
    """Rules, monitors, models and diagnostics are written as array expressions (or through the
    PlanBuilder's named helpers); only the compiler and the kernels name opcodes."""
    allowed = {"neurosim/compiler.py", "neurosim/optable.py", "neurosim/expr.py"}
    pattern = re.compile(r"\bpb\.(op|emit)\(|\.emit\(K\.|kernels\.ops import [A-Z]|\bK\.[A-Z_]+\b")
    offenders = []
    for path in list((REPO / "neurosim").rglob("*.py")) + list((REPO / "models").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in allowed or rel.startswith(("neurosim/kernels/", "neurosim/backends/")):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
