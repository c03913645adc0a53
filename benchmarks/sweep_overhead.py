"""Overhead of ``neurosim sweep`` (dask.distributed) per run, against the same runs done
serially.

    python benchmarks/sweep_overhead.py [--data DIR] [--runs 8] [--epochs 2]
        [--train-limit 2000] [--hidden 256] [--workers 1 2] [--out /tmp/sweep-bench]

The runs are a ``training.lr`` grid x seeds of PEPITA 784-H-10 on MNIST (``--train-limit``
samples, 1000 test samples). Four ways of doing the same runs, in this order:

1. ``serial-inprocess``: one Python process calls ``neurosim.training.run`` for each run in
   turn (kernels and data loaded once; the floor);
2. ``serial-cli``: one ``neurosim run`` process per run (what a shell loop does);
3. ``sweep-wN``: ``neurosim sweep`` on a fresh LocalCluster of N single-threaded workers,
   for each N in ``--workers`` (cluster start-up and shutdown included).

Overhead per run = (wall time of the way - wall time of serial-inprocess x 1/N-ideal) / runs;
printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_args(data) -> list:
    """``--data DIR`` for the child commands, or nothing (they then use the dataset lookup)."""
    return ["--data", str(data)] if data else []


def scenario_text(epochs, train_limit, hidden):
    return f"""name = "bench"
[model]
name = "pepita"
sizes = [784, {hidden}, 10]
[data]
dataset = "mnist"
train_limit = {train_limit}
test_limit = 1000
[training]
epochs = {epochs}
batch_size = 64
[[monitor]]
target = "angle:F"
every = 50
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="the MNIST folder (default: the dataset lookup, $NEUROSIM_DATA/mnist or "
                        "the user cache)")
    p.add_argument("--runs", type=int, default=8, help="even: 2 seeds per lr value")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--train-limit", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="/tmp/sweep-bench")
    p.add_argument("--skip-cli", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    scen = out / "bench.toml"
    scen.write_text(scenario_text(a.epochs, a.train_limit, a.hidden))
    lrs = [f"{0.01 * (k + 1):g}" for k in range(a.runs // 2)]
    grid = ["--grid", "training.lr=" + ",".join(lrs), "--seeds", "2"]

    from neurosim import training
    from neurosim.sweep import plan_sweep

    _, _, runs = plan_sweep(scen, grid[1:2], "2")
    results = {}

    # 1. serial, in one process (warm-up run first so that kernels and data are loaded)
    training.run(runs[0].settings, out / "warmup", data_dir=a.data, progress=False,
                 log=lambda *x: None)
    t0 = time.perf_counter()
    for r in runs:
        training.run(r.settings, out / "serial" / r.name, data_dir=a.data, progress=False,
                     log=lambda *x: None)
    results["serial-inprocess"] = time.perf_counter() - t0

    # 2. serial, one CLI process per run
    if not a.skip_cli:
        t0 = time.perf_counter()
        for r in runs:
            sets = [f"training.lr={r.point['training.lr']}", f"training.seed={r.seed}"]
            cmd = [sys.executable, "-m", "neurosim.cli", "run", str(scen), *data_args(a.data),
                   "--out", str(out / "cli" / r.name), "--no-progress"]
            for s in sets:
                cmd += ["--set", s]
            subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
        results["serial-cli"] = time.perf_counter() - t0

    # 3. sweeps
    for w in a.workers:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neurosim.cli", "sweep", str(scen), *grid,
                        *data_args(a.data), "--out", str(out / f"sweep-w{w}"),
                        "--workers", str(w),
                        "--no-progress"], check=True, capture_output=True, cwd=REPO)
        results[f"sweep-w{w}"] = time.perf_counter() - t0

    # same results whatever the way (bit-identical final arenas)
    import numpy as np

    def mem(d):
        ck = training.latest_checkpoint(d)
        with np.load(ck) as z:
            return z["mem"]

    same = all(np.array_equal(mem(out / "serial" / r.name), mem(out / f"sweep-w{w}" / "runs" /
                                                               r.name)) for r in runs
               for w in a.workers)
    base = results["serial-inprocess"]
    n = len(runs)
    print(f"{n} runs of PEPITA 784-{a.hidden}-10, {a.train_limit} samples x {a.epochs} epochs; "
          f"serial in-process {base / n:.2f} s per run; results identical: {same}")
    print("| way | wall (s) | per run (s) | overhead per run vs serial in-process (s) |")
    print("|---|---|---|---|")
    for k, v in results.items():
        ideal = base / (int(k.split("-w")[1]) if "-w" in k else 1)
        print(f"| {k} | {v:.1f} | {v / n:.2f} | {(v - ideal) / n:+.2f} |")
    (out / "results.json").write_text(json.dumps({"results": results, "runs": n,
                                                  "identical": same, "cpus": os.cpu_count()},
                                                 indent=2))


if __name__ == "__main__":
    main()
