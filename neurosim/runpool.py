"""Many run directories on dask.distributed: what ``neurosim sweep`` and ``neurosim campaign``
share.

A batch of runs is a list of :class:`RunSpec` (a name, the resolved settings, the seed, the
labels that identify it in the batch's tables, its run directory and data folder). This module

- checks every distinct circuit once before any worker starts (:func:`check_circuits`);
- reads the state of each run directory (:func:`classify`: finished, diverged, or to run; a
  folder that holds a run of other settings is refused);
- runs the pending ones on dask.distributed (:func:`execute`: a ``LocalCluster`` of
  single-threaded worker processes, or the workers of an existing scheduler), each task an
  ordinary ``neurosim run`` that resumes from its last checkpoint when its folder holds one, so
  a worker that dies has its task rescheduled by dask and the run continues where it stopped;
- turns a run's ``summary.json`` into a table row (:func:`summary_row`) and aggregates rows
  over seeds (:func:`mean_std`, :func:`fmt_mean_std`).

The batch commands own their folder (``FolderLock``), their plan and their output files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NeurosimError, SimulationError, ValidationError

#: metrics of summary.json put first in the tables (plus any other final_*/best_* number)
METRICS = ("final_test_accuracy", "best_test_accuracy", "final_train_accuracy_running", "wall_s")


@dataclass
class RunSpec:
    name: str
    point: dict            # the labels of the run in its batch (grid values, campaign entry)
    seed: int
    settings: dict
    run_dir: Path = None
    status: str = "pending"    # pending | ok | diverged | failed
    row: dict = field(default_factory=dict)
    data_dir: str | None = None


def positive_int(text, where) -> int:
    try:
        n = int(str(text))
    except ValueError:
        raise ValidationError(where, f"got {text!r}, expected a positive integer.") from None
    if n < 1:
        raise ValidationError(where, f"got {n}, expected a positive integer.")
    return n


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_json(path: Path):
    """A JSON object (dict) from ``path``; None if absent, unreadable or not an object."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def previous_rows(csv_path: Path) -> dict:
    """The rows of the batch's previous CSV by run name (empty if none)."""
    try:
        with open(csv_path, newline="") as f:
            return {r["run"]: r for r in csv.DictReader(f)}
    except (OSError, csv.Error, KeyError):
        return {}


# -- checks before any worker starts ---------------------------------------------------------------
def check_circuits(runs, ds=None, label=None, where=None) -> None:
    """Build and compile every distinct circuit once (cheap; no kernels run); with a loaded
    data set ``ds``, also check that the circuits fit it. ``label(run)`` names a run at the end
    of the errors (default: its grid point), ``where(run)`` before the key instead."""
    from . import scenario as sc
    from .training import _check_data_fits, scenario_hash, simulator_for

    if label is None:
        def label(r):
            return "grid point " + (", ".join(f"{k}={v}" for k, v in r.point.items())
                                    or "the base scenario")
    seen = set()
    for r in runs:
        h = scenario_hash({**r.settings, "training": {**r.settings["training"], "seed": 0}})
        if h in seen:
            continue
        seen.add(h)
        try:
            if sc.runner_for(r.settings) is not None and sc.simulator_for(r.settings) is None:
                sc.build(r.settings)
            else:
                sim = simulator_for(r.settings)
                if ds is not None:
                    _check_data_fits(sim, ds, r.settings)
        except ValidationError as e:
            if where is not None:
                raise ValidationError(f"{where(r)}: {e.where}", e.message, e.hint) from None
            raise ValidationError(e.where, f"{e.message} ({label(r)})", e.hint) from None


# -- state of the run directories ------------------------------------------------------------------
def classify(run: RunSpec, previous: dict, retry_failed: bool, what: str = "sweep") -> None:
    """Set run.status from its run directory: ok (finished), diverged, or pending."""
    from . import scenario as sc
    from .training import scenario_hash

    d = run.run_dir
    toml = d / "scenario.toml"
    if toml.is_file():
        try:
            have = scenario_hash(sc.load(toml))
        except ValidationError as e:
            raise ValidationError(str(toml), f"this run directory's scenario is unreadable "
                                  f"({e}).", "delete the run directory to run it again.") from None
        if have != scenario_hash(run.settings):
            raise ValidationError("--out", f"{str(d)!r} holds a run of different settings than "
                                  f"this {what} asks for.", "use another --out for a different "
                                  f"{what} or --set values.")
    summary = read_json(d / "summary.json") or {}
    epochs = run.settings["training"]["epochs"]
    finished = bool(summary) and summary.get("complete", True) is True and \
        summary.get("epochs_done", epochs) >= epochs
    prev = previous.get(run.name, {})
    if finished and not (d / "error.json").exists():
        run.status = "ok"
        run.row = summary_row(run, summary, None, {k: prev[k] for k in ("task_s", "worker")
                                                    if prev.get(k)})
        return
    if retry_failed:
        return
    err = read_json(d / "error.json")
    if err and err.get("error") == "SimulationError":
        run.status = "diverged"
        run.row = summary_row(run, summary, err.get("message"))
    elif prev.get("status") == "diverged" and not toml.is_file():
        run.status = "diverged"      # diverged in its first epoch: nothing was kept
        run.row = dict(prev)


def summary_row(run: RunSpec, summary: dict, error, extra=None) -> dict:
    """One table row: the run's labels, seed, status and the numbers of its summary.json."""
    row = {"run": run.name, "status": run.status, "seed": run.seed, **run.point}
    for k, v in (summary or {}).items():
        if k in ("epochs_done", "mean_samples_per_s") or k in METRICS or (
                k.startswith(("final_", "best_")) and is_number(v)):
            row[k] = v
    row.update(extra or {})
    row["error"] = error or ""
    return row


# -- the task run by a worker ----------------------------------------------------------------------
def run_one(settings: dict, run_dir: str, data_dir) -> dict:
    """Run (or resume) one run directory; never raises: returns status, summary and timing."""
    import socket

    from . import scenario as sc
    from . import training

    t0 = time.perf_counter()
    out = Path(run_dir)
    resume = (out / "scenario.toml").is_file()
    status, error, summary = "ok", None, {}
    try:
        runner = sc.runner_for(settings)
        if runner is None:
            summary = training.run(settings, out, data_dir=data_dir, resume=resume,
                                   progress=False, log=lambda *a, **k: None)
        else:
            summary = runner(settings, out, data_dir=data_dir, resume=resume, progress=False)
    except SimulationError as e:
        status, error = "diverged", str(e)
        summary = read_json(out / "summary.json") or {}
    except NeurosimError as e:
        status, error = "failed", str(e)
    except Exception as e:  # a bug: report it in the batch's CSV rather than lose the batch
        status, error = "failed", f"{type(e).__name__}: {e}"
    return {"status": status, "error": error, "summary": summary or {},
            "task_s": time.perf_counter() - t0, "resumed": resume,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


# -- aggregation -----------------------------------------------------------------------------------
def mean_std(values):
    """(mean, sample std (n - 1; None for one value), n) of the finite numbers in ``values``."""
    vals = []
    for v in values:
        if v in (None, ""):
            continue
        try:
            x = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            vals.append(x)
    if not vals:
        return None, None, 0
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
    return m, s, len(vals)


def fmt_mean_std(m, s, metric):
    """``97.18 ± 0.08 %`` for an accuracy (a fraction, shown in %), ``0.041 ± 0.001`` else."""
    if m is None:
        return "—"
    if metric.endswith("accuracy"):
        return f"{100 * m:.2f} ± {100 * s:.2f} %" if s is not None else f"{100 * m:.2f} %"
    return f"{m:.4g} ± {s:.2g}" if s is not None else f"{m:.4g}"


def fmt_csv(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return v


# -- dask ------------------------------------------------------------------------------------------
def make_client(scheduler, workers, n_pending: int):
    """A dask Client: connected to ``scheduler``, or to a fresh LocalCluster of ``workers``
    (default: the CPUs, never more than the runs to do) single-threaded worker processes.
    Returns (client, cluster or None, where in words); the caller closes both."""
    import logging

    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as e:
            raise ValidationError("--scheduler", f"cannot connect to {scheduler!r} ({e}).",
                                  "start one (dask scheduler / dask-jobqueue) or leave out "
                                  "--scheduler for a local cluster.") from None
        return client, None, f"the workers of {scheduler}"
    n = positive_int(workers, "--workers") if workers is not None else (os.cpu_count() or 1)
    n = max(1, min(n, n_pending))        # no idle workers
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
    return Client(cluster), cluster, f"a LocalCluster of {n} single-threaded worker process(es)"


def execute(pending, *, scheduler, workers, progress: bool, total: int, skipped: int,
            timing: dict, flush, command: str = "sweep") -> None:
    """Run ``pending`` on dask; after each result set the run's status and row, count it in
    ``timing['ran']`` and call ``flush()`` (which rewrites the batch's tables)."""
    from dask.distributed import as_completed

    client, cluster, where = make_client(scheduler, workers, len(pending))
    timing["where"] = where
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=skipped, unit="run", desc="runs", dynamic_ncols=True,
                   disable=None)
        if bar.disable:
            bar = None
    done = skipped
    futures = {}
    try:
        for r in pending:
            f = client.submit(run_one, r.settings, str(r.run_dir), r.data_dir, pure=False,
                              key=f"neurosim-run-{r.name}-{uuid.uuid4().hex[:8]}")
            futures[f] = r
        for f in as_completed(futures):
            r = futures[f]
            try:
                res = f.result()
            except Exception as e:  # the task itself failed (worker died repeatedly, ...)
                res = {"status": "failed", "error": f"{type(e).__name__}: {e}", "summary": {},
                       "task_s": None, "worker": ""}
            r.status = res["status"]
            r.row = summary_row(r, res["summary"], res["error"],
                                {"task_s": res["task_s"], "worker": res["worker"]})
            done += 1
            timing["ran"] = timing.get("ran", 0) + 1
            flush()
            acc = r.row.get("final_test_accuracy")
            note = f"test {acc:.4f}" if is_number(acc) else (r.row["error"][:120] or "")
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"{r.name}: {r.status}")
            else:
                t = f" ({res['task_s']:.1f} s)" if res["task_s"] is not None else ""
                print(f"[{done}/{total}] {r.name}: {r.status} {note}{t}", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        for f in futures:
            f.cancel()
        print(f"neurosim {command}: interrupted; finished runs are kept and the others resume "
              "from their checkpoints when the same command is run again.", file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
