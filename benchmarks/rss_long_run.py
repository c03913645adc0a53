"""Resident memory (RSS) of a long ``neurosim run``, sampled per epoch.

    python benchmarks/rss_long_run.py [--data DIR] [--epochs 40]
        [--train-limit 10000] [--scenario scenarios/pepita_mnist.toml] [--out /tmp/rss-run]

Starts ``neurosim run`` as a child process (the scenario's monitors included, checkpoints and
plots written every epoch as usual), reads ``VmRSS`` from ``/proc/<pid>/status`` every 50 ms
and records the peak RSS of each epoch (epochs are counted from the rows of ``metrics.csv``).
Prints the per-epoch peaks, the growth from the second epoch to the last and a least-squares
slope in MiB per epoch.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_args(data) -> list:
    """``--data DIR`` for the child commands, or nothing (they then use the dataset lookup)."""
    return ["--data", str(data)] if data else []


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="the MNIST folder (default: the dataset lookup, $NEUROSIM_DATA/mnist or "
                        "the user cache)")
    p.add_argument("--scenario", default=str(REPO / "scenarios" / "pepita_mnist.toml"))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--out", default="/tmp/rss-run")
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "neurosim.cli", "run", a.scenario, *data_args(a.data), "--out",
           str(out), "--no-progress", "--set", f"training.epochs={a.epochs}",
           "--set", f"data.train_limit={a.train_limit}", "--set", "data.test_limit=2000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peaks: dict[int, int] = {}
    t0 = time.perf_counter()
    while proc.poll() is None:
        r = rss_kib(proc.pid)
        try:
            done = max(0, len((out / "metrics.csv").read_text().splitlines()) - 1)
        except OSError:
            done = 0
        if r is not None:
            peaks[done + 1] = max(peaks.get(done + 1, 0), r)
        time.sleep(0.05)
    if proc.returncode != 0:
        sys.exit(f"neurosim run failed: {proc.stderr.read().decode()[-2000:]}")
    wall = time.perf_counter() - t0
    epochs = sorted(k for k in peaks if k <= a.epochs)
    mib = [peaks[k] / 1024 for k in epochs]
    n = len(epochs)
    def slope_of(xs, ys):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)

    slope = slope_of(epochs[1:], mib[1:])
    half = n // 2
    slope2 = slope_of(epochs[half:], mib[half:])
    print(f"{a.epochs} epochs of {Path(a.scenario).name} on {a.train_limit} samples in "
          f"{wall:.0f} s")
    print("epoch  peak RSS (MiB)")
    for k, m in zip(epochs, mib):
        if k <= 3 or k % max(5, n // 12) == 0 or k == epochs[-1]:
            print(f"{k:5d}  {m:8.1f}")
    print(f"growth epoch 2 -> {epochs[-1]}: {mib[-1] - mib[1]:+.1f} MiB; least-squares slope "
          f"over epochs 2..{epochs[-1]}: {slope:+.3f} MiB/epoch, over the second half "
          f"({epochs[half]}..{epochs[-1]}): {slope2:+.3f} MiB/epoch; range over the second half "
          f"{min(mib[half:]):.1f}..{max(mib[half:]):.1f} MiB")
    (out / "rss.json").write_text(json.dumps({"epochs": epochs, "peak_rss_mib": mib,
                                              "slope_mib_per_epoch": slope,
                                              "slope_second_half": slope2, "wall_s": wall},
                                             indent=2))
    return n


if __name__ == "__main__":
    main()
