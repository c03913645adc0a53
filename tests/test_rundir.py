"""Run directories under concurrency, faults and hostile input (issue 14).

One test (or a group) per row of the issue's table, in its order, then the building blocks
(locks, names, atomic writes). Every refusal must be a one-line ``neurosim: error:`` with exit
code 2 (130 for Ctrl-C), no traceback, no temporary file left, and nothing of the user's
replaced; a run directory that exists after a failure holds ``error.json`` and resumes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from _faults import (IS_ROOT, SmallDisk, deny_search, deny_writes, restore_modes, tmpfs_runner)
from _tinyrun import write_tiny_scenario
from neurosim import FolderLockedError, ResourceError, ValidationError
from neurosim import rundir
from neurosim import scenario as sc
from neurosim import training
from neurosim.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return write_tiny_scenario(tmp_path_factory.mktemp("scen"), epochs=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, scen):
    """An uninterrupted 2-epoch run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    training.run(sc.load(scen), out, data_dir=data, progress=False, log=lambda *a: None)
    return out


def _arena(run_dir, epoch=None):
    ck = (Path(run_dir) / "checkpoints" / f"epoch-{epoch:04d}.npz" if epoch else
          training.latest_checkpoint(Path(run_dir)))
    with np.load(ck) as z:
        return z["mem"].view(np.uint32).copy(), int(z["epoch"])


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _clean_error(err: str, *must):
    assert "Traceback" not in err, err
    assert err.startswith("neurosim: error: ") and err.count("\n") == 1, err
    for m in must:
        assert m in err, (m, err)


def _no_tmp(d: Path):
    assert not [p for p in Path(d).rglob("*") if p.name.endswith(".tmp")], sorted(
        p.name for p in Path(d).rglob("*"))


def _cli_proc(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "neurosim.cli", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# -- row 1: two writers on one folder --------------------------------------------------------------
def _wait(cond, procs, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, [p.communicate() for p in procs]
        time.sleep(0.02)


def test_two_runs_and_a_resume_on_one_folder(tmp_path, data, scen, reference):
    """The issue's case: run A, run B 0.3 s later and a --resume 0.5 s after A, on one --out.
    Exactly one run wins the folder; the others are refused at once naming its PID (or, for a
    --resume that looked before any run had written its scenario, as not a run directory). The
    winner's epochs are those of an uninterrupted run, and after SIGKILL the folder resumes."""
    out = tmp_path / "run"
    args = ("run", scen, "--out", out, "--data", data, "--no-progress",
            "--set", "training.epochs=40", "--set", "training.keep_checkpoints=100")
    a = _cli_proc(*args)
    time.sleep(0.3)
    b = _cli_proc(*args)
    time.sleep(0.2)
    c = _cli_proc("run", "--resume", out, "--no-progress")
    procs = [a, b, c]
    try:
        _wait(lambda: sum(p.poll() is not None for p in procs) >= 2, procs)
        (winner,) = [p for p in procs if p.poll() is None]
        assert winner in (a, b)
        _wait(lambda: (out / "checkpoints" / "epoch-0002.npz").exists(), procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = {p.pid: p.communicate(timeout=60)[1] for p in procs}
    loser = b if winner is a else a
    assert loser.returncode == 2, errs[loser.pid]
    _clean_error(errs[loser.pid], f"in use by process {winner.pid}", "kill")
    assert c.returncode == 2
    if "not a run directory" not in errs[c.pid]:
        _clean_error(errs[c.pid], f"in use by process {winner.pid}")
    assert np.array_equal(_arena(out, 1)[0], _arena(reference, 1)[0])
    assert np.array_equal(_arena(out, 2)[0], _arena(reference, 2)[0])
    stale = json.loads((out / rundir.LOCK_NAME).read_text())
    assert stale["pid"] == winner.pid                  # SIGKILL left the file, not the lock
    n = _arena(out)[1]
    assert cli(["run", "--resume", str(out), "--set", f"training.epochs={n + 1}",
                "--no-progress"]) == 0
    assert _arena(out)[1] == n + 1
    assert not (out / rundir.LOCK_NAME).exists()
    _no_tmp(out)


def test_lock_in_process_and_in_a_child(tmp_path):
    """flock is per open file: a second FolderLock in this process is refused (with our PID);
    a child that dies holding the lock releases it."""
    d = tmp_path / "x" / "y"
    with rundir.FolderLock(d, "run") as lock:
        assert d.is_dir() and lock.created == [tmp_path / "x", d]
        with pytest.raises(FolderLockedError) as ei:
            rundir.FolderLock(d, "run").acquire()
        assert ei.value.pid == os.getpid() and f"process {os.getpid()}" in str(ei.value)
    assert not (tmp_path / "x").exists(), "an unused lock removes the folders it created"
    d.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from neurosim.rundir import FolderLock
        FolderLock({str(d)!r}).acquire()
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(FolderLockedError) as ei:
        rundir.FolderLock(d).acquire()
    assert ei.value.pid == child.pid
    child.kill()
    child.wait()
    with rundir.FolderLock(d):          # stale file, no holder: taken over
        assert json.loads((d / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert list(d.iterdir()) == []


def test_a_second_sweep_on_one_folder_is_refused(tmp_path, scen, data, capsys):
    out = tmp_path / "sweep"
    with rundir.FolderLock(out, "sweep"):
        assert cli(["sweep", str(scen), "--out", str(out), "--data", str(data),
                    "--no-progress"]) == 2
    _clean_error(capsys.readouterr().err, "sweep folder is in use by process", str(os.getpid()))
    assert not out.exists(), "the refused sweep wrote nothing"


# -- row 2: names that would escape ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["../esc/x", "/tmp/abs-esc", "..", "a/../../b", "  ",
                                  "\u00e9t\u00e9 1"])
def test_scenario_names_stay_inside_runs(tmp_path, monkeypatch, data, scen, name, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    text = scen.read_text().replace('name = "tiny"', f"name = {json.dumps(name)}")
    path = work / "s.toml"
    path.write_text(text + "\n")
    assert cli(["run", str(path), "--data", str(data), "--no-progress",
                "--set", "training.epochs=1"]) == 0
    runs = list((work / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    import re

    assert re.fullmatch(re.escape(rundir.safe_name(name)) + r"-\d{8}-\d{6}", runs[0].name), runs
    assert sorted(p.name for p in work.iterdir()) == ["runs", "s.toml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert not Path("/tmp/abs-esc").exists()
    assert json.loads((runs[0] / "summary.json").read_text())["scenario"] == name


def test_sweep_names_stay_inside_sweeps(tmp_path, monkeypatch, data, scen, capsys):
    """The sweep's default folder is sweeps/<safe name>: shown by holding its lock."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = work / "s.toml"
    path.write_text(scen.read_text().replace('name = "tiny"', 'name = "../esc/x"'))
    with rundir.FolderLock(work / "sweeps" / "esc-x", "sweep"):
        assert cli(["sweep", str(path), "--data", str(data), "--no-progress"]) == 2
    _clean_error(capsys.readouterr().err, str(work / "sweeps" / "esc-x"), "in use by process")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


@pytest.mark.parametrize("text,expected", [("../esc/x", "esc-x"), ("/abs/p", "abs-p"),
                                           ("..", "run"), (".hidden", "hidden"),
                                           ("a b\tc", "a-b-c"), ("ok_1.2+3", "ok_1.2+3")])
def test_safe_name(text, expected):
    assert rundir.safe_name(text) == expected
    long = rundir.safe_name("x" * 500)
    assert len(long) == rundir.MAX_NAME and "/" not in long


# -- row 3: unusable paths and unreadable input ----------------------------------------------------
def test_out_at_a_regular_file(tmp_path, data, scen, capsys):
    f = tmp_path / "file"
    f.write_text("mine")
    assert cli(["run", str(scen), "--out", str(f), "--data", str(data), "--no-progress"]) == 2
    _clean_error(capsys.readouterr().err, str(f), "EEXIST", "move it or choose another path")
    assert f.read_text() == "mine"
    assert cli(["run", str(scen), "--out", str(f / "sub"), "--data", str(data),
                "--no-progress"]) == 2
    _clean_error(capsys.readouterr().err, "choose another path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_out_in_a_read_only_folder(tmp_path, data, scen, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine")
    try:
        with monkeypatch.context() as m:
            deny_writes(m, ro)
            assert cli(["run", str(scen), "--out", str(ro), "--data", str(data),
                        "--no-progress"]) == 2
            _clean_error(capsys.readouterr().err, str(ro), "EACCES", "choose another folder")
            assert cli(["run", str(scen), "--out", str(ro / "new"), "--data", str(data),
                        "--no-progress"]) == 2
            _clean_error(capsys.readouterr().err, str(ro / "new"), "EACCES")
    finally:
        restore_modes(ro)
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]


def test_data_folder_without_search_permission(tmp_path, data, scen, monkeypatch, capsys):
    import shutil

    d = tmp_path / "data"
    shutil.copytree(data, d)
    out = tmp_path / "run"
    try:
        with monkeypatch.context() as m:
            deny_search(m, d)
            assert cli(["run", str(scen), "--out", str(out), "--data", str(d),
                        "--no-progress"]) == 2
    finally:
        restore_modes(d)
    _clean_error(capsys.readouterr().err, str(d), "EACCES", "cannot read the data set")
    assert not out.exists()


def test_scenario_that_is_not_utf8_or_unreadable(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('name = "caf\u00e9"\n'.encode("latin-1"))
    assert cli(["validate", str(bad)]) == 2
    _clean_error(capsys.readouterr().err, str(bad), "not UTF-8", "byte 0xe9")
    unreadable = tmp_path / "secret.toml"
    unreadable.write_text('name = "x"\n')
    if IS_ROOT:
        import pathlib

        real = pathlib.Path.read_bytes

        def denied(self):
            if self == unreadable:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self)

        monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    else:
        unreadable.chmod(0)
    assert cli(["run", str(unreadable), "--no-progress"]) == 2
    _clean_error(capsys.readouterr().err, str(unreadable), "cannot read the scenario",
                 "Permission denied")


@pytest.mark.parametrize("where", ["file", "override"])
def test_deeply_nested_toml(tmp_path, where, capsys):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.toml"
    if where == "file":
        path.write_text(f"name = 'x'\n[model]\nname = 'pepita'\nsizes = {deep}\n")
        assert cli(["validate", str(path)]) == 2
        _clean_error(capsys.readouterr().err, str(path), "nested too deeply")
    else:
        path.write_text("[model]\nname = 'pepita'\n")
        assert cli(["validate", str(path), "--set", f"model.sizes={deep}"]) == 2
        _clean_error(capsys.readouterr().err, "--set model.sizes", "nested too deeply")


# -- row 4: the disk fills up while writing the epoch-2 checkpoint ---------------------------------
def test_disk_full_while_writing_the_epoch_2_checkpoint(tmp_path, data, scen, reference,
                                                        monkeypatch, capsys):
    """Simulated: once checkpoint 1 exists, the disk has room for half a checkpoint more.
    Epoch 2's metrics, traces and plot fit; its checkpoint does not."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to map file descriptors to paths")
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        disk = SmallDisk(m, out, "checkpoints/epoch-0001.npz", free=lambda ck: ck // 2)
        assert cli(["run", str(scen), "--out", str(out), "--data", str(data),
                    "--no-progress"]) == 2
    assert disk.failures and all(f.endswith("epoch-0002.npz.tmp") for f in disk.failures), \
        disk.failures
    ck2 = out / "checkpoints" / "epoch-0002.npz"
    _clean_error(capsys.readouterr().err, f"{ck2}: cannot write it (ENOSPC",
                 "the disk is full", "epoch 1 is kept",
                 f"continue with: neurosim run --resume {out}")
    _no_tmp(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["epoch-0001.npz"]
    info = json.loads((out / "error.json").read_text())
    assert info["error"] == "ResourceError" and "ENOSPC" in info["message"]
    assert info["last_checkpoint"].endswith("epoch-0001.npz")
    # space freed: --resume finishes with the uninterrupted run's weights
    assert cli(["run", "--resume", str(out), "--no-progress"]) == 0
    assert np.array_equal(_arena(out)[0], _arena(reference)[0])
    assert not (out / "error.json").exists()


TMPFS_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, subprocess, sys
    from pathlib import Path
    import numpy as np
    mnt, scen, data = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    out, res = mnt / "run", {}
    def run(*argv):
        r = subprocess.run([sys.executable, "-m", "neurosim.cli", *argv], capture_output=True,
                           text=True)
        return r.returncode, r.stderr
    res["first"] = run("run", scen, "--out", str(out), "--data", data, "--no-progress",
                       "--set", "training.epochs=1")
    ck = out / "checkpoints" / "epoch-0001.npz"
    st = os.statvfs(mnt)
    fill = st.f_bavail * st.f_frsize - ck.stat().st_size // 2
    with open(mnt / "filler", "wb") as f:
        f.write(b"\\0" * fill)
    res["full"] = run("run", "--resume", str(out), "--set", "training.epochs=2", "--no-progress")
    res["after_full"] = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    res["error_json"] = json.loads((out / "error.json").read_text())
    (mnt / "filler").unlink()
    res["resumed"] = run("run", "--resume", str(out), "--no-progress")
    with np.load(out / "checkpoints" / "epoch-0002.npz") as z:
        res["sha"] = hashlib.sha256(z["mem"].tobytes()).hexdigest()
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    res["ro_run"] = run("run", scen, "--out", str(mnt / "run2"), "--data", data,
                        "--no-progress")
    res["ro_report"] = run("report", str(out))
    print(json.dumps(res))
""")


@pytest.mark.slow
def test_real_full_and_read_only_file_system(tmp_path, data, scen, reference):
    """The same on a real 4 MiB tmpfs (root only, in a private mount namespace): filled to
    half a checkpoint of free space after epoch 1, then remounted read-only."""
    run = tmpfs_runner()
    if run is None:
        pytest.skip("needs root, unshare and permission to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "script.py"
    script.write_text(TMPFS_SCRIPT)
    p = run(mnt, "4m", [sys.executable, script, mnt, scen, data], capture_output=True,
            text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["first"][0] == 0, res["first"]
    rc, err = res["full"]
    assert rc == 2, err
    _clean_error(err, "epoch-0002.npz: cannot write it (ENOSPC", "epoch 1 is kept")
    assert not [n for n in res["after_full"] if n.endswith(".tmp")], res["after_full"]
    assert "checkpoints/epoch-0002.npz" not in res["after_full"]
    assert res["error_json"]["error"] == "ResourceError"
    assert res["resumed"][0] == 0, res["resumed"]
    with np.load(training.latest_checkpoint(reference)) as z:
        assert res["sha"] == hashlib.sha256(z["mem"].tobytes()).hexdigest()
    for key in ("ro_run", "ro_report"):
        rc, err = res[key]
        assert rc == 2, err
        _clean_error(err, "EROFS", "read-only")


# -- row 5: seeds beyond 64 bits -------------------------------------------------------------------
def test_seed_out_of_range_is_refused_before_work(tmp_path, data, scen, capsys):
    out = tmp_path / "run"
    for seed in ("99999999999999999999", str(2**63), "-1"):
        assert cli(["run", str(scen), "--out", str(out), "--data", str(data), "--no-progress",
                    "--set", f"training.seed={seed}"]) == 2
        _clean_error(capsys.readouterr().err, "training.seed", seed)
    assert not out.exists()
    # the largest seed works end to end: checkpoint, resume
    assert cli(["run", str(scen), "--out", str(out), "--data", str(data), "--no-progress",
                "--set", f"training.seed={2**63 - 1}", "--set", "training.epochs=1"]) == 0
    assert cli(["run", "--resume", str(out), "--set", "training.epochs=2", "--no-progress"]) == 0
    assert _arena(out)[1] == 2


def test_sweep_seeds_beyond_the_range_are_refused(tmp_path, scen, capsys):
    assert cli(["sweep", str(scen), "--seeds", "2", "--set", f"training.seed={2**63 - 1}",
                "--out", str(tmp_path / "sw")]) == 2
    _clean_error(capsys.readouterr().err, "training.seed", str(2**63))
    assert not (tmp_path / "sw").exists()


# -- row 6: memory ---------------------------------------------------------------------------------
def test_memory_estimate_is_compared_with_available_memory(monkeypatch, capsys):
    """batch_size = 100000 on the reference network needs about 21.8 GiB: refused when less is
    available (here 20 GiB of a larger machine), allowed with NEUROSIM_MEMORY_CHECK=off (checked
    on the estimate alone: nothing is allocated)."""
    monkeypatch.setattr(training, "_available_memory", lambda: 20 * 2**30)
    monkeypatch.delenv(training.MEMORY_CHECK_ENV, raising=False)
    path = REPO / "scenarios" / "pepita_mnist.toml"
    assert cli(["validate", str(path), "--set", "training.batch_size=100000"]) == 2
    _clean_error(capsys.readouterr().err, "training.batch_size", "21.8 GiB",
                 "20 GiB of memory are available now", "NEUROSIM_MEMORY_CHECK=off")
    settings = sc.load(path, ["training.batch_size=100000"])
    circuit, protocol, _, _ = sc.build(settings)
    with pytest.raises(ValidationError):
        training._check_memory(circuit, protocol, 100000)
    monkeypatch.setenv(training.MEMORY_CHECK_ENV, "off")
    training._check_memory(circuit, protocol, 100000)


def test_available_memory_reads_memavailable():
    avail = rundir.available_memory()
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert avail is not None and 0 < avail <= phys
    if Path("/proc/meminfo").is_file():
        line = [x for x in Path("/proc/meminfo").read_text().splitlines()
                if x.startswith("MemAvailable:")][0]
        # MemAvailable moves between two reads; 64 MiB apart at most on an ordinary machine
        assert abs(int(line.split()[1]) * 1024 - avail) < 2**26


# -- row 7: time steps per phase and per trial; Ctrl-C within a second -----------------------------
def test_steps_per_phase_and_per_trial_are_bounded(tmp_path, data, scen, capsys):
    time_mode = ["simulation.mode=time", 'simulation.tau="10 ms"']
    assert cli(["validate", str(scen), "--set", *time_mode[:1], "--set", time_mode[1],
                "--set", 'simulation.phase_duration="1e6 s"', "--set", 'simulation.dt="1 ms"']) == 2
    _clean_error(capsys.readouterr().err, "simulation.phase_duration", "1e+06 s",
                 "simulation.dt = 0.001 s", "1e+09 time steps per phase", "at most 20000")
    # each phase within the limit, the trial (two phases of 15 000 steps) beyond
    out = tmp_path / "run"
    assert cli(["run", str(scen), "--out", str(out), "--data", str(data), "--no-progress",
                "--set", time_mode[0], "--set", time_mode[1], "--set", 'simulation.dt="1 ms"',
                "--set", 'simulation.phase_duration="15 s"']) == 2
    _clean_error(capsys.readouterr().err, "30000 time steps", "at most 20000",
                 "simulation.dt = 0.001 s")
    assert not out.exists()


INTERRUPT_SETS = ["training.epochs=50", "training.batch_size=8", "simulation.mode=time",
                  'simulation.tau="10 ms"', 'simulation.dt="1 ms"',
                  'simulation.phase_duration="10 s"', "training.chunk=64"]


def _interrupt_after(tmp_path, data, scen, epochs_done: int, sets=INTERRUPT_SETS):
    out = tmp_path / "run"
    args = ["run", scen, "--out", out, "--data", data, "--no-progress"]
    for s in sets:
        args += ["--set", s]
    p = _cli_proc(*args)
    deadline = time.time() + 300
    if epochs_done:
        while not (out / "checkpoints" / f"epoch-{epochs_done:04d}.npz").exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.01)
    else:
        while not (out / "scenario.toml").exists():
            assert p.poll() is None and time.time() < deadline, p.communicate()
            time.sleep(0.01)
        time.sleep(0.5)
    t0 = time.perf_counter()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    return out, p.returncode, err, time.perf_counter() - t0


@pytest.mark.parametrize("epochs_done", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_ctrl_c_is_honoured_within_a_second_in_time_mode(tmp_path, data, scen, epochs_done):
    """Time mode with trials of 20 000 steps (the limit) and a chunk of 64 minibatches that
    used to be one compiled call of several seconds: SIGINT ends the process within a second,
    with error.json and a message that says truly what is kept."""
    out, rc, err, latency = _interrupt_after(tmp_path, data, scen, epochs_done)
    assert rc == 130, err
    assert latency < 1.0, f"Ctrl-C took {latency:.2f} s"
    assert "Traceback" not in err and err.startswith("neurosim: interrupted; "), err
    info = json.loads((out / "error.json").read_text())
    assert info["error"] == "KeyboardInterrupt"
    kept = training.latest_checkpoint(out)
    if kept is None:
        assert "no epoch had finished" in err and "starts it again from epoch 1" in err
    else:
        n = _arena(out)[1]
        assert n >= epochs_done
        assert (f"epoch 1 is kept" if n == 1 else f"epochs 1-{n} are kept") in err
        assert str(kept) in err
    _no_tmp(out)


def test_calls_are_sized_to_a_fraction_of_a_second(tmp_path, data, scen, monkeypatch):
    """The time-mode epoch above runs in calls of a few minibatches (about CALL_S seconds
    each), not in calls of training.chunk = 64; and the results do not depend on the sizes."""
    from neurosim import simulator

    sizes, orig = [], simulator.Simulator.train

    def train(self, X, Y=None, order=None, **kw):
        t0 = time.perf_counter()
        n = orig(self, X, Y, order, **kw)
        sizes.append((n, time.perf_counter() - t0))
        return n

    monkeypatch.setattr(simulator.Simulator, "train", train)
    settings = sc.load(scen, INTERRUPT_SETS + ["training.epochs=1", "data.train_limit=96"])
    training.run(settings, tmp_path / "a", data_dir=data, progress=False, log=lambda *a: None)
    assert sum(n for n, _ in sizes) == 96 // 8 and len(sizes) > 2
    assert max(n for n, _ in sizes) < 64     # (how long a call takes is not asserted: a timed
                                             # test fails on a loaded machine)
    monkeypatch.setattr(training, "CALL_S", 1e-9)      # one minibatch per call
    training.run(settings, tmp_path / "b", data_dir=data, progress=False, log=lambda *a: None)
    assert np.array_equal(_arena(tmp_path / "a")[0], _arena(tmp_path / "b")[0])


@pytest.mark.parametrize("mode", ["steady", "time"])
def test_sliced_evaluation_equals_one_call(data, scen, mode):
    sets = ["training.batch_size=24"] + (INTERRUPT_SETS[2:5] + ['simulation.phase_duration="0.1 s"']
                                         if mode == "time" else [])
    settings = sc.load(scen, sets)
    sim = training.make_simulator(settings)
    ds, x, y = training.load_data(settings, data)
    sim.train(ds.x_train[:96], ds.y_train[:96])
    x, y = x[:100], y[:100]                   # not a multiple of the batch
    pace = training._Pace()
    pace.per_trial = training.CALL_S / 2      # two minibatches per call
    assert training._evaluate(sim, x, y, pace) == sim.evaluate(x, y)


# -- row 8: a user's scenario.toml in --out --------------------------------------------------------
def test_a_users_own_scenario_toml_is_never_replaced(tmp_path, data, scen, capsys):
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / "scenario.toml").write_text("# my own notes\n" + scen.read_text())
    before = _snapshot(mine)
    assert cli(["run", str(mine / "scenario.toml"), "--out", str(mine), "--data", str(data),
                "--no-progress", "--set", "training.lr=1e6"]) == 2
    _clean_error(capsys.readouterr().err, "already holds scenario.toml",
                 "never replaces files it did not write")
    assert cli(["run", "--resume", str(mine), "--no-progress"]) == 2
    _clean_error(capsys.readouterr().err, "not a run directory")
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == [
        "scenario.toml"]
    for i, name in enumerate(("metrics.csv", "learning_curve.png", "checkpoints/x")):
        other = tmp_path / f"out{i}"
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_text("mine")
        assert cli(["run", str(scen), "--out", str(other), "--data", str(data),
                    "--no-progress"]) == 2
        _clean_error(capsys.readouterr().err, "already holds")
        assert (other / name).read_text() == "mine" and len(list(other.iterdir())) == 1


def test_run_files_lists_everything_a_run_writes(reference):
    """RUN_FILES (what a new run refuses to find) must cover every file a run writes."""
    top = {p.name for p in reference.iterdir()}
    assert top - {"error.json"} <= set(training.RUN_FILES), top - set(training.RUN_FILES)


# -- row 9: 10 000 epochs and more -----------------------------------------------------------------
def test_checkpoints_are_ordered_by_epoch_number(tmp_path, reference, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ck = run / "checkpoints"
    (ck / "epoch-0001.npz").rename(ck / "epoch-9999.npz")
    (ck / "epoch-0002.npz").rename(ck / "epoch-10000.npz")
    (ck / "epoch-10000.npz.tmp").write_bytes(b"half")       # left by a killed run
    (ck / "epoch-123.npz.corrupt").write_bytes(b"x")
    assert [p.name for p in training.checkpoints(run)] == ["epoch-9999.npz", "epoch-10000.npz"]
    assert training.latest_checkpoint(run).name == "epoch-10000.npz"
    assert cli(["run", "--resume", str(run), "--no-progress"]) == 0
    assert f"resumed from {ck / 'epoch-10000.npz'} (epoch 2)" in capsys.readouterr().out
    assert not (ck / "epoch-10000.npz.tmp").exists(), "a killed run's temporary file is removed"
    # rotation keeps the newest by number
    for n in (9998, 10001, 99999, 100000):
        (ck / f"epoch-{n}.npz").write_bytes(b"")
    names = [p.name for p in training.checkpoints(run)]
    assert names[-2:] == ["epoch-99999.npz", "epoch-100000.npz"], names


# -- row 10: report on bad files and read-only folders ---------------------------------------------
@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3", "null", "{bad json"])
def test_report_on_a_bad_summary_json(tmp_path, reference, content, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "summary.json").write_text(content)
    assert cli(["report", str(run)]) == 2
    _clean_error(capsys.readouterr().err, str(run / "summary.json"))
    _no_tmp(run)


def test_report_on_a_read_only_folder(tmp_path, reference, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _snapshot(run)
    try:
        with monkeypatch.context() as m:
            deny_writes(m, run)
            assert cli(["report", str(run)]) == 2
    finally:
        restore_modes(run)
    _clean_error(capsys.readouterr().err, str(run), "EACCES")
    assert _snapshot(run) == before


def test_report_of_a_sweep_ignores_unsafe_run_names(tmp_path, reference, capsys):
    """A sweep.csv naming '../../x' makes report neither read nor write outside the folder."""
    import shutil

    sw = tmp_path / "sw"
    (sw / "runs").mkdir(parents=True)
    shutil.copytree(reference, sw / "runs" / "a_seed-0")
    outside = tmp_path / "x"
    shutil.copytree(reference, outside)
    (sw / "sweep.csv").write_text("run,status,seed\na_seed-0,ok,0\n../../x,ok,0\n")
    before = _snapshot(outside)
    assert cli(["report", str(sw), "--runs"]) == 0
    assert _snapshot(outside) == before
    assert "1 row(s) of sweep.csv name no run folder" in (sw / "report.md").read_text()


# -- row 11: a divergence in the first epoch writes error.json (tests/test_divergence.py) ----------
# -- the building blocks ---------------------------------------------------------------------------
def test_atomic_write_removes_its_temporary_file_on_any_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    real = os.write

    def full(fd, data):
        real(fd, bytes(data)[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", full)
        with pytest.raises(ResourceError) as ei:
            rundir.atomic_write_bytes(target, b"new content")
    assert ei.value.where == str(target) and "ENOSPC" in ei.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert target.read_bytes() == b"old"

    def interrupted(fd, data):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(os, "write", interrupted)
        with pytest.raises(KeyboardInterrupt):
            rundir.atomic_write_bytes(target, b"new", unique=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    rundir.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_os_errors_become_resource_errors_with_a_hint():
    for code in (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.ENOTDIR, errno.EDQUOT):
        e = rundir.os_error(OSError(code, os.strerror(code), "/some/file"))
        assert isinstance(e, ResourceError) and e.where == "/some/file"
        assert errno.errorcode[code] in e.message and e.hint


def test_a_closed_output_pipe_ends_quietly(tmp_path, monkeypatch, scen, capsys):
    """``neurosim validate ... | head -0``: exit code 1, no traceback, no error message."""
    class Closed:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

        def flush(self):
            pass

        def fileno(self):          # an in-memory stream (the test's fd 1 stays untouched)
            import io

            raise io.UnsupportedOperation("fileno")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert cli(["validate", str(scen)]) == 1
    assert capsys.readouterr().err == ""


def test_check_inside():
    root = Path("runs")
    assert rundir.check_inside(root / "a-1", root, "name") == (root / "a-1").resolve()
    with pytest.raises(ValidationError, match="outside"):
        rundir.check_inside(root / ".." / "x", root, "name")


# -- report on damaged run directories: a clean error or a report, never a traceback ---------------
def _damaged_contents():
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                        st.floats(allow_nan=True), st.text(max_size=20))
    json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                            st.dictionaries(st.text(max_size=12),
                                                                            c, max_size=4)),
                               max_leaves=12)
    summary_like = st.dictionaries(st.sampled_from(["scenario", "epochs_done", "n_train",
                                                    "final_test_accuracy", "slowness", "complete",
                                                    "model", "wall_s"]), json_values, max_size=6)
    csv_cell = st.one_of(st.sampled_from(["", "nan", "inf", "-1", "1e400", "x", "3"]),
                         st.integers(-5, 5).map(str))
    csv_text = st.lists(st.lists(csv_cell, min_size=1, max_size=8), min_size=1, max_size=5).map(
        lambda rows: "epoch,test_accuracy,train_accuracy,lr,samples_per_s\n"
        + "\n".join(",".join(r) for r in rows) + "\n")
    return st.one_of(
        st.tuples(st.just("summary.json"), st.one_of(json_values, summary_like).map(json.dumps)),
        st.tuples(st.just("error.json"), st.one_of(json_values, summary_like).map(json.dumps)),
        st.tuples(st.just("metrics.csv"), st.one_of(csv_text, st.text(max_size=80))),
        st.tuples(st.sampled_from(["traces.npz", "summary.json", "metrics.csv", "scenario.toml"]),
                  st.binary(max_size=64)))


def test_report_on_damaged_run_directories(tmp_path_factory, reference):
    """Random damage to the files report reads: exit 0 or 2, never an exception."""
    import shutil

    from hypothesis import HealthCheck, given, settings

    from neurosim import report as rp

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(damage=_damaged_contents())
    def check(damage):
        run = tmp_path_factory.mktemp("damaged") / "run"
        shutil.copytree(reference, run)
        name, content = damage
        (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        rc = cli(["report", str(run)])
        assert rc in (0, 2)
        _no_tmp(run)

    real = {n: getattr(rp, n) for n in ("plot_learning", "plot_scalar_series", "plot_traces")}

    def drawn(fn):   # the data reach the real plotting code once per kind, then a cheap stand-in
        seen = set()

        def plot(path, *a, **k):
            if path.name not in seen:
                seen.add(path.name)
                return fn(path, *a, **k)
            path.write_bytes(b"\x89PNG")
            return path
        return plot

    try:
        for n, fn in real.items():
            setattr(rp, n, drawn(fn))
        check()
    finally:
        for n, fn in real.items():
            setattr(rp, n, fn)
