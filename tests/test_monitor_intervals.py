"""Monitor intervals in epochs, trace lookup by short key, per-trial trace views, and the
warning for traces that would get fewer than 3 points (issue 12, item 2)."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest

from _tinyrun import write_tiny_scenario
from neurosim import Monitor, SGD, Simulator, Traces, compile_plan
from neurosim import scenario as sc
from neurosim import training
from neurosim.errors import NeurosimWarning, ValidationError
from neurosim.models import build_pepita_network


# -- intervals in epochs --------------------------------------------------------------------------
@pytest.mark.parametrize("text,epochs", [("0.1 epoch", 0.1), ("2 epochs", 2.0),
                                         (" 1e-1 epoch ", 0.1), ("1epoch", 1.0),
                                         (".5 epochs", 0.5)])
def test_epochs_of_reads_epoch_intervals(text, epochs):
    assert sc.epochs_of(text) == pytest.approx(epochs)


@pytest.mark.parametrize("value", ["0 epoch", "-1 epoch", "nan epoch", "inf epochs", "epoch",
                                   "0.1 epoch x", "0.1 trials", 5, None])
def test_epochs_of_rejects_the_rest(value):
    assert sc.epochs_of(value) is None



def _write(tmp_path, epochs, monitors):
    text = write_tiny_scenario(tmp_path, epochs=epochs).read_text().split("[[monitor]]")[0]
    path = tmp_path / "scen.toml"
    path.write_text(text + monitors)
    return path


def test_scenario_checks_epoch_intervals(tmp_path):
    ok = sc.load(_write(tmp_path, 1, '[[monitor]]\ntarget = "angle:F"\nevery = "0.25 epoch"\n'))
    assert ok["monitor"][0]["every"] == "0.25 epoch"
    with pytest.raises(ValidationError, match=r"monitor\[0\]\.every.*'ten'"):
        sc.load(_write(tmp_path, 1, '[[monitor]]\ntarget = "angle:F"\nevery = "ten"\n'))
    with pytest.raises(ValidationError, match=r"monitor\[0\]\.every"):
        sc.load(_write(tmp_path, 1, '[[monitor]]\ntarget = "angle:F"\nevery = "0 epoch"\n'))
    with pytest.raises(ValidationError, match=r"monitor\[0\]\.per.*counts trials"):
        sc.load(_write(tmp_path, 1, '[[monitor]]\ntarget = "hidden.r"\nper = "step"\n'
                                    'every = "0.1 epoch"\n'))


def test_resolve_intervals_rounds_to_whole_minibatches(tmp_path):
    s = sc.load(_write(tmp_path, 1, '[[monitor]]\ntarget = "angle:F"\nevery = "0.1 epoch"\n'
                                    '[[monitor]]\ntarget = "W1.norm"\nevery = "1 epoch"\n'
                                    '[[monitor]]\ntarget = "hidden.r"\nevery = "0.001 epoch"\n'
                                    '[[monitor]]\ntarget = "W2.norm"\nevery = 7\n'))
    # batch 32: 2000 samples are ceil(62.5) = 63 minibatches per epoch
    r = sc.resolve_intervals(s, 2000)
    assert [m["every"] for m in r["monitor"]] == [6, 63, 1, 7]     # round(6.3), 63, max(1, 0), 7
    assert [m["per"] for m in r["monitor"]] == ["trial", "trial", "trial", None]
    assert s["monitor"][0]["every"] == "0.1 epoch"                # the input is not modified
    # full MNIST at batch 64 (938 minibatches): "0.1 epoch" is the scenarios' former 94
    s["training"]["batch_size"] = 64
    assert sc.resolve_intervals(s, 60000)["monitor"][0]["every"] == 94
    assert sc.nominal_train_size(s) == 60000
    s["data"]["train_limit"] = 2000
    assert sc.nominal_train_size(s) == 2000
    assert sc.with_trial_intervals(s)["monitor"][1]["every"] == 32


def test_a_run_resolves_epoch_intervals_from_the_loaded_data(tmp_path, data):
    # the tiny data set has 384 training samples (not MNIST's nominal 60000): 12 minibatches of
    # 32 per epoch, so "0.25 epoch" is every 3 minibatches: trials 0, 3, ..., 21 over 2 epochs
    path = _write(tmp_path, 2, '[[monitor]]\ntarget = "angle:F"\nevery = "0.25 epoch"\n')
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", NeurosimWarning)
        training.run(sc.load(path), out, data_dir=data, progress=False, log=lambda *a: None)
    with np.load(out / "traces.npz") as z:
        assert z["angle:F/trial"].tolist() == [0, 3, 6, 9, 12, 15, 18, 21]
    assert sc.load(out / "scenario.toml")["monitor"][0]["every"] == "0.25 epoch"


def test_a_monitor_with_too_few_points_warns(tmp_path, data):
    path = _write(tmp_path, 1, '[[monitor]]\ntarget = "angle:F"\nevery = 10\n'
                               '[[monitor]]\ntarget = "W1.norm"\nevery = "0.1 epoch"\n')
    with pytest.warns(NeurosimWarning, match=r"'angle:F' records every 10 minibatches, so 2 "
                                             r"point\(s\).*1 epoch\(s\) x 12 minibatches") as rec:
        training.run(sc.load(path), tmp_path / "run", data_dir=data, progress=False,
                     log=lambda *a: None)
    assert not [w for w in rec if "W1.norm" in str(w.message)]


# -- short keys and per-trial views ----------------------------------------------------------------
def _time_sim(monitors, steps_phase=5):
    net = build_pepita_network((6, 5, 3), mode="time", tau="2 ms", dt="1 ms",
                               phase_duration=f"{steps_phase} ms", dropout=0.0)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.01),
                        monitors=monitors, batch=2, seed=0)
    return Simulator(plan)


def test_short_keys_resolve_when_unambiguous(data_6_3):
    X, Y = data_6_3
    sim = _time_sim([Monitor("hidden.r", phase="clean", every=1),
                     Monitor("output.r", phase="clean", every=1),
                     Monitor("output.r", phase="modulated", every=1), Monitor("angle:F")])
    sim.train(X[:4], Y[:4])
    tr = sim.traces
    assert isinstance(tr, Traces) and sorted(tr) == ["angle:F", "hidden.r@clean",
                                                     "output.r@clean", "output.r@modulated"]
    assert tr["hidden.r"] is not None and tr["hidden.r"].name == "hidden.r@clean"
    np.testing.assert_array_equal(tr["hidden.r"].values, tr["hidden.r@clean"].values)
    assert "hidden.r" in tr and tr.get("hidden.r").name == "hidden.r@clean"
    with pytest.raises(KeyError, match=r"'output.r' is ambiguous.*output.r@clean.*"
                                       r"output.r@modulated"):
        tr["output.r"]
    assert "output.r" not in tr and tr.get("output.r", 1) == 1
    with pytest.raises(KeyError, match=r"no trace 'hidden.drive'.*hidden.r@clean"):
        tr["hidden.drive"]


def test_per_trial_views_of_a_time_mode_trace(data_6_3):
    X, Y = data_6_3
    sim = _time_sim([Monitor("hidden.r", phase="modulated", every=1)])
    sim.train(X[:6], Y[:6])                                 # 3 trials of batch 2
    tr = sim.traces["hidden.r"]
    assert tr.trials.tolist() == [0, 1, 2] and len(tr) == 15      # 5 steps per trial
    one = tr.in_trial(1)
    assert one.trial.tolist() == [1] * 5 and one.t_unit == "s"
    np.testing.assert_array_equal(one.values, tr.values[5:10])
    np.testing.assert_array_equal(tr.in_trial(-1).values, tr.values[10:])
    t, v = tr.by_trial()
    assert v.shape == (3, 5, 5)
    np.testing.assert_array_equal(v[2], tr.values[10:])
    np.testing.assert_allclose(t, np.arange(5) * 1e-3)           # dt apart within a trial
    assert not v.flags.writeable
    with pytest.raises(ValidationError, match=r"in_trial.*trial 7 has no records"):
        tr.in_trial(7)
    with pytest.raises(ValidationError, match=r"got -4, but only 3 trials"):
        tr.in_trial(-4)


def test_by_trial_refuses_uneven_trials(data_6_3):
    X, Y = data_6_3
    # every 3 steps over a trial of 2 phases x 5 steps: records fall unevenly on the trials
    sim = _time_sim([Monitor("hidden.r", phase="modulated", every=3)])
    sim.train(X[:6], Y[:6])
    tr = sim.traces["hidden.r"]
    with pytest.raises(ValidationError, match="between 1 and 2 records"):
        tr.by_trial()
    assert sum(len(tr.in_trial(int(k))) for k in tr.trials) == len(tr)


# -- metrics: running vs evaluated training accuracy -----------------------------------------------
def test_train_eval_is_a_clean_evaluation_of_the_first_samples(tmp_path, data):
    path = _write(tmp_path, 1, "")
    settings = sc.load(path, ["training.train_eval=100"])
    out = tmp_path / "run"
    training.run(settings, out, data_dir=data, progress=False, log=lambda *a: None)
    with open(out / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    running, ev = float(row["train_accuracy_running"]), float(row["train_accuracy_eval"])
    assert 0.0 <= running <= 1.0
    # the same number from the checkpointed weights, evaluated independently
    sim = training.make_simulator(settings)
    training.load_checkpoint(training.latest_checkpoint(out), sim, settings)
    ds, _, _ = training.load_data(settings, data)
    assert ev == sim.evaluate(ds.x_train[:100], ds.y_train[:100])
    # train_eval is bookkeeping: it does not change the hash (a run may be resumed with it on)
    assert training.scenario_hash(settings) == training.scenario_hash(sc.load(path))


def test_resume_reads_checkpoints_that_name_the_running_accuracy_train_accuracy(tmp_path, data):
    """Checkpoints of neurosim 0.1 hold metrics rows with ``train_accuracy``; a resumed run
    writes that column as ``train_accuracy_running``."""
    import json

    path = _write(tmp_path, 1, "")
    out = tmp_path / "run"
    training.run(sc.load(path), out, data_dir=data, progress=False, log=lambda *a: None)
    ck = training.latest_checkpoint(out)
    with np.load(ck) as z:
        arrays = {k: z[k] for k in z.files}
    rows = json.loads(bytes(arrays["metrics"]).decode())
    first = rows[0].pop("train_accuracy_running")
    rows[0].pop("train_accuracy_eval")
    rows[0]["train_accuracy"] = first
    arrays["metrics"] = np.frombuffer(json.dumps(rows).encode(), np.uint8)
    np.savez(ck, **arrays)
    training.run(sc.load(out / "scenario.toml", ["training.epochs=2"]), out, resume=True,
                 progress=False, log=lambda *a: None)
    with open(out / "metrics.csv", newline="") as f:
        got = list(csv.DictReader(f))
    assert [float(r["train_accuracy_running"]) for r in got][0] == first
    assert np.isfinite(float(got[1]["train_accuracy_running"]))
