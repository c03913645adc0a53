"""The local-rule scenarios (models/local_rules.py: scenarios/oja_pca.toml,
bcm_selectivity.toml, pes_map.toml) run through ``neurosim run`` and do their job; both backends
agree on them and a full reset equals a fresh simulator (what tests/test_backends_scenarios.py
and tests/test_core_v2.py check for the scenarios trained on a data set).

Thresholds, from the analysis in each scenario file:

* Oja: the angle's tangent decays by exp(-lr (lambda_1 - lambda_2)) = exp(-0.01) per minibatch,
  so after 8 epochs of 100 minibatches the deterministic part is below 0.1 degree; the SGD noise
  floor is about sqrt(lr / (2 B) sum_k lambda_1 lambda_k / (lambda_1 - lambda_k)) ~ 1.6 degrees
  (linearised Oja dynamics, Gaussian input). 5 degrees is three times that floor.
* BCM: selectivity 1 - mean|r_other| / r_preferred >= 0.8 means every neuron answers the other
  patterns at most a fifth as strongly as its own, from ~0.1 at the start (overlapping
  patterns, everything answered alike). At the selective fixed point y_pref = theta =
  E[y^2] = y_pref^2 / K, so y_pref = K = 4; theta is a running mean (5 minibatches) over
  minibatches of 16 in which the preferred pattern's share fluctuates by ~43 %, which leaves
  ~14 % on theta and y_pref: +-50 % is more than three of those (for theta ~ y_pref^2, ~31 %
  per neuron, ~16 % in the mean of the four).
* PES: D = 0 gives the error 1 exactly. PES is least mean squares on E's rates, which vary
  mostly along the directions of the linearised circuit's response (variances >= 0.37): the
  error contracts by >= 1 - 0.2 * 0.37 per minibatch, ~0.3 per epoch of 16 minibatches, and
  converges to the best readout in that subspace, which is at least as good as the readout
  exact for the linearised circuit (in that subspace); its error is the reference.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from neurosim import ValidationError
from neurosim import scenario as sc
from neurosim.cli import main

REPO = Path(__file__).resolve().parents[1]
LOCAL = ["oja_pca", "bcm_selectivity", "pes_map"]


def _run(tmp_path, name, *sets):
    out = tmp_path / name
    argv = ["run", str(REPO / "scenarios" / f"{name}.toml"), "--out", str(out), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    with open(out / "metrics.csv") as fh:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    return out, rows, json.loads((out / "summary.json").read_text())


def _files(out, name, rows, proj):
    assert (out / f"{name}.png").stat().st_size > 10000
    assert (out / "scenario.toml").is_file()
    with np.load(out / "weights.npz") as z:
        assert z[proj].shape[0] == len(rows) and list(z["epoch"]) == [r["epoch"] for r in rows]


@pytest.mark.parametrize("sets", [(), ("simulation.mode=time", 'model.timing="continuous"')],
                         ids=["steady-end", "time-continuous"])
def test_oja_finds_the_first_principal_component(tmp_path, sets):
    """|W| at the fixed point: for y = c W x, Oja's E[c y x - c^2 y^2 W] = 0 gives |W|^2 =
    avg(c) / avg(c^2) over the updates; c = 1 in steady mode, and in time mode (continuous) the
    Euler relaxation c_n = 1 - (1 - dt/tau)^n of y towards W x at steps n = 1..50."""
    out, rows, summary = _run(tmp_path, "oja_pca", *sets)
    assert len(rows) == 9 and rows[0]["angle_deg"] > 30.0
    assert rows[-1]["angle_deg"] < 5.0
    c = 1.0 - 0.9 ** np.arange(1, 51) if sets else np.ones(1)
    assert rows[-1]["w_norm"] == pytest.approx(np.sqrt(c.mean() / np.mean(c ** 2)), abs=0.01)
    assert summary["final_angle_deg"] == rows[-1]["angle_deg"]
    _files(out, "oja_pca", rows, "W")


def test_bcm_neurons_become_selective(tmp_path):
    out, rows, summary = _run(tmp_path, "bcm_selectivity")
    first, last = rows[0], rows[-1]
    assert first["mean_selectivity"] < 0.3
    assert last["min_selectivity"] >= 0.8
    K = summary["references"]["preferred_response_theory"]
    for i in range(4):
        assert 0.5 * K <= last[f"response_{i}"] <= 1.5 * K
    assert 0.5 * K <= last["theta_mean"] <= 1.5 * K     # theta = y_pref^2 / K = K
    _files(out, "bcm_selectivity", rows, "W")


def test_pes_learns_the_linear_map_in_a_recurrent_circuit(tmp_path):
    out, rows, summary = _run(tmp_path, "pes_map")
    ref = summary["references"]["linear_readout_error"]
    errs = [r["map_error"] for r in rows]
    assert errs[0] == pytest.approx(1.0, abs=1e-6)
    assert errs[1] <= 0.5                       # ~0.3 expected after the first epoch
    assert errs[-1] <= min(ref, 0.1)            # down by more than 10x, to the reference
    _files(out, "pes_map", rows, "D")


@pytest.mark.parametrize("name", LOCAL)
def test_backends_agree_on_the_first_minibatches(name):
    """As tests/test_backends_scenarios.py: three minibatches, ||dW_numba - dW_numpy|| <=
    1e-3 ||dW||."""
    from neurosim.models import local_rules as lr

    sims = {}
    for backend in ("numba", "numpy"):
        settings = sc.load(REPO / "scenarios" / f"{name}.toml",
                           [f'training.backend="{backend}"'])
        task = lr._TASKS[name](settings)
        sims[backend] = lr.make_simulator(settings)
        B = settings["training"]["batch_size"]
        sims[backend].train(task.X[:3 * B], T=None if task.T is None else task.T[:3 * B])
    proj = lr._LEARNED[name]
    w0 = lr.make_simulator(settings).weights[proj].astype(np.float64)
    d_a = sims["numba"].weights[proj] - w0
    d_b = sims["numpy"].weights[proj] - w0
    assert np.linalg.norm(d_a) > 0
    assert np.linalg.norm(d_a - d_b) <= 1e-3 * np.linalg.norm(d_a)


@pytest.mark.parametrize("name", LOCAL)
def test_reset_everything_equals_a_fresh_simulator(name):
    from neurosim.models import local_rules as lr

    settings = sc.load(REPO / "scenarios" / f"{name}.toml")
    task = lr._TASKS[name](settings)
    B = settings["training"]["batch_size"]
    X, T = task.X[:3 * B], None if task.T is None else task.T[:3 * B]
    sim = lr.make_simulator(settings)
    sim.train(X, T=T)
    first = sim.mem.copy()
    sim.reset(everything=True)
    assert np.array_equal(sim.mem, sim.plan.init_mem)
    sim.train(X, T=T)
    assert np.array_equal(sim.mem, first)


def test_scenario_errors(tmp_path):
    with pytest.raises(ValidationError, match="model.timing"):
        sc.build(sc.load(REPO / "scenarios" / "oja_pca.toml", ['model.timing="continuous"']))
    with pytest.raises(ValidationError, match="simulation.mode"):
        sc.build(sc.load(REPO / "scenarios" / "pes_map.toml", ['simulation.mode="steady"']))
    with pytest.raises(ValidationError, match="model.theta_tau"):
        sc.build(sc.load(REPO / "scenarios" / "bcm_selectivity.toml", ["model.theta_tau=0.5"]))
    settings = sc.load(REPO / "scenarios" / "pes_map.toml")
    with pytest.raises(ValidationError, match="--resume"):
        sc.runner_for(settings)(settings, tmp_path / "r", resume=True)
