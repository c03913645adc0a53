"""The divergence guard (issue 6, part 3): NaN/inf or runaway weights stop the run with an error
naming the phase, step, population or projection and a hint; the last good checkpoint stays
intact and a run that never checkpointed leaves nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _tinyrun import write_tiny_scenario
from neurosim import SimulationError, Simulator, compile_plan
from neurosim import scenario as sc
from neurosim import training
from neurosim.cli import main as cli
from neurosim.models import build_pepita_network


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return write_tiny_scenario(tmp_path_factory.mktemp("scen"), epochs=3)


def _quiet(*a, **k):
    pass


def test_huge_learning_rate_stops_in_epoch_one_and_writes_error_json(tmp_path, data, scen, capsys):
    out = tmp_path / "run"
    settings = sc.load(scen, ["training.lr=1e6"])
    with pytest.raises(SimulationError) as ei:
        training.run(settings, out, data_dir=data, progress=False, log=_quiet)
    e = ei.value
    assert e.projection in ("W1", "W2") and e.phase is not None
    assert e.epoch == 1
    msg = str(e)
    assert msg.startswith("epoch 1: ")
    assert f"projection {e.projection!r}" in msg and "phase" in msg
    assert "Hint: lower the learning rate (training.lr)" in msg
    assert "no checkpoint was written" in msg
    assert msg.count("Hint:") == 1
    # no checkpoint, but the folder says what happened (error.json) and can be resumed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "error.json", "scenario.toml"]
    info = json.loads((out / "error.json").read_text())
    assert info["error"] == "SimulationError" and info["epoch"] == 1
    assert info["projection"] == e.projection and info["last_checkpoint"] is None
    # the same through the CLI: exit code 2, one line naming the projection
    out2 = out.parent / "run2"
    assert cli(["run", str(scen), "--out", str(out2), "--data", str(data), "--no-progress",
                "--set", "training.lr=1e6"]) == 2
    err = capsys.readouterr().err
    assert "runaway" in err or "NaN" in err
    assert "projection 'W" in err and "training.lr" in err
    assert (out2 / "error.json").is_file() and not list(out2.rglob("*.tmp"))


def test_runaway_weights_and_a_preexisting_empty_out_dir(tmp_path, data, scen):
    """max_weight trips on ordinary learning; the (empty) --out folder given gets the run's
    scenario and error.json, nothing else."""
    out = tmp_path / "given"
    out.mkdir()
    settings = sc.load(scen, ["training.max_weight=0.2"])
    with pytest.raises(SimulationError, match="max_weight") as ei:
        training.run(settings, out, data_dir=data, progress=False, log=_quiet)
    assert ei.value.projection is not None
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "error.json", "scenario.toml"]


def test_divergence_after_good_epochs_keeps_the_last_checkpoint(tmp_path, data, scen):
    """lr x 1e6 from epoch 3 on (a milestone with gamma = 1e6): epochs 1-2 are fine, epoch 3
    diverges. Checkpoint 2 must be exactly the one an uninterrupted 2-epoch run writes."""
    sets = ["training.milestones=[2]", "training.gamma=1e6"]
    out = tmp_path / "diverging"
    with pytest.raises(SimulationError) as ei:
        training.run(sc.load(scen, sets), out, data_dir=data, progress=False, log=_quiet)
    assert ei.value.epoch == 3
    ck = out / "checkpoints" / "epoch-0002.npz"
    assert f"the last good checkpoint, {ck}, is intact" in str(ei.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001.npz",
                                                                      "epoch-0002.npz"]
    assert not list(out.rglob("*.tmp"))
    good = tmp_path / "good"
    training.run(sc.load(scen, sets + ["training.epochs=2"]), good, data_dir=data,
                 progress=False, log=_quiet)
    with np.load(ck) as a, np.load(good / "checkpoints" / "epoch-0002.npz") as b:
        assert np.array_equal(a["mem"].view(np.uint32), b["mem"].view(np.uint32))
        assert np.all(np.isfinite(a["mem"]))
    err = json.loads((out / "error.json").read_text())
    assert err["error"] == "SimulationError" and err["epoch"] == 3
    assert err["projection"] == ei.value.projection
    assert err["last_checkpoint"] == str(ck)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 2 and summary["complete"] is False
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    # resuming repeats the divergence deterministically and still keeps checkpoint 2
    before = ck.read_bytes()
    with pytest.raises(SimulationError) as again:
        training.run(sc.load(out / "scenario.toml"), out, resume=True, progress=False, log=_quiet)
    assert str(again.value) == str(ei.value)
    assert ck.read_bytes() == before


def _tiny_plan(mode="steady", batch=4):
    net = build_pepita_network((6, 5, 3), mode=mode, tau=0.01, dt=0.001, phase_duration=0.005,
                               dropout=0.0)
    from neurosim import SGD

    return compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                        batch=batch, seed=0)


@pytest.mark.parametrize("mode", ["steady", "time"])
def test_nonfinite_rates_name_phase_step_and_population(mode):
    """Overflowing drives (weights 1e30, inputs 1e30) give inf/NaN rates: the error names the
    population and phase, and in time mode the step within the phase."""
    sim = Simulator(_tiny_plan(mode))
    sim.set_weights("W1", np.full((5, 6), 1e30, np.float32))
    X = np.full((8, 6), 1e30, np.float32)
    Y = np.zeros(8, np.int64)
    with pytest.raises(SimulationError) as ei:
        sim.train(X, Y)
    e = ei.value
    assert e.population in ("hidden", "output", "error")
    assert e.phase == "clean"
    if mode == "time":
        assert e.step is not None
    assert "NaN or inf" in str(e) and "Hint:" in str(e)


def test_nonfinite_weights_name_the_projection():
    sim = Simulator(_tiny_plan())
    sim.set_weights("W2", np.full((3, 5), np.nan, np.float32))
    X = np.random.default_rng(0).random((8, 6), dtype=np.float32)
    with pytest.raises(SimulationError) as ei:
        sim.train(X, np.zeros(8, np.int64))
    assert ei.value.projection == "W2" or ei.value.population is not None
    assert "NaN or inf" in str(ei.value)
