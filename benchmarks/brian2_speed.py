"""neurosim against Brian2 on the same rate circuits, in one run.

    python benchmarks/brian2_speed.py [--quick] [--targets neurosim,numpy,cython,cpp_standalone]
                                      [--circuits rate100,rate1000,pepita] [--duration 1.0]

Circuits (Euler, dt = 0.1 ms, 1 s of biological time, batch 1, no plasticity, no monitors):

* ``rate100`` / ``rate1000``: ``in`` (N units, tau = 10 ms, identity, clamped to a random x)
  -> ``out`` (N units, tau = 10 ms, relu) through a dense N x N projection. Both populations
  are dynamic, so the projection is recomputed at every step in both simulators.
* ``pepita``: the 784-1024-10 PEPITA circuit of ``build_pepita_network`` in time mode (tau =
  10 ms), one trial of its two phases (clean, modulated) of 0.5 s each, with the error held at
  the end of the clean phase and fed back through F in the modulated phase. Dropout 0 and a
  sigmoid output instead of softmax (softmax is not exported to Brian2; the 10-unit output costs
  the same either way). neurosim's instantaneous input is constant within a phase, so it hoists
  W1 @ x out of the time loop; Brian2 recomputes the 784 x 1024 summed variable at every step.

Each simulator runs in this process with one thread (threadpoolctl, OMP/BLAS variables, Brian2
cython is single-threaded, cpp_standalone without OpenMP); cpp_standalone runs in a subprocess
(one ``set_device`` per process). Caches are warm before timing: neurosim runs one trial first
(numba compilation or cache load), Brian2 numpy/cython run the network for a few steps first
(code generation and Cython compilation), and the cpp_standalone binary is built, then run once
before the timed run. One-off times (compile_plan + JIT, code generation + compilation, g++
build) are reported separately. All simulation times are CPU times of the one simulating thread
(``time.process_time``; Brian2's standalone report function uses ``std::clock``, the same
measure), which a busy shared machine disturbs much less than wall-clock time; the JSON output
also holds wall-clock times. neurosim's time is the best of several runs of one trial. For the
Brian2 runtime targets, the fixed cost of the ``Network.run`` calls of a trial (Brian2
regenerates and checks its code objects at every call: ~0.1-0.5 s) is measured on a 3-step
trial, subtracted, and listed separately, so the table compares the time-stepping itself (the
conservative choice for neurosim's speed-up). The numpy target is run for ``--numpy-duration``
and scaled to the full duration (marked ``*``). The cpp_standalone figure is the in-binary
simulation time measured by Brian2's report function (the whole binary's wall-clock time,
including process start and loading its arrays, in parentheses).

The last line is ``speedup vs brian2 cython: X.Y``: the smallest ratio of Brian2 cython time
to neurosim time over the circuits measured.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

DT = 1e-4
TAU = 0.01
REPORT = 'if (completed >= 1.0) { std::cout << "B2RUN " << elapsed << std::endl; }'
ALL_TARGETS = ("neurosim", "numpy", "cython", "cpp_standalone")
ALL_CIRCUITS = ("rate100", "rate1000", "pepita")


# -- circuits -------------------------------------------------------------------------------------
def build(name: str, duration: float):
    """(circuit, protocol, stimuli) of a benchmark circuit simulated for ``duration`` seconds."""
    from neurosim import Circuit, HeUniform, Phase, Protocol

    rng = np.random.default_rng(0)
    if name.startswith("rate"):
        n = int(name[4:])
        c = Circuit(f"rate-{n}-{n}")
        c.population("in", n, tau=TAU, transfer="identity")
        c.population("out", n, tau=TAU, transfer="relu")
        c.project("in", "out", name="W", init=HeUniform())
        p = Protocol((Phase("run", clamp={"in": "x"}, duration=duration),), mode="time", dt=DT)
        return c, p, {"x": rng.random(n, dtype=np.float32)}
    if name == "pepita":
        from neurosim.interop.brian2_export import exportable_copy
        from neurosim.models import build_pepita_network

        net = build_pepita_network((784, 1024, 10), mode="time", tau=TAU, dt=DT,
                                   phase_duration=duration / 2, dropout=0.0)
        c = exportable_copy(net.circuit, transfers={"output": "sigmoid"})
        return c, net.protocol, {"x": rng.random(784, dtype=np.float32), "t": np.eye(10)[3]}
    raise SystemExit(f"unknown circuit {name!r}; expected one of {ALL_CIRCUITS}")


def n_steps(protocol) -> int:
    return sum(protocol.n_steps(p) for p in protocol.phases)


# -- neurosim ---------------------------------------------------------------------------------------
def bench_neurosim(name, duration, repeats):
    from neurosim import Simulator, compile_plan

    c, p, stim = build(name, duration)
    t0 = time.perf_counter()
    plan = compile_plan(c, p, batch=1, seed=0, output="out" if name.startswith("rate") else None)
    sim = Simulator(plan, threads=1)
    X = stim["x"].reshape(1, -1)
    Y = np.array([int(np.argmax(stim["t"]))]) if "t" in stim else np.zeros(1, np.int64)
    sim.train(X, Y)                      # warm-up: numba JIT / cache load
    t_compile = time.perf_counter() - t0
    best, best_wall, spent, k = float("inf"), float("inf"), 0.0, 0
    while k < repeats or (spent < 1.0 and k < 50):   # short runs: more repeats against noise
        w, c0 = time.perf_counter(), time.process_time()
        sim.train(X, Y)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w
        best, best_wall, spent, k = min(best, cpu), min(best_wall, wall), spent + wall, k + 1
    return dict(run=best, wall=best_wall, compile=t_compile, steps=n_steps(p), repeats=k)


# -- Brian2 runtime (numpy, cython) ---------------------------------------------------------------
def bench_brian2_runtime(name, duration, target, scale=1.0):
    """Time one trial; ``run`` excludes Brian2's fixed cost per ``Network.run`` call (code
    generation and checks, measured on a 3-step trial and reported as ``setup``)."""
    from neurosim.interop import export_brian2

    c, p, stim = build(name, duration)
    # the same object names for every circuit of a kind, so that Brian2's Cython cache
    # (~/.cython/brian_extensions, keyed by the generated code) serves both rate circuits
    gc.collect()
    t0 = time.perf_counter()
    bn = export_brian2(c, p, seed=0, target=target, record=False, prefix=f"bench_{target}")
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    bn.run_trial(stim, steps=3)           # code generation (+ Cython compilation or cache load)
    t_compile = time.perf_counter() - t0
    setup = setup_wall = float("inf")
    for _ in range(3):
        w, c0 = time.perf_counter(), time.process_time()
        bn.run_trial(stim, steps=3)
        setup = min(setup, time.process_time() - c0)
        setup_wall = min(setup_wall, time.perf_counter() - w)
    w, c0 = time.perf_counter(), time.process_time()
    bn.run_trial(stim)
    full, full_wall = time.process_time() - c0, time.perf_counter() - w
    return dict(run=max(full - setup, 0.0) * scale, wall=max(full_wall - setup_wall, 0.0) * scale,
                setup=setup, compile=t_compile, build=t_build, steps=n_steps(p))


# -- Brian2 cpp_standalone (subprocess) -------------------------------------------------------------
def standalone_worker(name, duration, directory):
    """Runs in a subprocess: build the standalone project, run the binary twice, print JSON."""
    import brian2
    from brian2 import device, prefs, set_device

    from neurosim.interop import export_brian2

    prefs.devices.cpp_standalone.openmp_threads = 0
    set_device("cpp_standalone", build_on_run=False, directory=directory)
    c, p, stim = build(name, duration)
    t0 = time.perf_counter()
    bn = export_brian2(c, p, seed=0, record=False, prefix="bench_sa")
    bn.run_trial(stim, report=REPORT)
    t_gen = time.perf_counter() - t0
    t0 = time.perf_counter()
    device.build(directory=directory, compile=True, run=False)
    t_compile = time.perf_counter() - t0
    loops, walls = [], []
    for _ in range(2):                    # the first run warms the file cache
        t0 = time.perf_counter()
        device.run(directory=directory, with_output=False)
        walls.append(time.perf_counter() - t0)
        out = Path(device.results_dir, "stdout.txt").read_text()
        loops.append(sum(float(line.split()[1]) for line in out.splitlines()
                         if line.startswith("B2RUN")))
    print("RESULT " + json.dumps(dict(run=loops[-1], wall=walls[-1], compile=t_compile,
                                      codegen=t_gen, steps=n_steps(p),
                                      brian2=brian2.__version__)))


def bench_standalone(name, duration, keep=None):
    with tempfile.TemporaryDirectory(prefix="b2sa-") as tmp:
        directory = keep or os.path.join(tmp, name)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, __file__, "--standalone-worker", name, "--duration", str(duration),
               "--directory", directory]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        for line in r.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        raise RuntimeError(f"cpp_standalone worker failed for {name}:\n{r.stdout[-3000:]}\n"
                           f"{r.stderr[-3000:]}")


# -- main -------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="rate100 and rate1000 against Brian2 "
                    "cython only, 0.2 s and 0.05 s of biological time (under a minute)")
    ap.add_argument("--targets", default=None, help=f"comma list of {ALL_TARGETS}")
    ap.add_argument("--circuits", default=None, help=f"comma list of {ALL_CIRCUITS}")
    ap.add_argument("--duration", type=float, default=1.0, help="biological time, s (default 1)")
    ap.add_argument("--numpy-duration", type=float, default=0.1, help="biological time of the "
                    "Brian2 numpy runs, scaled to --duration (default 0.1 s)")
    ap.add_argument("--repeats", type=int, default=3, help="neurosim repeats (best counts)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--standalone-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--directory", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.standalone_worker:
        standalone_worker(args.standalone_worker, args.duration, args.directory)
        return 0

    from threadpoolctl import threadpool_limits

    import brian2

    if args.quick:
        targets = ["neurosim", "cython"]
        plan = [("rate100", 0.2), ("rate1000", 0.05)]
    else:
        targets = args.targets.split(",") if args.targets else list(ALL_TARGETS)
        circuits = args.circuits.split(",") if args.circuits else list(ALL_CIRCUITS)
        plan = [(c, args.duration) for c in circuits]
    for t in targets:
        if t not in ALL_TARGETS:
            raise SystemExit(f"unknown target {t!r}; expected one of {ALL_TARGETS}")
    if "neurosim" not in targets:
        targets.insert(0, "neurosim")
    if "cython" in targets:
        try:
            import Cython  # noqa: F401
        except ImportError:
            raise SystemExit("the cython target needs Cython: pip install cython") from None

    print(f"# neurosim vs Brian2 {brian2.__version__}: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, one thread per simulator, dt = {DT * 1e3:g} ms")
    results = {}
    with threadpool_limits(limits=1):
        for circ, dur in plan:
            res = results.setdefault(circ, {"duration": dur})
            res["neurosim"] = bench_neurosim(circ, dur, args.repeats)
            for t in targets:
                if t == "neurosim":
                    continue
                print(f"  ... {circ}: brian2 {t}", file=sys.stderr, flush=True)
                if t == "numpy":
                    d = min(dur, args.numpy_duration)
                    r = bench_brian2_runtime(circ, d, "numpy", scale=dur / d)
                    r["scaled_from"] = d
                elif t == "cython":
                    r = bench_brian2_runtime(circ, dur, "cython")
                else:
                    r = bench_standalone(circ, dur)
                res[t] = r
        # the interpreter's fixed cost per step: the same circuit with one unit per population
        results["_overhead"] = bench_neurosim("rate1", plan[0][1], args.repeats)
    overhead = results.pop("_overhead")

    # -- table ----------------------------------------------------------------------------------
    cols = [t for t in ALL_TARGETS if t in targets]
    head = "| circuit | biological time | " + " | ".join(
        f"{'neurosim' if t == 'neurosim' else 'brian2 ' + t}" for t in cols) + " |"
    print()
    print("Simulation CPU time, s (one-off compile/build time in brackets):")
    print()
    print(head)
    print("|" + "---|" * (len(cols) + 2))
    for circ, res in results.items():
        cells = []
        for t in cols:
            r = res[t]
            run = f"{r['run']:.3g}" + ("*" if "scaled_from" in r else "")
            if t == "cpp_standalone":
                run += f" ({r['wall']:.3g})"
            cells.append(f"{run} [{r['compile']:.3g}]")
        print(f"| {circ} | {res['duration']:g} s ({res['neurosim']['steps']} steps) | "
              + " | ".join(cells) + " |")
    print()
    print("Speed-up of neurosim, and neurosim's time per step:")
    print()
    print("| circuit | " + " | ".join(f"vs brian2 {t}" for t in cols if t != "neurosim")
          + " | neurosim us/step |")
    print("|" + "---|" * (len(cols) + 1))
    speedups = []
    for circ, res in results.items():
        ns = res["neurosim"]["run"]
        cells = []
        for t in cols:
            if t == "neurosim":
                continue
            s = res[t]["run"] / ns
            cells.append(f"{s:.1f}x")
            if t == "cython":
                speedups.append(s)
        per_step = ns / res["neurosim"]["steps"] * 1e6
        print(f"| {circ} | " + " | ".join(cells) + f" | {per_step:.2f} |")
    setups = [f"{circ} {t} {res[t]['setup']:.2f} s" for circ, res in results.items()
              for t in ("numpy", "cython") if t in res]
    if setups:
        print()
        print("Not included above: Brian2's fixed cost of the run() calls of one trial (code "
              "generation and checks, every call): " + ", ".join(setups) + ".")
    ovh = overhead
    if ovh:
        print()
        print(f"neurosim per-step overhead (rate circuit with 1 -> 1 units, {ovh['steps']} steps): "
              f"{ovh['run'] / ovh['steps'] * 1e6:.2f} us/step")
    if any("scaled_from" in res.get("numpy", {}) for res in results.values()):
        print()
        print("* numpy target run for a shorter time and scaled linearly (constant cost per step).")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results, overhead=overhead), indent=2))
    print()
    if speedups:
        print(f"speedup vs brian2 cython: {min(speedups):.1f}")
    else:
        print("speedup vs brian2 cython: n/a (cython target not run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
