"""Checkpoints and resumption (issue 6, part 2).

The key test kills a real ``neurosim run`` process with SIGKILL in the middle of an epoch and
resumes it with ``neurosim run --resume DIR``: the final weights (the whole arena: weights,
momentum, held traces), the monitor traces and the metrics must be bit-identical to an
uninterrupted run of the same seed. It relies on the claim that no RNG state needs saving
(dropout masks and shuffling are counter-based, keyed by seed, trial and epoch), which is also
checked directly below.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from _tinyrun import write_tiny_scenario
from neurosim import ValidationError
from neurosim import scenario as sc
from neurosim import training
from neurosim.cli import main as cli

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return write_tiny_scenario(tmp_path_factory.mktemp("scen"), epochs=3)


def _mem(run_dir, epoch=None):
    ck = (Path(run_dir) / "checkpoints" / f"epoch-{epoch:04d}.npz" if epoch else
          training.latest_checkpoint(Path(run_dir)))
    with np.load(ck) as z:
        return {k: z[k] for k in z.files}


def _traces(run_dir):
    with np.load(Path(run_dir) / "traces.npz") as z:
        return {k: z[k] for k in z.files}


def _metrics(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data, scen):
    """An uninterrupted 3-epoch run, chunked into 2-minibatch calls like the killed one."""
    out = tmp_path_factory.mktemp("ref") / "run"
    settings = sc.load(scen, ["training.chunk=2"])
    training.run(settings, out, data_dir=data, progress=False, log=lambda *a: None)
    return out


# A `neurosim run` that SIGKILLs itself: after the K-th chunk of minibatches of epoch E (so in
# the middle of the epoch, with the arena half-updated), or right after writing the temporary
# file of checkpoint E (before its rename).
KILLER = textwrap.dedent("""
    import os, signal, sys
    import neurosim.simulator as S, neurosim.training as T
    mode, epoch, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    trials_per_epoch = int(sys.argv[4])
    if mode == "train":
        orig = S.Simulator.train
        def train(self, *a, **kw):
            progress = kw.get("progress")
            def hook(n):
                if progress: progress(n)
                if self.trial >= (epoch - 1) * trials_per_epoch + k * 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            kw["progress"] = hook
            return orig(self, *a, **kw)
        S.Simulator.train = train
    else:
        orig = T._atomic_write_bytes
        def write(path, data):
            if path.name == f"epoch-{epoch:04d}.npz":
                with open(path.with_name(path.name + ".tmp"), "wb") as f:
                    f.write(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(path, data)
        T._atomic_write_bytes = write
    from neurosim.cli import main
    sys.exit(main(sys.argv[5:]))
""")


def _killed_run(tmp_path, scen, data, mode, epoch, k):
    out = tmp_path / "run"
    trials = -(-384 // 32)
    p = subprocess.run([sys.executable, "-c", KILLER, mode, str(epoch), str(k), str(trials),
                        "run", str(scen), "--out", str(out), "--data", str(data),
                        "--set", "training.chunk=2", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr[-2000:])
    return out


def _assert_identical(a, b):
    ma, mb = _mem(a), _mem(b)
    assert int(ma["epoch"]) == int(mb["epoch"]) == 3
    assert ma["mem"].dtype == np.float32
    assert np.array_equal(ma["mem"].view(np.uint32), mb["mem"].view(np.uint32)), \
        "final arena (weights, momentum, traces) differs"
    for k in ("trial", "step", "rng_keys"):
        assert np.array_equal(ma[k], mb[k]), k
    ta, tb = _traces(a), _traces(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert np.array_equal(ta[k], tb[k], equal_nan=True), k
    sa, sb = _metrics(a), _metrics(b)
    for k in ("final_test_accuracy", "best_test_accuracy", "final_train_accuracy_running",
              "epochs_done"):
        assert sa[k] == sb[k], k


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, data, scen, reference):
    out = _killed_run(tmp_path, scen, data, "train", epoch=2, k=3)   # 3 of 6 chunks of epoch 2
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cks == ["epoch-0001.npz"], cks              # killed in epoch 2, after 6 of 12 trials
    assert len((out / "metrics.csv").read_text().splitlines()) == 2
    assert cli(["run", "--resume", str(out), "--no-progress"]) == 0   # no --data: recorded
    _assert_identical(out, reference)
    assert not (out / "error.json").exists()


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint(tmp_path, data, scen, reference):
    """Killed between writing checkpoint 2's temporary file and renaming it: the half-written
    .tmp is ignored, epoch 2 is redone from checkpoint 1, and the result is still identical."""
    out = _killed_run(tmp_path, scen, data, "checkpoint", epoch=2, k=0)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["epoch-0001.npz", "epoch-0002.npz.tmp"], names
    assert training.latest_checkpoint(out).name == "epoch-0001.npz"
    assert cli(["run", "--resume", str(out), "--no-progress"]) == 0
    _assert_identical(out, reference)


def test_resume_with_more_epochs_equals_a_longer_run(tmp_path, data, scen, reference):
    out = tmp_path / "run"
    s1 = sc.load(scen, ["training.chunk=2", "training.epochs=1"])
    training.run(s1, out, data_dir=data, progress=False, log=lambda *a: None)
    assert cli(["run", "--resume", str(out), "--set", "training.epochs=3", "--no-progress"]) == 0
    _assert_identical(out, reference)
    assert "epochs = 3" in (out / "scenario.toml").read_text()


def test_rng_state_is_seed_trial_and_epoch(tmp_path, data, scen, reference):
    """The claim behind the small checkpoint: nothing random depends on hidden generator
    state. A fresh process-like simulator, loaded from checkpoint 1 after the global numpy RNG
    and a throw-away simulator have been used, trains epochs 2-3 to the same arena."""
    settings = sc.load(scen, ["training.chunk=5"])     # another chunking, too
    np.random.seed(123)
    np.random.random(1000)
    throwaway = training.make_simulator(settings)
    ds, _, _ = training.load_data(settings, data)
    throwaway.train(ds.x_train, ds.y_train)
    sim = training.make_simulator(settings)
    epoch, _ = training.load_checkpoint(reference / "checkpoints" / "epoch-0002.npz", sim, settings)
    assert epoch == 2
    from neurosim.simulator import shuffled_order

    sim.set_lr(sim.plan.optimizer.lr_at(2))
    sim.train(ds.x_train, ds.y_train, shuffled_order(0, 2, ds.x_train.shape[0]), chunk=5)
    # weights and momenta (the rest of the arena also holds the last evaluation's rates)
    ref = training.make_simulator(settings)
    ref.mem[...] = _mem(reference)["mem"]
    names = [n for n in sim.plan.buffer_index if n.endswith((".W", ".V"))]
    assert len(names) >= 4
    for n in names:
        assert np.array_equal(sim.buffer(n).view(np.uint32), ref.buffer(n).view(np.uint32)), n
    # dropout keys are derived from the seed: another seed, other keys
    other = training.make_simulator(sc.load(scen, ["training.seed=1"]))
    assert not np.array_equal(other.plan.keys, sim.plan.keys)


def test_checkpoints_of_the_previous_format_still_resume(tmp_path, reference):
    """Checkpoints written before format 2 (no arena hash, no RNG keys, hash over all settings
    without data.verify) are accepted."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    settings = sc.load(run / "scenario.toml")
    for ck in (run / "checkpoints").glob("*.npz"):
        with np.load(ck) as z:
            arrays = {k: z[k] for k in z.files if k not in ("format", "mem_sha256", "rng_seed",
                                                            "rng_keys", "lr")}
        arrays["scenario_hash"] = np.frombuffer(training._legacy_hash(settings).encode(),
                                                np.uint8)
        with open(ck, "wb") as f:
            np.savez(f, **arrays)
    sim = training.make_simulator(settings)
    epoch, metrics = training.load_checkpoint(training.latest_checkpoint(run), sim, settings)
    assert epoch == 3 and len(metrics) == 3
    assert np.array_equal(sim.mem, _mem(reference)["mem"])


def test_checkpoint_contents_and_rotation(reference):
    ck = reference / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["epoch-0002.npz", "epoch-0003.npz"]
    z = _mem(reference)
    for key in ("format", "mem", "mem_sha256", "trial", "step", "epoch", "rng_seed", "rng_keys",
                "lr", "metrics", "scenario_hash"):
        assert key in z, key
    assert any(k.startswith("rec_values:angle:F") for k in z)
    assert int(z["trial"]) == 3 * 12
    assert len(json.loads(bytes(z["metrics"]).decode())) == 3
    assert not list(reference.rglob("*.tmp"))


# -- corrupt or foreign checkpoints: rejected with a clear message, nothing overwritten ---------
def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _corrupt_truncate(p):
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 3])


def _corrupt_garbage(p):
    p.write_bytes(b"this is not a checkpoint" * 10)


def _corrupt_flip(p):
    """Flip bytes inside the stored arena (zip CRC or the arena SHA-256 catches it)."""
    b = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as z:
        info = z.getinfo("mem.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    for i in range(start, start + 16):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


def _corrupt_member(p):
    """A well-formed npz whose arena was replaced (CRC fine, SHA-256 not)."""
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["mem"] = arrays["mem"].copy()
    arrays["mem"][:5] += 1.0
    np.savez(p, **arrays)


def _corrupt_missing_key(p):
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files if k != "trial"}
    with open(p, "wb") as f:
        np.savez(f, **arrays)


def _corrupt_empty(p):
    p.write_bytes(b"")


CORRUPTIONS = [_corrupt_truncate, _corrupt_garbage, _corrupt_flip, _corrupt_member,
               _corrupt_missing_key, _corrupt_empty]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__[9:])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, corrupt,
                                                                  capsys):
    """The latest checkpoint (epoch 3) is corrupt: --resume says so, moves it aside untouched
    to epoch-0003.npz.corrupt, resumes from epoch 2 and recomputes epoch 3 bit-identically."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    ck = training.latest_checkpoint(run)
    assert ck.name == "epoch-0003.npz"
    corrupt(ck)
    damaged = ck.read_bytes()
    assert cli(["run", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {ck} is unusable" in out and ("corrupt" in out or "truncated" in out)
    assert "previous intact checkpoint" in out and "epoch-0002.npz (epoch 2)" in out, out
    assert (run / "checkpoints" / "epoch-0003.npz.corrupt").read_bytes() == damaged
    _assert_identical(run, reference)
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__[9:])
def test_no_intact_checkpoint_is_rejected_and_nothing_is_overwritten(tmp_path, reference,
                                                                     corrupt, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for ck in training.checkpoints(run):
        corrupt(ck)
    ck = training.latest_checkpoint(run)
    before = _snapshot(run)
    assert cli(["run", "--resume", str(run), "--set", "training.epochs=4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(ck) in err and ("corrupt" in err or "truncated" in err), err
    assert "No intact checkpoint is left (all 2 are corrupt)" in err and "delete it" in err
    assert _snapshot(run) == before


def test_checkpoint_of_another_scenario_is_rejected(tmp_path, reference, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _snapshot(run)
    assert cli(["run", "--resume", str(run), "--set", "training.lr=0.5",
                "--set", "training.epochs=4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another scenario" in err
    assert _snapshot(run) == before
    # and with the API: another seed means other RNG keys and another hash
    settings = sc.load(run / "scenario.toml", ["training.seed=5"])
    with pytest.raises(ValidationError, match="another scenario"):
        training.load_checkpoint(training.latest_checkpoint(run), training.make_simulator(settings),
                                 settings)


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert cli(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_new_run_refuses_an_existing_run_dir(tmp_path, reference, scen, data, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = _snapshot(run)
    assert cli(["run", str(scen), "--out", str(run), "--data", str(data), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _snapshot(run) == before
