"""The ``neurosim validate`` and ``neurosim run`` command line (issue 2's CLI).

The main run uses the genuine MNIST (``_tinyrun.genuine_mnist_dir``; skipped when absent); the
override, error and clean-up tests use a tiny synthetic data set in MNIST's file format.
"""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _tinyrun import MNIST, write_tiny_scenario
from neurosim import scenario as sc
from neurosim.cli import main as cli

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = sorted((REPO / "scenarios").glob("*.toml"))
METRIC_COLUMNS = ["epoch", "test_accuracy", "train_accuracy_running", "train_accuracy_eval", "lr",
                  "samples_per_s", "wall_s"]


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return write_tiny_scenario(tmp_path_factory.mktemp("scen"), epochs=1)


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# -- validate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_validate_every_shipped_scenario(path, capsys):
    assert cli(["validate", str(path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_validate_reports_bad_scenarios_with_key_paths(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\nname = "pepita"\n[training]\nlr = -1\n')
    assert cli(["validate", str(bad)]) == 2
    assert "training.lr: got -1.0, expected a number > 0." in capsys.readouterr().err
    bad.write_text('[model]\nname = "pepita"\n[[monitor]]\ntarget = "hiden.r"\n')
    assert cli(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "monitor[0].target" in err and "hiden" in err
    bad.write_text("[model\nname = 1")
    assert cli(["validate", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert cli(["validate", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


# -- the real thing: PEPITA on MNIST, one short epoch ---------------------------------------------
@pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"the genuine MNIST is not in {MNIST} (set NEUROSIM_DATA)")
def test_run_pepita_mnist_real_data(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "neurosim.cli", "run",
                        str(REPO / "scenarios" / "pepita_mnist.toml"), "--data", str(MNIST),
                        "--out", str(out), "--set", "training.epochs=1",
                        "--set", "data.train_limit=1000", "--set", "data.test_limit=500",
                        "--no-progress"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "final test accuracy" in p.stdout
    for name in ("scenario.toml", "metrics.csv", "summary.json", "traces.npz",
                 "learning_curve.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["epoch-0001.npz"]
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and list(rows[0])[: len(METRIC_COLUMNS)] == METRIC_COLUMNS
    assert len(rows) == 1 and rows[0]["epoch"] == "1"
    acc = float(rows[0]["test_accuracy"])
    assert 0.5 < acc <= 1.0          # 1000 samples, one epoch: well above chance
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_train"] == 1000 and summary["epochs_done"] == 1
    settings = sc.load(out / "scenario.toml")
    assert settings["training"]["epochs"] == 1 and settings["data"]["test_limit"] == 500
    with np.load(out / "traces.npz") as z:
        assert "angle:F/values" in z.files and "W1.norm/values" in z.files
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- every override key takes effect ---------------------------------------------------------------
def test_all_override_keys(tmp_path, data, scen, capsys):
    out = tmp_path / "steady"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress",
                "--set", "training.epochs=2", "--set", "training.seed=7",
                "--set", "training.lr=0.02", "--set", "training.batch_size=16",
                "--set", "data.train_limit=160"]) == 0
    s = sc.load(out / "scenario.toml")
    assert (s["training"]["epochs"], s["training"]["seed"], s["training"]["lr"],
            s["training"]["batch_size"], s["data"]["train_limit"]) == (2, 7, 0.02, 16, 160)
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and float(rows[0]["lr"]) == 0.02
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 160 and summary["seed"] == 7
    with np.load(out / "checkpoints" / "epoch-0002.npz") as z:
        assert int(z["trial"]) == 2 * 10            # 160 samples / batch 16, two epochs

    out = tmp_path / "time"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress",
                "--set", "simulation.mode=time", "--set", "simulation.dt=0.5ms",
                "--set", 'simulation.tau="2 ms"', "--set", "simulation.phase_duration=3ms",
                "--set", "data.train_limit=64"]) == 0
    s = sc.load(out / "scenario.toml")["simulation"]
    assert s["mode"] == "time" and s["dt"] == pytest.approx(5e-4)
    assert s["tau"] == pytest.approx(2e-3) and s["phase_duration"] == pytest.approx(3e-3)
    with np.load(out / "checkpoints" / "epoch-0001.npz") as z:
        assert int(z["step"]) == 2 * 2 * 6          # 2 trials x 2 phases x 3 ms / 0.5 ms
    assert "final test accuracy" in capsys.readouterr().out


def test_linear_decay_schedule_key(tmp_path, data, scen):
    """``training.schedule = "linear_decay"``: lr constant for the first decay_start * epochs
    epochs, then (1 + (epochs - k) / (1 - decay_start)) / epochs of it in 1-based epoch k
    (Hinton's epsgain; SGD.lr_at), as the metrics record it."""
    out = tmp_path / "lin"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress",
                "--set", "training.epochs=4", "--set", "training.schedule=linear_decay",
                "--set", "training.decay_start=0.5", "--set", "data.train_limit=64"]) == 0
    with open(out / "metrics.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert lrs == pytest.approx([0.05, 0.05, 0.05 * 3 / 4, 0.05 * 1 / 4])


@pytest.mark.parametrize("override, where, fragment", [
    ("training.lrr=0.1", "training.lrr", "did you mean 'lr'?"),
    ("trainig.lr=0.1", "trainig", "did you mean 'training'?"),
    ("training.epochs=abc", "training.epochs", "expected an integer"),
    ("training.epochs=1.5", "training.epochs", "expected an integer"),
    ("training.lr=fast", "training.lr", "expected a number"),
    ("training.batch_size=0", "training.batch_size", "expected an integer >= 1"),
    ("simulation.tau=-1", "simulation.tau", "expected a time > 0"),
    ("simulation.dt=-1ms", "simulation.dt", "expected a time > 0"),
    ('simulation.dt="5 Hz"', "simulation.dt", "unit"),
    ("simulation.mode=tim", "simulation.mode", "did you mean 'time'?"),
    ("training.schedule=cosine", "training.schedule", "linear_decay"),
    ("training.decay_start=1.5", "training.decay_start", "expected"),
    ("simulation.phase_duration=0", "simulation.phase_duration", "expected a time > 0"),
    ("data.train_limit=-5", "data.train_limit", "expected an integer >= 1"),
    ("model.sizes=[784,10]", "model.sizes", "at least one hidden layer"),
    ("model.sizes=[100,8,10]", "model.sizes", "samples have 784"),
    ("model.sizes=[784,8,5]", "model.sizes", "10 classes"),
    ("training", "--set", "expected section.key=value"),
    ("lr=0.1", "--set", "expected section.key"),
])
def test_bad_overrides_exit_2_naming_the_key(tmp_path, data, scen, capsys, override, where,
                                             fragment):
    out = tmp_path / "run"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress",
                "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"neurosim: error: {where}"), err
    assert fragment in err, err
    assert not out.exists()


def test_time_mode_cross_checks(tmp_path, data, scen, capsys):
    assert cli(["validate", str(scen), "--set", "simulation.mode=time",
                "--set", "simulation.dt=20ms"]) == 2
    assert "simulation.dt: got 0.02 s, larger than simulation.tau" in capsys.readouterr().err
    assert cli(["validate", str(scen), "--set", "simulation.mode=time",
                "--set", "simulation.phase_duration=0.1ms"]) == 2
    assert "simulation.phase_duration" in capsys.readouterr().err


# -- data problems: clear message, nothing written or overwritten -----------------------------------
def test_missing_data_dir(tmp_path, scen, capsys):
    out = tmp_path / "run"
    assert cli(["run", str(scen), "--data", str(tmp_path / "nowhere"), "--out", str(out),
                "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no complete copy of the MNIST files" in err and "nowhere" in err
    assert not out.exists()


def _truncate(path):
    b = path.read_bytes()
    path.write_bytes(b[: len(b) // 2])


def _garble_gzip(path):
    b = bytearray(path.read_bytes())
    for i in range(len(b) // 2, len(b) // 2 + 64):
        b[i] ^= 0x5A
    path.write_bytes(bytes(b))


def _wrong_count(path):          # a valid gzip whose IDX header announces more images
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[4:8] = (int.from_bytes(raw[4:8], "big") + 1).to_bytes(4, "big")
    path.write_bytes(gzip.compress(bytes(raw)))


def _bad_label(path):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[-1] = 42
    path.write_bytes(gzip.compress(bytes(raw)))


@pytest.mark.parametrize("damage, file", [
    (_truncate, "train-images-idx3-ubyte.gz"), (_garble_gzip, "train-images-idx3-ubyte.gz"),
    (_wrong_count, "t10k-images-idx3-ubyte.gz"), (_bad_label, "train-labels-idx1-ubyte.gz"),
], ids=["truncated", "garbled-gzip", "truncated-payload", "bad-label"])
def test_corrupt_dataset_files_are_rejected_and_nothing_is_overwritten(tmp_path, data, scen,
                                                                       capsys, damage, file):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    damage(bad / file)
    out = tmp_path / "new"
    assert cli(["run", str(scen), "--data", str(bad), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert file in err and ("corrupt" in err or "truncated" in err or "label" in err), err
    assert not out.exists()
    # an existing run resumed against the damaged data is left byte-for-byte as it was
    run = tmp_path / "run"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    before = _snapshot(run)
    assert cli(["run", "--resume", str(run), "--data", str(bad), "--set", "training.epochs=2",
                "--no-progress"]) == 2
    assert file in capsys.readouterr().err
    assert _snapshot(run) == before


@pytest.mark.skipif(not (MNIST / "train-labels-idx1-ubyte.gz").exists(),
                    reason=f"the genuine MNIST is not in {MNIST} (set NEUROSIM_DATA)")
def test_checksum_mismatch_on_genuine_mnist(tmp_path, capsys):
    """With verification on (the default), a single changed label byte fails the SHA-256."""
    bad = tmp_path / "mnist"
    shutil.copytree(MNIST, bad)
    path = bad / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[100] = (raw[100] + 1) % 10
    path.write_bytes(gzip.compress(bytes(raw)))
    out = tmp_path / "run"
    assert cli(["run", str(REPO / "scenarios" / "pepita_mnist.toml"), "--data", str(bad),
                "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "SHA-256" in err and "t10k-labels-idx1-ubyte.gz" in err
    assert not out.exists()


# -- failures leave a resumable run directory with error.json, never half-written files ---------
def test_failed_first_epoch_keeps_the_scenario_and_error_json(tmp_path, data, scen, capsys):
    out = tmp_path / "run"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress",
                "--set", "training.lr=1e6"]) == 2
    err = capsys.readouterr().err
    assert "epoch 1:" in err and "no checkpoint was written" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "error.json", "scenario.toml"]
    assert list((out / "checkpoints").iterdir()) == []
    info = json.loads((out / "error.json").read_text())
    assert info["error"] == "SimulationError" and info["epoch"] == 1
    assert info["last_checkpoint"] is None
    # a new run refuses the folder; --resume repeats the (deterministic) divergence
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli(["run", "--resume", str(out), "--no-progress"]) == 2
    assert "epoch 1:" in capsys.readouterr().err
    # a folder of the user's: their file untouched, the run's files beside it
    given = tmp_path / "given"
    given.mkdir()
    (given / "notes.txt").write_text("mine")
    assert cli(["run", str(scen), "--data", str(data), "--out", str(given), "--no-progress",
                "--set", "training.lr=1e6"]) == 2
    assert sorted(p.name for p in given.iterdir()) == ["checkpoints", "error.json", "notes.txt",
                                                       "scenario.toml"]
    assert (given / "notes.txt").read_text() == "mine"


def test_interrupted_first_epoch_says_what_is_kept(tmp_path, data, scen, monkeypatch, capsys):
    """Ctrl-C in the first epoch: exit 130, error.json, and a message that is true: no epoch
    was kept, and --resume starts the run again."""
    from neurosim import simulator

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(simulator.Simulator, "train", interrupted)
        out = tmp_path / "run"
        assert cli(["run", str(scen), "--data", str(data), "--out", str(out),
                    "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; no epoch had finished" in err and "intact" not in err, err
    assert f"neurosim run --resume {out} starts it again from epoch 1" in err
    assert json.loads((out / "error.json").read_text())["error"] == "KeyboardInterrupt"
    assert not list(out.rglob("*.tmp"))
    assert cli(["run", "--resume", str(out), "--no-progress"]) == 0
    assert not (out / "error.json").exists()
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_resume_needs_no_data_flag_and_finished_run_is_a_noop(tmp_path, data, scen, capsys):
    out = tmp_path / "run"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    assert sc.load(out / "scenario.toml")["data"]["dir"] == str(data.resolve())
    before = (out / "checkpoints" / "epoch-0001.npz").read_bytes()
    assert cli(["run", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "checkpoints" / "epoch-0001.npz").read_bytes() == before
    assert json.loads((out / "summary.json").read_text())["complete"] is True


def test_scenario_key_reference_is_up_to_date():
    """docs/scenarios.md is generated from the schemas; a new or changed key must regenerate it
    (python scripts/scenario_keys.py)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(REPO / "scripts" / "scenario_keys.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
