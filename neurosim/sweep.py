"""``neurosim sweep``: every combination of a parameter grid x seeds, on dask.distributed.

::

    neurosim sweep scenarios/pepita_mnist.toml --grid training.lr=0.05,0.1 \\
        --grid training.batch_size=32,64 --seeds 3 --set training.epochs=10 \\
        --data ../shared/data/mnist [--scheduler tcp://host:8786] [--out sweeps/lr-batch]

Each run is an ordinary run directory under ``OUT/runs/<name>`` (the same files as
``neurosim run``), computed by one task on a dask worker: by default a
``LocalCluster`` of single-threaded worker processes on this machine, or the workers of an
existing scheduler given with ``--scheduler`` (e.g. one started by dask-jobqueue on a batch
system; the output folder and the data must then be on a file system the workers share).

The sweep folder gets ``sweep.csv`` (one row per run: status, grid values, seed, final metrics)
and ``summary.md`` (mean +- std over seeds of the final metrics, per grid point), both rewritten
as runs finish, plus ``sweep.json`` (what was asked). Running the same command again skips the
finished runs (and those that diverged: a divergence is deterministic; ``--retry-failed``
retries them), resumes interrupted ones from their last checkpoint, and starts the others. A
worker that dies mid-run (killed, out of memory) has its task rescheduled by dask, and the run
then resumes from its last checkpoint.

Everything is validated (every grid point's scenario and circuit) before a worker starts. The
machinery shared with ``neurosim campaign`` (run-folder states, the dask task, aggregation) is in
:mod:`neurosim.runpool`.
"""

from __future__ import annotations

import hashlib
import io
import csv
import itertools
import json
import re
import sys
import time
from pathlib import Path

from .errors import ValidationError
from .rundir import (FolderLock, atomic_write_text, check_fresh, check_inside, os_error,
                     remove_stale_tmp, safe_name)
from .runpool import (METRICS as _METRICS, RunSpec, check_circuits, classify, execute,
                      fmt_csv as _fmt_csv, fmt_mean_std as _fmt, mean_std as _mean_std,
                      positive_int as _positive_int, previous_rows)
from .runpool import run_one, summary_row as _row  # noqa: F401  (the sweep's task and rows)

#: What a sweep writes into its folder (a folder holding any of them without ``sweep.json`` is
#: refused: a sweep never replaces files it did not write).
SWEEP_FILES = ("sweep.json", "sweep.csv", "summary.md", "runs")

HELP = "run a scenario over a parameter grid x seeds on dask.distributed (local or a cluster)"


def add_arguments(p) -> None:
    p.add_argument("scenario", help="TOML scenario file")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a scenario key and the values to sweep, e.g. --grid training.lr=0.05,0.1 "
                   "(repeatable: the sweep runs every combination; list values in brackets, "
                   "e.g. --grid 'model.sizes=[784,256,10],[784,1024,10]')")
    p.add_argument("--seeds", default="1", metavar="N",
                   help="seeds per grid point: training.seed, training.seed + 1, ... (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key for every run (repeatable)")
    p.add_argument("--data", help="folder holding the dataset's own files (as for neurosim run)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask scheduler (e.g. tcp://10.0.0.1:8786); "
                   "default: a LocalCluster of single-threaded worker processes")
    p.add_argument("--workers", default=None, metavar="N",
                   help="LocalCluster worker processes (default: the number of CPUs; never "
                   "more than the runs left to do)")
    p.add_argument("--out", help="sweep folder (default sweeps/<scenario name>); re-running "
                   "into the same folder skips finished runs")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-run runs recorded as diverged")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- planning ---------------------------------------------------------------------------------------
def split_values(text: str, where: str) -> list[str]:
    """Split ``v1,v2,...`` at the commas outside brackets, braces and quotes."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise ValidationError(where, f"unbalanced {ch!r} in {text!r}.")
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise ValidationError(where, f"unbalanced brackets or quotes in {text!r}.")
    out.append("".join(cur).strip())
    if any(v == "" for v in out):
        raise ValidationError(where, f"empty value in {text!r}.", "write KEY=V1,V2,...")
    return out


def parse_grid(items) -> dict:
    """``["training.lr=0.05,0.1", ...]`` -> ``{"training.lr": ["0.05", "0.1"], ...}``."""
    grid = {}
    for item in items:
        if "=" not in item:
            raise ValidationError("--grid", f"got {item!r}, expected KEY=V1,V2,... (e.g. "
                                  "training.lr=0.05,0.1).")
        key, values = item.split("=", 1)
        key = key.strip()
        if len(key.split(".")) != 2 or not all(key.split(".")):
            raise ValidationError("--grid", f"got key {key!r}, expected section.key (e.g. "
                                  "training.lr).")
        if key in grid:
            raise ValidationError(f"--grid {key}", "given twice.", "list all its values in one "
                                  "--grid.")
        vals = split_values(values, f"--grid {key}")
        if len(set(vals)) != len(vals):
            raise ValidationError(f"--grid {key}", f"repeats a value in {vals}.")
        grid[key] = vals
    return grid


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.")
    return s or "x"


def _short_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def _point_names(grid: dict, points: list) -> list[str]:
    short = [k.split(".")[-1] for k in grid]
    labels = short if len(set(short)) == len(short) else [k for k in grid]
    names = []
    for values in points:
        name = "_".join(f"{_slug(lab)}-{_slug(v)}" for lab, v in zip(labels, values)) or "base"
        if len(name) > 100:
            name = name[:90] + "-" + _short_hash(values)
        names.append(name)
    if len(set(names)) != len(names):      # distinct values that sanitise alike
        names = [f"{n}-{_short_hash(v)}" for n, v in zip(names, points)]
    return names


def plan_sweep(scenario, grid_items, seeds, overrides=()) -> tuple[dict, dict, list[RunSpec]]:
    """Validate every run of the sweep; returns (grid, base settings, runs)."""
    from . import scenario as sc

    grid = parse_grid(grid_items)
    n_seeds = _positive_int(seeds, "--seeds")
    base = sc.load(scenario, overrides)
    if "training.seed" in grid and n_seeds > 1:
        raise ValidationError("--seeds", "training.seed is already swept by --grid.",
                              "drop --seeds, or the training.seed grid.")
    seed0 = base["training"]["seed"]
    points = list(itertools.product(*grid.values())) if grid else [()]
    names = _point_names(grid, points)
    runs = []
    for name, values in zip(names, points):
        label = ", ".join(f"{k}={v}" for k, v in zip(grid, values))
        for k in range(n_seeds):
            seed = seed0 + k
            sets = list(overrides) + [f"{key}={v}" for key, v in zip(grid, values)]
            if "training.seed" not in grid:
                sets.append(f"training.seed={seed}")
            try:
                settings = sc.load(scenario, sets)
            except ValidationError as e:
                raise ValidationError(e.where, f"{e.message} (grid point {label})", e.hint) \
                    from None
            seed = settings["training"]["seed"]
            runs.append(RunSpec(f"{name}_seed-{seed}", dict(zip(grid, values)), seed, settings))
    return grid, base, runs


# -- outputs ----------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_csv(out: Path, grid: dict, runs: list[RunSpec]) -> None:
    fixed = ["run", "status", "seed", *grid, "epochs_done", *_METRICS]
    extra = sorted({k for r in runs for k in r.row} - set(fixed) - {"error"})
    fields = fixed + extra + ["error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        row = dict(r.row) if r.row else {"run": r.name, "status": r.status, "seed": r.seed,
                                         **r.point}
        row["status"] = r.status
        w.writerow({k: _fmt_csv(row.get(k)) for k in fields})
    _atomic_write(out / "sweep.csv", buf.getvalue())


def aggregate(grid: dict, runs: list[RunSpec]) -> tuple[list[str], list[dict]]:
    """Per grid point: runs done and mean/std of each final metric over its finished seeds."""
    metrics = list(_METRICS) + sorted({k for r in runs for k, v in r.row.items()
                                       if k.startswith(("final_", "best_")) and k not in _METRICS})
    points = {}
    for r in runs:
        points.setdefault(tuple(r.point.get(k) for k in grid), []).append(r)
    out = []
    for values, rs in points.items():
        ok = [r for r in rs if r.status == "ok"]
        agg = {"point": dict(zip(grid, values)), "runs": len(rs), "ok": len(ok),
               "diverged": sum(r.status == "diverged" for r in rs),
               "failed": sum(r.status == "failed" for r in rs)}
        for m in metrics:
            agg[m] = _mean_std(r.row.get(m) for r in ok)
        out.append(agg)
    return metrics, out


def write_summary(out: Path, spec: dict, grid: dict, runs: list[RunSpec], timing: dict) -> str:
    metrics, points = aggregate(grid, runs)
    metrics = [m for m in metrics if any(p[m][2] for p in points)] or list(_METRICS[:1])
    n = len(runs)
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "diverged", "failed", "pending")}
    lines = [f"# Sweep of {spec['scenario_name']}", "",
             f"- scenario: `{spec['scenario']}`" + (f", with `--set {' '.join(spec['overrides'])}`"
                                                    if spec["overrides"] else ""),
             f"- grid: " + (", ".join(f"`{k}` in {{{', '.join(v)}}}" for k, v in grid.items())
                            or "none (the base scenario)"),
             f"- seeds per point: {spec['seeds']} (training.seed = {spec['seed0']}, ...)",
             f"- runs: {n} — {counts['ok']} finished, {counts['diverged']} diverged, "
             f"{counts['failed']} failed, {counts['pending']} not run",
             f"- this invocation: {timing.get('ran', 0)} run(s) computed, {timing.get('skipped', 0)} "
             f"skipped as already finished; wall time {timing.get('wall_s', 0.0):.1f} s on "
             f"{timing.get('where', 'no workers')}",
             "", "Mean ± standard deviation over the finished seeds of each grid point (sample "
             "std, n - 1; none with one seed).", ""]
    head = [*(k.split(".")[-1] for k in grid), "finished", *metrics]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for p in points:
        cells = [str(p["point"][k]) for k in grid]
        done = f"{p['ok']}/{p['runs']}" + (f" ({p['diverged']} diverged)" if p["diverged"] else "") \
            + (f" ({p['failed']} failed)" if p["failed"] else "")
        cells.append(done)
        cells += [_fmt(p[m][0], p[m][1], m) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    if "final_test_accuracy" in metrics:
        best = max((p for p in points if p["final_test_accuracy"][0] is not None),
                   key=lambda p: p["final_test_accuracy"][0], default=None)
        if best is not None and grid:
            lines += ["", "Best final test accuracy: " + ", ".join(
                f"`{k}={v}`" for k, v in best["point"].items()) +
                f" ({_fmt(*best['final_test_accuracy'][:2], 'final_test_accuracy')})."]
    bad = [r for r in runs if r.status in ("diverged", "failed")]
    if bad:
        lines += ["", "## Runs that did not finish", ""]
        for r in bad:
            msg = (r.row.get("error") or "").replace("\n", " ")
            lines.append(f"- `{r.name}` ({r.status}): {msg[:300]}")
    lines += ["", "Per-run rows: `sweep.csv`; run directories: `runs/`. `neurosim report` on this "
              "folder plots them.", ""]
    text = "\n".join(lines)
    _atomic_write(out / "summary.md", text)
    return text


# -- the command -----------------------------------------------------------------------------------
def main(args) -> int:
    t_start = time.perf_counter()
    grid, base, runs = plan_sweep(args.scenario, args.grid, args.seeds, args.overrides)
    if args.workers is not None:
        _positive_int(args.workers, "--workers")
    check_circuits(runs)
    data_dir = str(Path(args.data).resolve()) if args.data else None
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ValidationError("--data", f"{args.data!r} is not a folder.",
                              "give the folder holding the dataset's files, e.g. "
                              "../shared/data/mnist.")
    if args.out:
        out = Path(args.out)
    else:   # the name is the user's text: one safe path component, inside sweeps/
        out = Path("sweeps") / safe_name(base["name"], "sweep")
        check_inside(out, Path("sweeps"), "name")
    out = out.resolve()
    lock = FolderLock(out, "sweep").acquire()   # one sweep per folder, for its whole lifetime
    try:
        remove_stale_tmp(out, SWEEP_FILES)          # what a killed sweep left
        if not (out / "sweep.json").is_file():
            check_fresh(out, SWEEP_FILES, "sweep")
        return _sweep(args, t_start, grid, base, runs, data_dir, out)
    finally:
        lock.release()


def _sweep(args, t_start, grid, base, runs, data_dir, out: Path) -> int:
    """The sweep proper, in the locked folder ``out``."""
    previous = previous_rows(out / "sweep.csv")
    for r in runs:
        r.run_dir = out / "runs" / r.name
        classify(r, previous, args.retry_failed, "sweep")
    pending = [r for r in runs if r.status == "pending"]
    if not args.scheduler and pending and data_dir is not None:
        # fail fast on missing or corrupt data, or circuits that do not fit it
        from .training import load_data

        check_circuits(pending, load_data(pending[0].settings, data_dir)[0])
    try:
        (out / "runs").mkdir(exist_ok=True)
    except OSError as e:
        raise os_error(e, out / "runs", "create the runs folder") from None
    spec = {"scenario": str(args.scenario), "scenario_name": base["name"], "grid": grid,
            "seeds": _positive_int(args.seeds, "--seeds"), "seed0": base["training"]["seed"],
            "overrides": list(args.overrides), "data": data_dir, "runs": [r.name for r in runs]}
    _atomic_write(out / "sweep.json", json.dumps(spec, indent=2))
    skipped = len(runs) - len(pending)
    timing = {"skipped": skipped, "ran": 0, "where": "no workers (nothing to run)"}

    def flush():
        timing["wall_s"] = time.perf_counter() - t_start
        write_csv(out, grid, runs)
        write_summary(out, spec, grid, runs, timing)

    total = len(runs)
    print(f"sweep: {total} runs ({total // spec['seeds']} grid point(s) x {spec['seeds']} "
          f"seed(s)) into {out}; {skipped} already finished, {len(pending)} to run",
          file=sys.stderr)
    if pending:
        for r in pending:
            r.data_dir = data_dir
        execute(pending, scheduler=args.scheduler, workers=args.workers,
                progress=not args.no_progress, total=total, skipped=skipped, timing=timing,
                flush=flush, command="sweep")
    flush()
    failed = [r for r in runs if r.status == "failed"]
    diverged = [r for r in runs if r.status == "diverged"]
    print(f"sweep: {sum(r.status == 'ok' for r in runs)}/{total} finished, {len(diverged)} "
          f"diverged, {len(failed)} failed; see {out / 'summary.md'}")
    for r in failed:
        print(f"  failed: {r.name}: {r.row.get('error', '')}", file=sys.stderr)
    return 1 if failed else 0


