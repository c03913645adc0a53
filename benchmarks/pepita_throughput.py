"""Steady-state PEPITA training throughput: neurosim vs plain numpy vs PyTorch (CPU) vs the
GEMM floor, all measured in the same process on the same data.

    python benchmarks/pepita_throughput.py [--threads 1] [--n 12800] [--repeats 3] [--profile]

784-1024-10, batch 64, dropout 0.1, SGD momentum 0.9. Each implementation trains ``--n``
samples of MNIST-shaped random data per repeat, after a warm-up; the best repeat counts.
``--profile`` attributes neurosim's minibatch time to operation kinds by replacing each kind
with a no-op in turn (difference timing).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _load(name):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def best_rate(fn, n, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def neurosim_sim(threads, batch=64, sizes=(784, 1024, 10), fuse=True):
    from neurosim import SGD, Simulator, compile_plan
    from neurosim.models import build_pepita_network

    net = build_pepita_network(sizes, dropout=0.1)
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=0.01, momentum=0.9), batch=batch, seed=0, fuse=fuse)
    return Simulator(plan, threads=threads)


def profile(sim, X, Y, order, repeats):
    """Per-op-kind share of the minibatch time, by no-op substitution."""
    from neurosim.kernels import ops as K

    prog = sim.plan.train.prog
    names = {K.GEMM: "GEMM (sgemm)", K.TRANSFER: "transfer f()+mask+finite check",
             K.SGD: "weight update (W -= V)", K.SUB: "differences (error, h - h~)",
             K.MASK: "dropout mask draw", K.GATHER: "input gather", K.ONEHOT: "one-hot target",
             K.COPY: "copies", K.COUNT_CORRECT: "train-accuracy count", K.AXPY: "axpy"}
    n = len(order)

    def run():
        sim.train(X, Y, order, chunk=10_000)

    base = best_rate(run, n, repeats)
    t_base = n / base
    rows = [("total", 1e6 * t_base * 64 / n * 1, 100.0)]
    saved = prog.copy()
    for op, label in names.items():
        if not np.any(saved[:, 0] == op):
            continue
        prog[:] = saved
        prog[saved[:, 0] == op, 0] = K.NOP
        try:
            r = best_rate(run, n, repeats)
        except Exception:
            r = base
        finally:
            prog[:] = saved
        dt = t_base - n / r
        rows.append((label, 1e6 * dt * 64 / n, 100 * dt / t_base))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=12800)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args(argv)

    baselines = _load("baselines")
    floor_mod = _load("gemm_floor")
    baselines.set_threads(args.threads)
    rng = np.random.default_rng(0)
    X = rng.random((args.n, 784), dtype=np.float32)
    Y = rng.integers(0, 10, args.n)
    order = np.arange(args.n, dtype=np.int64)
    results = {}

    sim = neurosim_sim(args.threads)
    sim.train(X[:640], Y[:640])  # compile / warm
    results["neurosim"] = best_rate(lambda: sim.train(X, Y, order, chunk=10_000), args.n,
                                    args.repeats)
    sim_nf = neurosim_sim(args.threads, fuse=False)
    sim_nf.train(X[:640], Y[:640])
    results["neurosim (fuse=False)"] = best_rate(
        lambda: sim_nf.train(X, Y, order, chunk=10_000), args.n, args.repeats)

    npm = baselines.NumpyPEPITA(seed=0)
    npm.train_epoch(X[:640], Y[:640], rng=np.random.default_rng(1))
    results["numpy"] = best_rate(lambda: npm.train_epoch(X, Y, 64, np.random.default_rng(1),
                                                         shuffle=False), args.n, args.repeats)
    if not args.no_torch and baselines.torch_available():
        tm = baselines.TorchPEPITA(seed=0)
        baselines.set_threads(args.threads)
        tm.train_epoch(X[:640], Y[:640], rng=1)
        results["pytorch"] = best_rate(lambda: tm.train_epoch(X, Y, 64, 1, shuffle=False),
                                       args.n, args.repeats)
    floor = floor_mod.gemm_floor(batch=64, threads=args.threads)
    results["GEMM floor (3 GEMMs)"] = floor

    print(f"# PEPITA 784-1024-10, batch 64, threads={args.threads}, n={args.n}, best of "
          f"{args.repeats}; {platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"{'implementation':28s} {'samples/s':>10s} {'% floor':>8s}")
    for k, v in results.items():
        print(f"{k:28s} {v:10.0f} {100 * v / floor:7.1f}%")
    ns = results["neurosim"]
    print(f"neurosim / numpy: {ns / results['numpy']:.2f}x", end="")
    if "pytorch" in results:
        print(f", neurosim / pytorch: {ns / results['pytorch']:.2f}x", end="")
    print(f", neurosim / floor: {100 * ns / floor:.1f}%")
    if args.profile:
        print("\n# where neurosim's minibatch time goes (no-op substitution, us per minibatch)")
        for label, us, pct in profile(sim, X, Y, order, args.repeats):
            print(f"{label:34s} {us:8.1f} us {pct:6.1f}%")
    return results


if __name__ == "__main__":
    main()
