"""GEMM floor for PEPITA training throughput.

An upper bound on the samples/s any CPU implementation built on the same BLAS can reach: the
time of one minibatch is taken to be only that of its three big float32 GEMMs

* ``h1  = x  @ W1^T``   (clean pass,      B x d_in  times d_in x n_h)
* ``h1~ = x~ @ W1^T``   (modulated pass,  same shapes)
* ``dW1 = delta^T @ x~`` (weight change,  n_h x B   times B x d_in)

with all operands and outputs preallocated (``np.matmul(..., out=...)``); everything else
(softmax, the output layer, dropout, the momentum update, data movement) is free. With
``full=True`` the small GEMMs of the other layers and of the modulation ``e F^T`` are timed too.

Standalone::

    python benchmarks/gemm_floor.py            # floor for threads=1 and threads=2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

__all__ = ["gemm_floor", "gemm_flops"]


def gemm_flops(batch=64, sizes=(784, 1024, 10), full=False):
    """Floating-point operations (2*m*n*k per GEMM) of one minibatch as :func:`gemm_floor` times it."""
    d_in, n_h = sizes[0], sizes[1]
    flops = 3 * 2 * batch * d_in * n_h
    if full:
        for fan_in, fan_out in zip(sizes[1:-1], sizes[2:]):
            flops += 3 * 2 * batch * fan_in * fan_out
        flops += 2 * batch * sizes[-1] * d_in  # e F^T
    return flops


def _operands(batch, sizes, full, rng):
    f32 = np.float32
    d_in, n_h = sizes[0], sizes[1]
    ops = {
        "x": rng.random((batch, d_in), dtype=f32),
        "x_mod": rng.random((batch, d_in), dtype=f32),
        "W1": rng.standard_normal((n_h, d_in), dtype=f32) * f32(np.sqrt(2.0 / d_in)),
        "delta": rng.standard_normal((batch, n_h), dtype=f32),
        "h1": np.empty((batch, n_h), f32),
        "h1_mod": np.empty((batch, n_h), f32),
        "dW1": np.empty((n_h, d_in), f32),
    }
    if full:
        layers = []
        for fan_in, fan_out in zip(sizes[1:-1], sizes[2:]):
            layers.append({
                "h_in": rng.random((batch, fan_in), dtype=f32),
                "W": rng.standard_normal((fan_out, fan_in), dtype=f32),
                "d": rng.standard_normal((batch, fan_out), dtype=f32),
                "out_a": np.empty((batch, fan_out), f32),
                "out_b": np.empty((batch, fan_out), f32),
                "dW": np.empty((fan_out, fan_in), f32),
            })
        ops["layers"] = layers
        ops["e"] = rng.standard_normal((batch, sizes[-1]), dtype=f32)
        ops["F"] = rng.standard_normal((d_in, sizes[-1]), dtype=f32)
        ops["mod"] = np.empty((batch, d_in), f32)
    return ops


def _one_batch(o, full):
    mm = np.matmul
    W1t = o["W1"].T
    mm(o["x"], W1t, out=o["h1"])
    if full:
        mm(o["e"], o["F"].T, out=o["mod"])
    mm(o["x_mod"], W1t, out=o["h1_mod"])
    mm(o["delta"].T, o["x_mod"], out=o["dW1"])
    if full:
        for lay in o["layers"]:
            Wt = lay["W"].T
            mm(lay["h_in"], Wt, out=lay["out_a"])
            mm(lay["h_in"], Wt, out=lay["out_b"])
            mm(lay["d"].T, lay["h_in"], out=lay["dW"])


def gemm_floor(batch=64, sizes=(784, 1024, 10), threads=1, repeats=20, inner=None,
               min_time=0.02, full=False, seed=0, return_details=False):
    """Samples/s if one minibatch cost only its big float32 GEMMs (numpy BLAS).

    Parameters
    ----------
    batch, sizes : minibatch size and layer widths (input first).
    threads : BLAS threads, set with threadpoolctl for the duration of the measurement.
    repeats : timed repetitions; the best (smallest) per-minibatch time is used.
    inner : minibatches per repetition; default: enough for about ``min_time`` seconds.
    full : also time the small GEMMs (other layers, ``e F^T``).
    return_details : return a dict (``samples_per_s``, ``s_per_batch``, ``gflops``, ...)
        instead of the samples/s float.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes={sizes}; expected at least two layer sizes")
    o = _operands(int(batch), sizes, full, np.random.default_rng(seed))
    with threadpool_limits(limits=int(threads)):
        for _ in range(3):  # warm-up: page in operands, spin up BLAS threads
            _one_batch(o, full)
        if inner is None:
            t0 = time.perf_counter()
            _one_batch(o, full)
            dt = max(time.perf_counter() - t0, 1e-6)
            inner = max(1, int(np.ceil(min_time / dt)))
        best = float("inf")
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            for _ in range(inner):
                _one_batch(o, full)
            best = min(best, (time.perf_counter() - t0) / inner)
    sps = batch / best
    if not return_details:
        return sps
    return {"samples_per_s": sps, "s_per_batch": best,
            "gflops": gemm_flops(batch, sizes, full) / best / 1e9, "threads": int(threads),
            "batch": int(batch), "sizes": sizes, "inner": inner, "repeats": int(repeats),
            "full": bool(full)}


def main(argv=None):
    p = argparse.ArgumentParser(description="GEMM-only throughput floor of PEPITA training.")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sizes", type=str, default="784,1024,10")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--full", action="store_true", help="include the small GEMMs too")
    args = p.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(f"GEMM floor: sizes={sizes} batch={args.batch} float32, best of {args.repeats}"
          f"{' (all GEMMs)' if args.full else ' (3 big GEMMs)'}")
    for t in args.threads:
        d = gemm_floor(args.batch, sizes, threads=t, repeats=args.repeats, full=args.full,
                       return_details=True)
        print(f"threads={t}: {d['samples_per_s']:12.0f} samples/s  "
              f"({d['s_per_batch'] * 1e6:8.1f} us/batch, {d['gflops']:6.1f} GFLOP/s)")


if __name__ == "__main__":
    main()
