"""``neurosim sweep`` on dask.distributed (issue 6, part 1).

The main test runs a 2-point grid x 2 seeds on a LocalCluster of 2 single-threaded worker
processes, re-runs it (finished runs are skipped; a deleted run is recomputed to the same
bits), and checks that no worker process outlives the command.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import time

import numpy as np
import pytest

from _tinyrun import make_mnist_like, write_tiny_scenario
from neurosim import ValidationError
from neurosim import sweep as sw
from neurosim.cli import main as cli


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return write_tiny_scenario(tmp_path_factory.mktemp("scen"), epochs=2)


def _rows(out):
    with open(out / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def _no_worker_processes_left():
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.2)
    return not multiprocessing.active_children()


def _final_mem(run_dir):
    ck = sorted((run_dir / "checkpoints").glob("epoch-*.npz"))[-1]
    with np.load(ck) as z:
        return z["mem"].copy()


# -- planning (no cluster) -----------------------------------------------------------------------
def test_split_values_respects_brackets_and_quotes():
    assert sw.split_values("0.05, 0.1,1e-3", "g") == ["0.05", "0.1", "1e-3"]
    assert sw.split_values("[784,64,10],[784,128,10]", "g") == ["[784,64,10]", "[784,128,10]"]
    assert sw.split_values('"a,b",c', "g") == ['"a,b"', "c"]
    for bad in ("1,,2", "[1,2", "1]", '"x', ""):
        with pytest.raises(ValidationError):
            sw.split_values(bad, "g")


def test_plan_names_seeds_and_settings(scen):
    grid, base, runs = sw.plan_sweep(scen, ["training.lr=0.05,0.1",
                                            "model.sizes=[784,8,10],[784,16,10]"], "3",
                                     ["training.epochs=1"])
    assert list(grid) == ["training.lr", "model.sizes"]
    assert len(runs) == 2 * 2 * 3
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    assert names[0] == "lr-0.05_sizes-784-8-10_seed-0"
    assert {r.seed for r in runs} == {0, 1, 2}
    r = runs[-1]
    assert r.settings["training"]["lr"] == 0.1 and r.settings["model"]["sizes"] == [784, 16, 10]
    assert r.settings["training"]["seed"] == 2 and r.settings["training"]["epochs"] == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--grid", "training.lrr=0.1,0.2"], "training.lrr: unknown key"),
    (["--grid", "training.lr=0.1,-1"], "training.lr: got -1.0"),
    (["--grid", "training.lr"], "--grid: got 'training.lr', expected KEY=V1,V2"),
    (["--grid", "lr=0.1"], "expected section.key"),
    (["--grid", "training.lr=0.1", "--grid", "training.lr=0.2"], "given twice"),
    (["--grid", "training.lr=0.1,0.1"], "repeats a value"),
    (["--seeds", "0"], "--seeds: got 0"),
    (["--seeds", "two"], "--seeds: got 'two'"),
    (["--grid", "training.seed=1,2", "--seeds", "2"], "already swept"),
    (["--workers", "0"], "--workers"),
    (["--grid", "simulation.mode=time", "--set", "simulation.dt=50ms"], "simulation.dt"),
    (["--grid", "model.sizes=[784,10]"], "model.sizes"),
    (["--grid", "model.sizes=[784,8,10],[700,8,10]"], "samples have 784"),
])
def test_bad_sweeps_are_rejected_before_any_worker(tmp_path, scen, data, capsys, argv,
                                                   fragment):
    out = tmp_path / "sweep"
    assert cli(["sweep", str(scen), "--data", str(data), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert not out.exists()
    assert not multiprocessing.active_children()


def test_missing_data_is_reported_before_starting_workers(tmp_path, scen, capsys):
    out = tmp_path / "sweep"
    assert cli(["sweep", str(scen), "--data", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()


# -- the real thing --------------------------------------------------------------------------------
def test_sweep_local_cluster_then_rerun_skips(tmp_path, scen, data, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", str(scen), "--grid", "training.lr=0.05,0.1", "--seeds", "2",
            "--data", str(data), "--out", str(out), "--workers", "2", "--no-progress"]
    assert cli(argv) == 0
    captured = capsys.readouterr()
    assert "0 already finished, 4 to run" in captured.err
    assert "[4/4]" in captured.err                       # the progress display: done/total
    assert _no_worker_processes_left()

    rows = _rows(out)
    assert [r["run"] for r in rows] == ["lr-0.05_seed-0", "lr-0.05_seed-1", "lr-0.1_seed-0",
                                        "lr-0.1_seed-1"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert {r["training.lr"] for r in rows} == {"0.05", "0.1"}
    assert all(0.0 <= float(r["final_test_accuracy"]) <= 1.0 for r in rows)
    assert len({r["worker"] for r in rows}) >= 1 and all(r["worker"] for r in rows)
    for r in rows:
        run = out / "runs" / r["run"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["complete"] and summary["epochs_done"] == 2
        assert summary["seed"] == int(r["seed"])
        assert (run / "metrics.csv").is_file() and (run / "traces.npz").is_file()
    md = (out / "summary.md").read_text()
    assert "| lr | finished | final_test_accuracy" in md
    assert md.count(" ± ") >= 2 and "| 0.05 | 2/2 |" in md and "| 0.1 | 2/2 |" in md
    spec = json.loads((out / "sweep.json").read_text())
    assert spec["grid"] == {"training.lr": ["0.05", "0.1"]} and spec["seeds"] == 2

    # re-run with one run deleted: 3 skipped, 1 recomputed, to the same bits
    victim = out / "runs" / "lr-0.1_seed-1"
    reference = _final_mem(victim)
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")
              if victim not in p.parents}
    import shutil

    shutil.rmtree(victim)
    assert cli(argv) == 0
    assert "3 already finished, 1 to run" in capsys.readouterr().err
    assert _no_worker_processes_left()
    assert np.array_equal(_final_mem(victim).view(np.uint32), reference.view(np.uint32))
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())

    # nothing left to do: no cluster is started at all
    t0 = time.perf_counter()
    assert cli(argv) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 15
    assert [r["status"] for r in _rows(out)] == ["ok"] * 4

    # a different scenario into the same folder is refused
    assert cli(argv + ["--set", "training.momentum=0.5"]) == 2
    assert "different settings" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_the_run_resumes(tmp_path, scen, capsys):
    """SIGKILL the worker process after the run's second checkpoint: dask restarts the worker
    and reschedules the task, which resumes from the checkpoint; the result is bit-identical
    to an uninterrupted run."""
    import os
    import signal
    import threading

    from neurosim import scenario as sc
    from neurosim import training

    data = make_mnist_like(tmp_path / "data", n_train=3000, n_test=100)
    sets = ["training.epochs=5", "model.sizes=[784,96,10]"]
    out = tmp_path / "sweep"
    ck = out / "runs" / "base_seed-0" / "checkpoints" / "epoch-0002.npz"
    killed = []

    def killer():
        deadline = time.time() + 240
        while not ck.exists() and time.time() < deadline:
            time.sleep(0.05)
        for p in multiprocessing.active_children():
            if p.name != "resource_tracker" and p.pid:
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
                return

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    argv = ["sweep", str(scen), "--data", str(data), "--out", str(out), "--workers", "1",
            "--no-progress"] + [x for s in sets for x in ("--set", s)]
    assert cli(argv) == 0
    t.join(5)
    assert killed, "no worker was killed"
    row = _rows(out)[0]
    assert row["status"] == "ok" and row["epochs_done"] == "5"
    assert int(row["worker"].split(":")[1]) != killed[0]      # finished by the new worker
    ref = tmp_path / "ref"
    training.run(sc.load(scen, sets), ref, data_dir=data, progress=False, log=lambda *a: None)
    assert np.array_equal(_final_mem(ref).view(np.uint32),
                          _final_mem(out / "runs" / "base_seed-0").view(np.uint32))
    assert _no_worker_processes_left()


@pytest.mark.slow
def test_sweep_on_an_existing_scheduler_records_divergence(tmp_path, scen, data, capsys):
    """--scheduler ADDRESS with an externally started cluster; a diverging grid point is
    recorded (not fatal), skipped on re-run, and retried with --retry-failed."""
    from dask.distributed import LocalCluster

    out = tmp_path / "sweep"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster:
        argv = ["sweep", str(scen), "--grid", "training.lr=0.05,1e6", "--data", str(data),
                "--out", str(out), "--scheduler", cluster.scheduler_address, "--no-progress"]
        assert cli(argv) == 0
        rows = {r["run"]: r for r in _rows(out)}
        assert rows["lr-0.05_seed-0"]["status"] == "ok"
        bad = rows["lr-1e6_seed-0"]
        assert bad["status"] == "diverged" and "projection" in bad["error"]
        assert "diverged" in (out / "summary.md").read_text()
        capsys.readouterr()
        assert cli(argv) == 0
        assert "2 already finished, 0 to run" in capsys.readouterr().err
        assert cli(argv + ["--retry-failed"]) == 0
        assert "1 already finished, 1 to run" in capsys.readouterr().err
        from dask.distributed import Client

        with Client(cluster) as client:                           # the cluster is left running
            assert len(client.scheduler_info()["workers"]) == 2
    assert _no_worker_processes_left()
