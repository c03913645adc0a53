"""Time-mode cost per step, against the GEMM/GEMV bound of the same step, in one run.

    python benchmarks/time_step.py [--threads 1] [--steps-scale 1.0]

Circuits (Euler, dt = 0.1 ms, tau = 10 ms, relu hidden, softmax output):

* ``ff``: input -> hidden -> output with every population dynamic (tau > 0), so both
  projections are recomputed at every step: the GEMM-bound case.
* ``pepita``: the PEPITA circuit as compiled, free-running its modulated phase: the input is
  instantaneous and constant within the phase, so its drive is hoisted out of the loop.
* ``overhead``: one population of 100 units, no projections: the per-step cost of the
  interpreter, the Euler update and the finite check.

The bound is the best time of the step's GEMMs alone (numpy ``matmul`` into preallocated
outputs, same thread count) — it ignores the element-wise work, so fraction = bound / measured.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from neurosim import Circuit, Phase, Protocol, Simulator, compile_plan
from neurosim.models import build_pepita_network


def best(fn, repeats=5):
    fn()
    b = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        b = min(b, time.perf_counter() - t)
    return b


def ff_sim(sizes, batch, threads):
    c = Circuit("ff")
    c.population("input", sizes[0], tau=0.01)
    c.population("hidden", sizes[1], tau=0.01, transfer="relu")
    c.population("output", sizes[2], tau=0.01, transfer="softmax")
    c.project("input", "hidden", name="W1")
    c.project("hidden", "output", name="W2")
    proto = Protocol((Phase("run", clamp={"input": "x"}, duration=1.0),), mode="time", dt=1e-4)
    sim = Simulator(compile_plan(c, proto, batch=batch, output="output"), threads=threads)
    sim.set_stimulus("x", np.random.default_rng(0).random((batch, sizes[0]), dtype=np.float32))
    return sim, "run"


def pepita_sim(sizes, batch, threads):
    net = build_pepita_network(sizes, mode="time", tau=0.01, dt=1e-4, phase_duration=0.1,
                               dropout=0.0)
    sim = Simulator(compile_plan(net.circuit, net.protocol, batch=batch), threads=threads)
    rng = np.random.default_rng(0)
    sim.set_stimulus("x", rng.random((batch, sizes[0]), dtype=np.float32))
    sim.set_stimulus("t", np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], batch)])
    return sim, "modulated"


def overhead_sim(n, threads):
    c = Circuit("single")
    c.population("p", n, tau=0.01, transfer="relu")
    proto = Protocol((Phase("run", clamp={"p": "x"}, duration=1.0),), mode="time", dt=1e-4)
    sim = Simulator(compile_plan(c, proto, batch=1), threads=threads)
    sim.set_stimulus("x", np.ones((1, n), np.float32))
    return sim, "run"


def gemm_bound(shapes, threads, repeats=5):
    """Seconds per step of the GEMMs (m, k, n) alone."""
    rng = np.random.default_rng(1)
    ops = [(rng.random((m, k), dtype=np.float32), rng.random((k, n), dtype=np.float32),
            np.empty((m, n), np.float32)) for m, k, n in shapes]
    inner = 200

    def run():
        for _ in range(inner):
            for a, b, o in ops:
                np.matmul(a, b, out=o)

    with threadpool_limits(threads):
        return best(run, repeats) / inner


def measure(sim, phase, steps, repeats=5):
    return best(lambda: sim.run(steps=steps, phase=phase), repeats) / steps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps-scale", type=float, default=1.0)
    args = ap.parse_args(argv)
    th = args.threads
    rows = []
    for sizes in ((100, 100, 10), (784, 1024, 10)):
        for batch in (1, 64):
            work = batch * sizes[0] * sizes[1]
            steps = max(200, int(args.steps_scale * 2e7 / max(work, 1e4)))
            sim, ph = ff_sim(sizes, batch, th)
            t = measure(sim, ph, steps)
            bound = gemm_bound([(batch, sizes[0], sizes[1]), (batch, sizes[1], sizes[2])], th)
            rows.append(("ff (all dynamic)", sizes, batch, t, bound))
            sim, ph = pepita_sim(sizes, batch, th)
            t = measure(sim, ph, steps)
            bound = gemm_bound([(batch, sizes[1], sizes[2])], th)
            rows.append(("pepita (input hoisted)", sizes, batch, t, bound))
    sim, ph = overhead_sim(100, th)
    t_over = measure(sim, ph, int(args.steps_scale * 200_000))
    print(f"# time mode, Euler dt = 0.1 ms, threads={th}; {platform.machine()}, "
          f"numpy {np.__version__}")
    print(f"{'circuit':24s} {'sizes':>14s} {'batch':>5s} {'us/step':>9s} {'GEMM us':>9s} "
          f"{'% bound':>8s}")
    for name, sizes, batch, t, bound in rows:
        print(f"{name:24s} {'-'.join(map(str, sizes)):>14s} {batch:5d} {1e6 * t:9.2f} "
              f"{1e6 * bound:9.2f} {100 * bound / t:7.1f}%")
    print(f"per-step overhead, 1 population of 100 units (Euler + finite check, no projection): "
          f"{1e6 * t_over:.3f} us")
    return rows, t_over


if __name__ == "__main__":
    main()
