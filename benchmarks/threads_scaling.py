"""neurosim alone at 1 and at N threads: training throughput of rule scenarios, nothing else
running in the process (no baseline pools left spinning).

    python benchmarks/threads_scaling.py [--rules bp,pepita] [--threads 2] [--n 2048]

Each rule's MNIST scenario (monitors removed), random MNIST-shaped data, ``--n`` samples per timed
call, best of 3 calls after one warm-up call. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rules_throughput import RULES, neurosim_sim  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default="bp,pepita")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n", type=int, default=2048)
    args = ap.parse_args(argv)
    rules = [r for r in args.rules.split(",") if r]
    bad = [r for r in rules if r not in RULES]
    if bad:
        sys.exit(f"unknown rules {bad}; expected some of {RULES}")
    rng = np.random.default_rng(0)
    X = rng.random((args.n, 784), dtype=np.float32)
    Y = rng.integers(0, 10, args.n)
    order = np.arange(args.n)
    print(f"# neurosim alone, {args.n} samples per call, best of 3; "
          f"{platform.processor() or platform.machine()}")
    print(f"{'rule':14s} {'1 thread':>10s} {f'{args.threads} threads':>11s} {'speed-up':>9s}")
    for rule in rules:
        res = []
        for threads in (1, args.threads):
            sim = neurosim_sim(rule, threads)
            sim.train(X, Y, order)
            best = min(_timed(sim, X, Y, order) for _ in range(3))
            res.append(args.n / best)
        print(f"{rule:14s} {res[0]:10.0f} {res[1]:11.0f} {res[1] / res[0]:8.2f}x", flush=True)


def _timed(sim, X, Y, order):
    t = time.perf_counter()
    sim.train(X, Y, order, chunk=len(order) // sim.plan.batch + 1)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
