"""Running a scenario: data, epochs, evaluation, metrics, checkpoints, plots.

A run directory holds ``scenario.toml`` (resolved), ``metrics.csv`` (one row per epoch),
``summary.json``, ``traces.npz`` (monitor traces), ``learning_curve.png`` and
``checkpoints/epoch-NNNN.npz`` (the last ``training.keep_checkpoints``, each written to a
temporary file and renamed, so a killed run never leaves a half-written checkpoint).

``metrics.csv`` has two training accuracies that must not be confused:
``train_accuracy_running`` is counted while the epoch trains (each minibatch classified by the
training pass, with dropout, by weights that change during the epoch), and
``train_accuracy_eval`` is a separate evaluation after the epoch, like the test accuracy (no
dropout, no plasticity), on the first ``training.train_eval`` training samples (off by default:
NaN). Monitor intervals written in epochs (``every = "0.1 epoch"``) are resolved to whole
minibatches from the training-set size (:func:`neurosim.scenario.resolve_intervals`).

Checkpoints and bit-identical resumption
----------------------------------------
A checkpoint is written after every successful epoch (never after a failed one) and holds the
whole float32 arena of the compiled plan (weights, optimizer momentum, held rates, dropout masks,
monitor scratch), the trial and time-step counters, the epoch, the monitor records, the metrics
rows, a hash of the result-relevant settings, the SHA-256 of the arena and the RNG state.

The RNG state is small because nothing random is drawn from a stateful generator while
training: weight initialisation happens at compile time from ``(seed, "init:<projection>")``;
dropout masks and other in-kernel draws are a pure function of ``(key, trial, row, unit)`` with
keys derived from ``(seed, component name)`` (:mod:`neurosim.kernels.rng`); the training order
of an epoch is a permutation drawn from ``(seed, "shuffle:<epoch>")``
(:func:`~neurosim.simulator.shuffled_order`). So the seed, the counter-RNG keys
(``rng_keys``, checked on resume) and the trial counter *are* the RNG state. A run killed at
any point and resumed with ``neurosim run --resume DIR`` ends with weights bit-identical to an
uninterrupted run of the same seed (``tests/test_resume.py``).

Failures
--------
A divergence (NaN/inf rates or weights, or a weight beyond ``training.max_weight``) raises
:class:`~neurosim.errors.SimulationError` naming the epoch, phase, step, population or
projection, with a hint. A full disk, a permission or a read-only file system raises
:class:`~neurosim.errors.ResourceError` naming the path; Ctrl-C raises ``KeyboardInterrupt``
whose text says what was kept. In every case the checkpoints already written stay untouched,
temporary files are removed and, once the run directory holds its ``scenario.toml``, it gets
``error.json`` and can be continued with ``neurosim run --resume`` (from epoch 1 if no epoch
finished). A run that fails before writing anything removes the folders it created.

The run directory is locked for the run's lifetime and a new run never replaces files it did
not write (:mod:`neurosim.rundir`, ``docs/runs.md``).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from . import rundir
from . import scenario as sc
from .compiler import compile_plan
from .errors import (DataError, NeurosimError, NeurosimWarning, ResourceError, SimulationError,
                     ValidationError)
from .diagnostics import GradientAlignment
from .monitors import Monitor
from .plasticity.optim import SGD
from .simulator import Simulator, shuffled_order

METRIC_FIELDS = ["epoch", "test_accuracy", "train_accuracy_running", "train_accuracy_eval", "lr",
                 "samples_per_s", "wall_s", "epoch_s"]
MIN_TRACE_POINTS = 3
"""A monitor that would record fewer points than this over a whole run draws a warning."""

#: The files and folders a run writes into its directory (a new run refuses a folder that holds
#: any of them; ``--resume`` removes their stale ``.tmp`` files).
RUN_FILES = ("scenario.toml", "metrics.csv", "summary.json", "traces.npz", "learning_curve.png",
             "error.json", "checkpoints")

#: Target duration in seconds of one compiled call while training or evaluating: Python (and so
#: Ctrl-C) is entered between calls, which are sized from the measured time per minibatch.
CALL_S = 0.25

#: Memory check override: ``NEUROSIM_MEMORY_CHECK=off`` skips the comparison of the arena
#: estimate with the available memory.
MEMORY_CHECK_ENV = "NEUROSIM_MEMORY_CHECK"


def make_simulator(settings: dict) -> Simulator:
    """Build and compile the scenario's circuit; returns a ready Simulator.

    Errors raised by the descriptions are reported under scenario key paths (``monitor[1].phase``,
    ``simulation.dt``, ``model.sizes``) rather than the engine's object names. Monitor intervals
    still in epochs are resolved for the nominal training-set size
    (:func:`neurosim.scenario.with_trial_intervals`)."""
    settings = sc.with_trial_intervals(settings)
    try:
        circuit, protocol, rules, output = sc.build(settings)
    except ValidationError as e:
        raise _scenario_error(e) from None
    tr = settings["training"]
    opt = SGD(lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
              style=tr["optimizer"], milestones=tuple(tr["milestones"]), gamma=tr["gamma"],
              max_weight=tr["max_weight"], schedule=tr["schedule"], epochs=tr["epochs"],
              decay_start=tr["decay_start"])
    mons = []
    for i, m in enumerate(settings["monitor"]):
        try:
            if m["target"].startswith("grad_angle:"):
                # the standard gradient-alignment diagnostic: angle of the rule's update of the
                # projection with the exact BP gradient of the clean pass, once per `every` trials
                mons.append(GradientAlignment(m["target"].split(":", 1)[1], every=m["every"],
                                              phase=m["phase"] or "clean", name=m["name"]))
            else:
                mons.append(Monitor(m["target"], phase=m["phase"], every=m["every"],
                                    per=m["per"], units=tuple(m["units"]) if m["units"] else None,
                                    sample=m["sample"], name=m["name"],
                                    synapses=m.get("synapses")))
        except ValidationError as e:
            raise _monitor_error(e, i) from None
    _check_steps(protocol, settings)
    _check_memory(circuit, protocol, tr["batch_size"])
    try:
        plan = compile_plan(circuit, protocol, rules=rules, optimizer=opt, monitors=mons,
                            batch=tr["batch_size"], seed=tr["seed"], output=output)
    except ValidationError as e:
        if e.where.startswith(("Monitor(", "GradientAlignment(")):
            hits = [k for k, m in enumerate(mons) if e.where.startswith(_monitor_where(m))]
            if len(hits) > 1:  # several monitors of one target: find the one that fails alone
                hits = [k for k in hits if _fails_alone(circuit, protocol, rules, opt, mons[k],
                                                        tr, output)] or hits
            if hits:
                raise _monitor_error(e, hits[0]) from None
        raise _scenario_error(e) from None
    return Simulator(plan, threads=tr["threads"], backend=tr["backend"])


def _monitor_where(m) -> str:
    """How a monitor's compile errors name it."""
    if isinstance(m, GradientAlignment):
        return f"GradientAlignment({m.projection!r})"
    return f"Monitor({m.target!r})"


def _fails_alone(circuit, protocol, rules, opt, mon, tr, output) -> bool:
    try:
        compile_plan(circuit, protocol, rules=rules, optimizer=opt, monitors=[mon],
                     batch=tr["batch_size"], seed=tr["seed"], output=output)
    except ValidationError:
        return True
    return False


_SCENARIO_SECTIONS = ("model", "data", "training", "simulation", "monitor", "scenario", "--set",
                      "name", "description")
_ENGINE_TO_KEY = (("Protocol.dt", "simulation.dt"), ("Protocol.mode", "simulation.mode"),
                  ("Protocol.method", "simulation.method"), (".duration", "simulation.phase_duration"),
                  (".tau", "simulation.tau"), (".dropout", "model.dropout"),
                  ("compile.batch", "training.batch_size"), ("SGD.", "training"),
                  (".sizes", "model.sizes"), (".size", "model.sizes"))


def _scenario_error(e: ValidationError) -> ValidationError:
    """Re-label an engine ValidationError with the scenario key that caused it."""
    where = e.where
    if where.split(".")[0].split("[")[0] in _SCENARIO_SECTIONS:
        return e
    for pattern, key in _ENGINE_TO_KEY:
        if pattern in where:
            if key == "training":
                key = "training." + where.split("SGD.", 1)[1].split("[")[0]
            return ValidationError(key, f"{e.message} ({where})", e.hint)
    return ValidationError("model", f"{where}: {e.message}", e.hint)


def _monitor_error(e: ValidationError, i: int) -> ValidationError:
    attr = e.where.rsplit(").", 1)[1] if ")." in e.where else "target"
    return ValidationError(f"monitor[{i}].{attr}", e.message, e.hint)


def _check_steps(protocol, settings) -> None:
    """Refuse, before compiling, a protocol whose trials take more time steps than
    :data:`neurosim.scenario.MAX_STEPS_PER_TRIAL` (a trial is never split between compiled
    calls, so its length bounds how late Ctrl-C and progress are honoured)."""
    if protocol.mode != "time":
        return
    steps = {ph.name: protocol.n_steps(ph) for ph in protocol.phases}
    total = sum(steps.values())
    if total > sc.MAX_STEPS_PER_TRIAL:
        dt = settings["simulation"]["dt"]
        raise ValidationError("simulation.phase_duration", f"the {len(steps)} phases of a trial "
                              f"take {total} time steps at simulation.dt = {dt:g} s ("
                              + ", ".join(f"{k}: {v}" for k, v in steps.items())
                              + f"); at most {sc.MAX_STEPS_PER_TRIAL} are allowed per trial, "
                              "so that a trial takes about a second or less.",
                              "shorten simulation.phase_duration or raise simulation.dt.")


def _available_memory() -> int | None:
    return rundir.available_memory()


def _check_memory(circuit, protocol, batch: int) -> None:
    """Refuse, before allocating anything, a circuit whose arena does not fit in the memory
    available now (``MemAvailable``), unless ``NEUROSIM_MEMORY_CHECK=off``."""
    if os.environ.get(MEMORY_CHECK_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return
    weights = sum(a * b for a, b in (circuit.shape_of(p) for p in circuit.projections.values()))
    units = sum(p.size for p in circuit.populations.values())
    need = 4 * (4 * weights + 4 * (2 * len(protocol.phases) + 4) * units * batch)
    limit = _available_memory()
    if limit is not None and need > limit:
        raise ValidationError("training.batch_size" if 4 * 4 * weights < limit else "model",
                              f"the compiled circuit needs about {need / 2**30:.3g} GiB "
                              f"({weights} weights, {units} units x batch {batch}); "
                              f"{limit / 2**30:.3g} GiB of memory are available now.",
                              f"lower training.batch_size or the population sizes, or free "
                              f"memory; if you know it fits (the estimate is an upper bound), "
                              f"set {MEMORY_CHECK_ENV}=off to skip this check.")


# Settings that do not change what a run computes: a run may be resumed with other values
# (e.g. more epochs, another data folder, more BLAS threads).
_NOT_HASHED = {"name": None, "description": None, "data": ("dir", "verify"),
               "training": ("epochs", "keep_checkpoints", "eval_every", "chunk", "threads",
                            "backend", "train_eval")}


def scenario_hash(settings: dict) -> str:
    """Hash of the settings that determine a run's results (see ``_NOT_HASHED``)."""
    s = copy.deepcopy(settings)
    for key, sub in _NOT_HASHED.items():
        if sub is None:
            s.pop(key, None)
        elif isinstance(s.get(key), dict):
            for k in sub:
                s[key].pop(k, None)
    return hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _legacy_hash(settings: dict) -> str:
    """The hash of checkpoints written by neurosim <= 0.1.0 (all settings, before
    ``data.verify`` existed), so that such runs can still be resumed."""
    s = copy.deepcopy(settings)
    if isinstance(s.get("data"), dict):
        s["data"].pop("verify", None)
    return hashlib.sha256(json.dumps(s, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, data: bytes):
    """Temporary file + fsync + rename (:func:`neurosim.rundir.atomic_write_bytes`)."""
    rundir.atomic_write_bytes(path, data)


def _atomic_write_text(path: Path, text: str):
    _atomic_write_bytes(path, text.encode())


CHECKPOINT_FORMAT = 2


class CorruptCheckpointError(ValidationError):
    """A checkpoint that cannot be read or fails its own checks (truncated, bit flips, missing
    members); ``--resume`` then falls back to the previous checkpoint."""


def save_checkpoint(path: Path, sim: Simulator, epoch: int, metrics: list, settings: dict):
    """Write a checkpoint atomically (temporary file + fsync + rename)."""
    state = sim.state_dict()
    mem = state["mem"]
    arrays = {"format": np.int64(CHECKPOINT_FORMAT), "mem": mem,
              "mem_sha256": np.frombuffer(hashlib.sha256(mem.tobytes()).hexdigest().encode(),
                                          np.uint8),
              "trial": np.int64(state["trial"]), "step": np.int64(state["step"]),
              "epoch": np.int64(epoch),
              "rng_seed": np.int64(settings["training"]["seed"]),
              "rng_keys": np.asarray(sim.plan.keys, np.uint64),
              "lr": np.float64(sim.plan.optimizer.lr_at(max(epoch - 1, 0))
                               if sim.plan.optimizer is not None else math.nan),
              "metrics": np.frombuffer(json.dumps(metrics).encode(), np.uint8),
              "scenario_hash": np.frombuffer(scenario_hash(settings).encode(), np.uint8)}
    for k, chunks in state["records"].items():
        if chunks:
            arrays[f"rec_values:{k}"] = np.concatenate([c[0] for c in chunks])
            arrays[f"rec_stamps:{k}"] = np.concatenate([c[1] for c in chunks])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, sim: Simulator, settings: dict) -> tuple[int, list]:
    """Restore a checkpoint into ``sim``; returns (epochs done, metrics rows).

    Everything is read and checked before ``sim`` is touched; a corrupt, truncated or foreign
    checkpoint raises :class:`ValidationError` naming the file."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            data = {k: z[k] for k in files}     # reads (and CRC-checks) every member
    except Exception as e:  # zip/npz corruption, truncated file, unreadable
        raise CorruptCheckpointError(where, f"cannot read the checkpoint ({type(e).__name__}: "
                                     f"{e}); it is corrupt or truncated.",
                                     "delete it to resume from the previous checkpoint, if "
                                     "any.") from None
    try:
        h = bytes(data["scenario_hash"]).decode()
        if h not in (scenario_hash(settings), _legacy_hash(settings)):
            raise ValidationError(where, "the checkpoint belongs to another scenario (its settings "
                                  "hash differs).",
                                  "resume with the run directory's own scenario.toml; only "
                                  "training.epochs and similar bookkeeping keys may change.")
        mem = data["mem"]
        if mem.dtype != np.float32 or mem.ndim != 1:
            raise ValueError(f"arena of dtype {mem.dtype} and shape {mem.shape}")
        if "mem_sha256" in data:
            want = bytes(data["mem_sha256"]).decode()
            if hashlib.sha256(mem.tobytes()).hexdigest() != want:
                raise ValueError("the arena's SHA-256 does not match the one recorded")
        if "rng_keys" in data and not np.array_equal(data["rng_keys"],
                                                     np.asarray(sim.plan.keys, np.uint64)):
            raise ValidationError(where, "the checkpoint's random-number keys differ from this "
                                  "scenario's (another seed or circuit).",
                                  "resume with the run directory's own scenario.toml.")
        epoch, trial, step = int(data["epoch"]), int(data["trial"]), int(data["step"])
        metrics = json.loads(bytes(data["metrics"]).decode())
        if not isinstance(metrics, list) or len(metrics) != epoch or epoch < 0 or trial < 0 \
                or step < 0:
            raise ValueError(f"inconsistent epoch {epoch} / trial {trial} / {len(metrics)} "
                             "metrics rows")
        records = {}
        for key in files:
            if key.startswith("rec_values:"):
                name = key.split(":", 1)[1]
                records[name] = [(data[key], data[f"rec_stamps:{name}"])]
    except ValidationError:
        raise
    except Exception as e:  # missing keys, wrong types, bad JSON, hash mismatch
        raise CorruptCheckpointError(where, f"the checkpoint is corrupt ({type(e).__name__}: "
                                     f"{e}).", "delete it to resume from the previous "
                                     "checkpoint, if any.") from None
    try:
        sim.load_state_dict({"mem": mem, "trial": trial, "step": step, "records": records})
    except ValidationError as e:
        raise ValidationError(where, e.message, e.hint) from None
    return epoch, metrics


_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)\.npz")


def checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints of a run directory, oldest first (ordered by epoch number, so that
    ``epoch-10000.npz`` follows ``epoch-9999.npz``)."""
    found = []
    for p in Path(run_dir, "checkpoints").glob("epoch-*.npz"):
        m = _CHECKPOINT_NAME.fullmatch(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path):
    ck = checkpoints(run_dir)
    return ck[-1] if ck else None


def load_data(settings: dict, data_dir=None):
    from .datasets import load_dataset

    d = settings["data"]
    try:
        ds = load_dataset(d["dataset"], data_dir=data_dir or d["dir"],
                          train_limit=d["train_limit"], verify=d.get("verify", True))
    except ValidationError as e:
        if e.where == "load_dataset.train_limit":
            raise ValidationError("data.train_limit", e.message, e.hint) from None
        raise
    except OSError as e:  # e.g. a data folder without read or search permission
        err = rundir.os_error(e, e.filename or data_dir or d["dir"], "read the data set")
        raise DataError(err.where, err.message, err.hint) from None
    x_test, y_test = ds.x_test, ds.y_test
    if d["test_limit"]:
        x_test, y_test = x_test[: d["test_limit"]], y_test[: d["test_limit"]]
    return ds, x_test, y_test


def simulator_for(settings: dict, n_train: int | None = None) -> Simulator:
    """The scenario's Simulator, made by its model's factory if it registered one
    (:func:`neurosim.scenario.register_model`), else by :func:`make_simulator`. Monitor
    intervals in epochs are resolved for ``n_train`` training samples (default: the nominal
    size, :func:`neurosim.scenario.nominal_train_size`)."""
    return _build(sc.simulator_for(settings) or make_simulator, settings, n_train)


def _build(factory, settings: dict, n_train: int | None) -> Simulator:
    """``factory`` on the settings with trial intervals; the builders' own warnings about bare
    numbers of seconds are silenced (the scenario keys were checked when it was loaded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sc.BareTimeWarning)
        sim = factory(sc.with_trial_intervals(settings, n_train))
    if factory is not make_simulator:        # make_simulator checks before compiling
        _check_steps(sim.plan.protocol, settings)
    return sim


def check_trace_lengths(sim: Simulator, settings: dict, n_train: int) -> list:
    """Warn (:class:`~neurosim.errors.NeurosimWarning`) about every monitor that records fewer
    than :data:`MIN_TRACE_POINTS` points over the whole run; returns the messages."""
    per_epoch = math.ceil(n_train / settings["training"]["batch_size"])
    trials = settings["training"]["epochs"] * per_epoch
    steps = trials * getattr(sim.plan.train, "steps_per_trial", 1)
    written = {m["name"] or m["target"]: m["every"] for m in settings.get("monitor", ())}
    notes = []
    for meta in getattr(sim.plan, "monitor_meta", ()):
        every, per = meta.get("every", 1), meta.get("per", "trial")
        n = (steps if per == "step" else trials)
        points = (n - 1) // every + 1 if n > 0 else 0
        if points < MIN_TRACE_POINTS:
            asked = written.get(meta["key"], written.get(meta["key"].split("@")[0], every))
            unit = "time steps" if per == "step" else "minibatches"
            given = f" (every = {asked!r})" if isinstance(asked, str) else ""
            notes.append(f"monitor {meta['key']!r} records every {every} {unit}{given}, so "
                         f"{points} point(s) in this run of "
                         f"{settings['training']['epochs']} epoch(s) x {per_epoch} minibatches. "
                         "Give every in epochs (e.g. every = \"0.1 epoch\") or lower it.")
    for text in notes:
        warnings.warn(text, NeurosimWarning, stacklevel=2)
    return notes


def run(settings: dict, out_dir, *, data_dir=None, resume: bool = False, progress: bool = True,
        log=print, simulator_factory=None) -> dict:
    """Run a validated scenario into ``out_dir``; returns the summary dict.

    Everything that can be checked (scenario, circuit, data) is checked before anything is
    written. The run then locks ``out_dir`` (:class:`neurosim.rundir.FolderLock`; another
    writer gets :class:`~neurosim.errors.FolderLockedError`) and, for a new run, refuses a
    folder holding any of :data:`RUN_FILES`. With ``resume``, training continues from the last
    intact checkpoint in ``out_dir`` (from scratch if there is none; a corrupt latest
    checkpoint is moved aside to ``*.corrupt`` and the previous one used, saying so).
    ``simulator_factory(settings)`` replaces the model's factory (:func:`simulator_for`)."""
    out = Path(out_dir)
    factory = simulator_factory or sc.simulator_for(settings) or make_simulator
    # validates the whole circuit before any I/O (epoch intervals for the nominal data size)
    nominal = sc.nominal_train_size(settings)
    sim = _build(factory, settings, nominal)
    ds, x_test, y_test = load_data(settings, data_dir)
    n_train = int(ds.x_train.shape[0])
    if n_train != nominal and sc.has_epoch_intervals(settings):
        sim = _build(factory, settings, n_train)   # the real size: recompile with it
    _check_data_fits(sim, ds, settings)
    check_trace_lengths(sim, settings, n_train)
    if data_dir is not None:                 # so that --resume finds the data without --data
        settings = copy.deepcopy(settings)
        settings["data"]["dir"] = str(Path(data_dir).resolve())
    with rundir.FolderLock(out, "run"):
        rundir.remove_stale_tmp(out, RUN_FILES)       # what a killed writer left
        rundir.remove_dead_tmp(out)                    # ... and a killed report
        is_run = (out / "scenario.toml").is_file() and (out / "checkpoints").is_dir()
        if resume and is_run:
            start_epoch, metrics = _resume_point(out, sim, settings, ds, log)
        else:   # a new run (or the resumption of a run that never started)
            if is_run:
                raise ValidationError("--out", f"{str(out)!r} already holds a run.",
                                      "choose another --out, or continue it with --resume.")
            rundir.check_fresh(out, RUN_FILES)
            start_epoch, metrics = 0, []
        made_checkpoints = not is_run and not (out / "checkpoints").is_dir()
        try:
            summary = _train(sim, settings, out, ds, x_test, y_test, metrics, start_epoch,
                             progress, log)
        except BaseException as e:
            err = _after_failure(out, e, made_checkpoints)
            if err is e:
                raise
            raise err from e
        try:
            (out / "error.json").unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise rundir.os_error(e, out / "error.json", "remove the error.json of an earlier "
                                  "attempt") from None
    return summary


def _resume_point(out: Path, sim: Simulator, settings: dict, ds, log) -> tuple[int, list]:
    """Load the newest intact checkpoint of ``out`` into ``sim``; returns (epochs done,
    metrics rows), (0, []) without checkpoints. Corrupt newer checkpoints are renamed to
    ``<name>.corrupt`` (kept for inspection) and the outputs rewritten to match the one used."""
    cks = checkpoints(out)
    bad = []
    for ck in reversed(cks):
        try:
            epoch, metrics = load_checkpoint(ck, sim, settings)
        except CorruptCheckpointError as e:
            bad.append((ck, e))
            continue
        for r in metrics:   # checkpoints of neurosim 0.1 name the running accuracy so
            if "train_accuracy" in r:
                r.setdefault("train_accuracy_running", r.pop("train_accuracy"))
        if not bad:
            log(f"resumed from {ck} (epoch {epoch})")
            return epoch, metrics
        for b, e in bad:
            dest = b.with_name(b.name + ".corrupt")
            try:
                os.replace(b, dest)
            except OSError as oe:
                raise rundir.os_error(oe, b, "move the corrupt checkpoint aside") from None
            log(f"checkpoint {b} is unusable: {e.message} Moved it to {dest.name}.")
        log(f"resumed from the previous intact checkpoint, {ck} (epoch {epoch}); the later "
            f"epochs are computed again")
        _write_outputs(out, sim, settings, metrics, ds)   # metrics.csv etc. as of that epoch
        return epoch, metrics
    if bad:
        ck, e = bad[0]
        raise ValidationError(str(ck), f"{e.message} No intact checkpoint is left"
                              + (f" (all {len(bad)} are corrupt)." if len(bad) > 1 else "."),
                              "delete it (and any other checkpoint) to start again from epoch 1 "
                              f"with neurosim run --resume {out}.")
    return 0, []


def _check_data_fits(sim: Simulator, ds, settings) -> None:
    """The circuit's input and one-hot target sizes against the data set, before any I/O."""
    plan = sim.plan
    name = settings["data"]["dataset"]
    if "x" in plan.stimuli:
        need = plan.view("stim.x").shape[1]
        if ds.x_train.shape[1] != need:
            raise ValidationError("model.sizes", f"the input takes {need} features per sample, "
                                  f"but {name} samples have {ds.x_train.shape[1]}.",
                                  f"make the first size {ds.x_train.shape[1]}.")
    if "t" in plan.stimuli and plan.targets == "onehot":
        n_out = plan.view("stim.t").shape[1]
        if ds.n_classes > n_out:
            raise ValidationError("model.sizes", f"the output has {n_out} units, but {name} has "
                                  f"{ds.n_classes} classes.",
                                  f"make the last size {ds.n_classes}.")


def _kept(out: Path) -> str:
    """What a failed or interrupted run leaves, and how to continue it."""
    try:
        ck = latest_checkpoint(out)
    except OSError:
        ck = None
    if ck is not None:
        epoch = int(_CHECKPOINT_NAME.fullmatch(ck.name).group(1))
        kept = "epoch 1 is" if epoch == 1 else f"epochs 1-{epoch} are"
        return (f"{kept} kept (last checkpoint {ck}); continue with: neurosim run --resume "
                f"{out}")
    return (f"no epoch had finished; {out} keeps the scenario, and neurosim run --resume {out} "
            "starts it again from epoch 1")


def _after_failure(out: Path, exc: BaseException, made_checkpoints: bool) -> BaseException:
    """Tidy up after a failed run and return the exception to raise.

    Before the run wrote its ``scenario.toml`` (checked fresh, so nothing of the run's existed):
    remove what it created; nothing is kept. After: the checkpoints already written stay
    untouched, ``error.json`` records the failure (also for Ctrl-C), and the message says what
    is kept and how to continue."""
    if not (out / "scenario.toml").is_file():
        if made_checkpoints:
            try:
                (out / "checkpoints").rmdir()
            except OSError:
                pass
        if isinstance(exc, KeyboardInterrupt):
            return KeyboardInterrupt(f"interrupted before the run started; nothing was written "
                                     f"into {out}.")
        if isinstance(exc, OSError):
            return rundir.os_error(exc, exc.filename or out)
        return exc
    state = _kept(out)
    if isinstance(exc, SimulationError):
        new = exc                                    # _diverged already says what is kept
    elif isinstance(exc, KeyboardInterrupt):
        new = KeyboardInterrupt(f"interrupted; {state}.")
    elif isinstance(exc, (OSError, ResourceError)):
        err = rundir.os_error(exc, exc.filename or out) if isinstance(exc, OSError) else exc
        new = ResourceError(err.where, err.message, f"{(err.hint or '').rstrip('.')}; {state}.")
    elif isinstance(exc, MemoryError):
        new = ResourceError("memory", "the machine ran out of memory.",
                            f"lower training.batch_size or the population sizes; {state}.")
    elif isinstance(exc, NeurosimError):
        new = exc
    else:
        return exc                                   # a bug: keep its traceback
    info = {"error": type(exc).__name__, "message": str(new).strip() or type(exc).__name__,
            "last_checkpoint": None}
    try:
        ck = latest_checkpoint(out)
        info["last_checkpoint"] = str(ck) if ck is not None else None
    except OSError:
        pass
    for k in ("phase", "step", "population", "projection", "epoch"):
        if getattr(exc, k, None) is not None:
            info[k] = getattr(exc, k)
    info["continue_with"] = f"neurosim run --resume {out}"
    try:
        _atomic_write_text(out / "error.json", json.dumps(info, indent=2, default=str))
    except (NeurosimError, OSError):
        if isinstance(new, ResourceError):
            new = ResourceError(new.where, new.message, f"{(new.hint or '').rstrip('.')}; "
                                "error.json could not be written either.")
    return new


def _diverged(e: SimulationError, epoch: int, out: Path) -> SimulationError:
    """The kernel's error with the epoch and what happened to the checkpoints."""
    text = str(e)
    if e.hint and text.endswith(f"Hint: {e.hint}"):
        text = text[: -len(f"Hint: {e.hint}")].rstrip()
    ck = latest_checkpoint(out)
    where = (f"the last good checkpoint, {ck}, is intact" if ck is not None else
             "no checkpoint was written (the run failed in its first epoch)")
    hint = (e.hint or "").replace("; the last checkpoint is intact", "").rstrip(". ")
    err = SimulationError(f"epoch {epoch}: {text}", hint=f"{hint}; {where}." if hint else
                          f"{where}.")
    err.phase, err.step, err.population, err.projection = e.phase, e.step, e.population, \
        e.projection
    err.epoch = epoch
    return err


class _Pace:
    """Sizes compiled calls to about :data:`CALL_S` seconds from the measured time per
    minibatch (the first call of a run takes one minibatch)."""

    def __init__(self):
        self.per_trial = None

    def trials(self, cap: int) -> int:
        if self.per_trial is None:
            return 1
        return max(1, min(cap, int(CALL_S / max(self.per_trial, 1e-9))))

    def update(self, seconds: float, trials: int) -> None:
        self.per_trial = seconds / max(trials, 1)


def _train_epoch(sim, X, Y, order, cap: int, pace: _Pace, step) -> None:
    """One epoch in calls of ``pace.trials(cap)`` minibatches (the slices of ``order`` are
    whole minibatches, so the result is the same as one call)."""
    B = sim.plan.batch
    pos, n = 0, len(order)
    while pos < n:
        k = pace.trials(cap)
        stop = min(n, pos + k * B)
        t0 = time.perf_counter()
        sim.train(X, Y, order[pos:stop], chunk=k, progress=lambda m, p=pos: step(p + m))
        pace.update(time.perf_counter() - t0, -(-(stop - pos) // B))
        pos = stop


def _evaluate(sim, X, Y, pace: _Pace) -> float:
    """Test accuracy: the model's own evaluation if it has one (FF), else :func:`_accuracy`."""
    if type(sim).evaluate is not Simulator.evaluate:
        return sim.evaluate(X, Y)
    return _accuracy(sim, X, Y, pace)


def _accuracy(sim, X, Y, pace: _Pace) -> float:
    """Share of ``X`` that ``sim.predict`` classifies as ``Y``; for the engine's own predict in
    calls of about :data:`CALL_S` seconds (slices of whole minibatches: the predictions are
    those of one call)."""
    if type(sim).predict is not Simulator.predict:      # a model's own (FF: Python loops)
        return float(np.mean(sim.predict(X) == np.asarray(Y)))
    B = sim.plan.batch
    preds, pos, n = [], 0, len(X)
    while pos < n:
        stop = min(n, pos + pace.trials(1 << 30) * B)
        t0 = time.perf_counter()
        preds.append(sim.predict(X[pos:stop]))
        pace.update(time.perf_counter() - t0, -(-(stop - pos) // B))
        pos = stop
    return float(np.mean(np.concatenate(preds) == np.asarray(Y))) if preds else float("nan")


def _train(sim, settings, out, ds, x_test, y_test, metrics, start_epoch, progress, log) -> dict:
    tr = settings["training"]
    opt = sim.plan.optimizer
    try:
        (out / "checkpoints").mkdir(exist_ok=True)
    except OSError as e:
        raise rundir.os_error(e, out / "checkpoints", "create the checkpoints folder") from None
    _atomic_write_text(out / "scenario.toml", sc.to_toml(settings))
    n = ds.x_train.shape[0]
    wall0 = time.perf_counter() - (metrics[-1]["wall_s"] if metrics else 0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tr["epochs"] * n, initial=start_epoch * n, unit="sample",
                   unit_scale=True, dynamic_ncols=True, disable=None)
    # a line per epoch whenever no bar is drawn or stdout goes to a file, pipe or job log
    log_epochs = bar is None or bar.disable or not _isatty(sys.stdout)
    x_eval, y_eval = ds.x_train[: tr["train_eval"]], ds.y_train[: tr["train_eval"]]
    stats = sim.plan.buffer_index.get("stats.correct")
    pace, eval_pace = _Pace(), _Pace()
    last_plotted = -1   # len(metrics) when learning_curve.png was last drawn
    try:
        for epoch in range(start_epoch, tr["epochs"]):
            lr = opt.lr_at(epoch)
            sim.set_lr(lr)
            sim.set_epoch(epoch)
            if stats is not None:
                sim.view("stats.correct")[...] = 0
            order = shuffled_order(tr["seed"], epoch, n)
            done = [0]

            def step(k):
                if bar is not None:
                    bar.update(k - done[0])
                    done[0] = k
            t0 = time.perf_counter()
            try:
                _train_epoch(sim, ds.x_train, ds.y_train, order, tr["chunk"], pace, step)
                t_train = time.perf_counter() - t0
                row = {"epoch": epoch + 1, "lr": lr, "samples_per_s": n / t_train,
                       "epoch_s": t_train}
                if stats is not None:
                    c = sim.view("stats.correct")
                    row["train_accuracy_running"] = float(c[0, 0] / max(c[0, 1], 1))
                else:
                    row["train_accuracy_running"] = float("nan")
                row["train_accuracy_eval"] = row["test_accuracy"] = float("nan")
                if (epoch + 1) % tr["eval_every"] == 0 or epoch + 1 == tr["epochs"]:
                    if len(y_eval):   # predict, not evaluate: a model's evaluate may log
                        row["train_accuracy_eval"] = _accuracy(sim, x_eval, y_eval, eval_pace)
                    row["test_accuracy"] = _evaluate(sim, x_test, y_test, eval_pace)
            except SimulationError as e:
                raise _diverged(e, epoch + 1, out) from e
            row["wall_s"] = time.perf_counter() - wall0
            metrics.append(row)
            _write_outputs(out, sim, settings, metrics, ds)
            last_plotted = len(metrics)
            ck = out / "checkpoints" / f"epoch-{epoch + 1:04d}.npz"
            save_checkpoint(ck, sim, epoch + 1, metrics, settings)
            for old in checkpoints(out)[:-tr["keep_checkpoints"]]:
                old.unlink()
            if bar is not None:
                bar.set_postfix(test=f"{row['test_accuracy']:.4f}", lr=f"{lr:g}")
            if log_epochs:
                log(_epoch_line(row, tr["epochs"]))
    finally:
        if bar is not None:
            bar.close()
    # the last epoch's write drew the same metrics: a second plot would cost ~0.5 s for nothing
    plotted = last_plotted == len(metrics) and (out / "learning_curve.png").is_file()
    return _write_outputs(out, sim, settings, metrics, ds, final=True, plot=not plotted)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _epoch_line(row: dict, epochs: int) -> str:
    """One log line per epoch; the accuracies are percentages, "-" where not measured."""
    def pct(key):
        v = row.get(key, math.nan)
        return "-" if v is None or not math.isfinite(v) else f"{100 * v:.2f}%"

    text = f"epoch {row['epoch']}/{epochs}: test {pct('test_accuracy')}"
    text += f", train running {pct('train_accuracy_running')}"
    if math.isfinite(row.get("train_accuracy_eval", math.nan)):
        text += f", train eval {pct('train_accuracy_eval')}"
    return (text + f", lr {row['lr']:g}, {row['samples_per_s']:.0f} samples/s, "
            f"{row['epoch_s']:.1f} s")


def _write_outputs(out: Path, sim, settings, metrics, ds, final=False, plot=True) -> dict:
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
    w.writeheader()
    for r in metrics:
        w.writerow({k: r.get(k) for k in METRIC_FIELDS})
    _atomic_write_text(out / "metrics.csv", f.getvalue())
    traces = sim.traces
    arrays = {}
    for k, t in traces.items():
        for field, v in t.to_dict().items():
            arrays[f"{k}/{field}"] = v
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write_bytes(out / "traces.npz", buf.getvalue())
    accs = [r["test_accuracy"] for r in metrics if not np.isnan(r["test_accuracy"])]
    from .analysis import SLOWNESS_MIN_POINTS, slowness_fit, slowness_points

    before = (settings["training"]["milestones"] or [None])[0]
    ep_acc = ([r["epoch"] for r in metrics], [r["test_accuracy"] for r in metrics])
    slowness = slowness_fit(*ep_acc, n_classes=ds.n_classes, before=before)
    n_fit = slowness_points(*ep_acc, before=before)
    slowness_note = None if slowness is not None else (
        f"{n_fit} test accurac{'y' if n_fit == 1 else 'ies'} up to the first learning-rate "
        f"decay; the 2-parameter fit needs at least {SLOWNESS_MIN_POINTS}"
        if n_fit < SLOWNESS_MIN_POINTS else "the least-squares fit did not converge")

    summary = {
        "scenario": settings["name"], "model": settings["model"]["name"],
        "dataset": settings["data"]["dataset"], "epochs_done": len(metrics),
        "epochs": settings["training"]["epochs"], "seed": settings["training"]["seed"],
        "final_test_accuracy": accs[-1] if accs else None,
        "best_test_accuracy": max(accs) if accs else None,
        "final_train_accuracy_running": metrics[-1]["train_accuracy_running"] if metrics else None,
        "final_train_accuracy_eval": _last_finite(metrics, "train_accuracy_eval"),
        "wall_s": metrics[-1]["wall_s"] if metrics else 0.0,
        "mean_samples_per_s": float(np.mean([r["samples_per_s"] for r in metrics])) if metrics else None,
        "n_train": int(ds.x_train.shape[0]), "threads": settings["training"]["threads"],
        "mode": settings["simulation"]["mode"], "complete": bool(final),
        "neurosim_version": _version(),
        "slowness": slowness,
    }
    if slowness_note:
        summary["slowness_note"] = slowness_note
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    if plot:
        _plot(out, metrics, settings)
    return summary


def _last_finite(metrics, key):
    vals = [r.get(key) for r in metrics if r.get(key) is not None and math.isfinite(r[key])]
    return vals[-1] if vals else None


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _version():
    from . import __version__

    return __version__


def _plot(out: Path, metrics, settings):
    # a Figure without pyplot: no GUI backend is looked for, and importing pyplot (~0.5 s) is
    # skipped on every run
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ep = np.asarray([r["epoch"] for r in metrics], float)
    ms = 5 if len(ep) <= 20 else 3
    for key, style, label in (
            ("test_accuracy", "o-", "test (evaluation)"),
            ("train_accuracy_running", "s--", "train, running (during the epoch, with dropout)"),
            ("train_accuracy_eval", "^-.", "train, evaluated after the epoch")):
        y = np.asarray([r.get(key, math.nan) for r in metrics], float)
        ok = np.isfinite(y)
        if ok.any():
            ax.plot(ep[ok], 100 * y[ok], style, ms=ms, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{settings['name']}: {settings['model']['name']} on {settings['data']['dataset']}")
    if len(ep) == 1:   # one epoch: a readable axis around the single point
        ax.set_xlim(ep[0] - 0.5, ep[0] + 0.5)
        ax.set_xticks([ep[0]])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    rundir.atomic_write_file(out / "learning_curve.png",
                             lambda tmp: fig.savefig(tmp, format="png", dpi=120))
