"""What a newcomer waits for: the quick PEPITA run with an empty numba cache (cold), then again
(warm), wall and CPU time of the whole command.

    python benchmarks/first_run.py --data ../shared/data/mnist [--repeats 2]

Each repeat uses a fresh numba cache directory (NUMBA_CACHE_DIR), so the first run compiles the
kernels and the second loads them. The command is the one issue 10 names:
``neurosim run scenarios/pepita_mnist.toml --data DIR --set training.epochs=1
--set data.train_limit=640``. Run it on an otherwise idle machine (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(data: str, cache: str, out: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    cmd = [sys.executable, "-m", "neurosim.cli", "run", str(REPO / "scenarios/pepita_mnist.toml"),
           "--data", data, "--set", "training.epochs=1", "--set", "data.train_limit=640",
           "--out", out]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise SystemExit(f"the run failed:\n{p.stdout}\n{p.stderr}")
    m = re.search(r"kernels compiled in (\d+) s", p.stderr)
    return {"wall_s": wall, "cpu_s": (after.ru_utime - before.ru_utime)
            + (after.ru_stime - before.ru_stime), "compile_s": float(m.group(1)) if m else 0.0}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the MNIST folder")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load "
          f"{os.getloadavg()[0]:.2f}")
    for r in range(a.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cold = run_once(a.data, os.path.join(tmp, "cache"), os.path.join(tmp, "cold"))
            warm = run_once(a.data, os.path.join(tmp, "cache"), os.path.join(tmp, "warm"))
        print(f"repeat {r}: cold {cold['wall_s']:.1f} s wall ({cold['cpu_s']:.1f} s CPU, kernels "
              f"compiled in {cold['compile_s']:.0f} s), warm {warm['wall_s']:.1f} s wall "
              f"({warm['cpu_s']:.1f} s CPU)")


if __name__ == "__main__":
    main()
