"""Forward-Forward training throughput: neurosim vs a plain numpy implementation vs the GEMM
floor, all measured in the same process on the same data.

    python benchmarks/ff_throughput.py [--threads 1] [--n 6000] [--repeats 3] [--profile]

Hinton's reference setup: 784-1000-1000-1000, batch 100, hard negatives from the softmax readout
of layers 2..3, peer normalisation, gradient smoothing, weight cost. One training step of one
minibatch is: the positive pass, the neutral pass with the readout (and its update), the choice
of the hard negative labels, the negative pass, the smoothed updates of weights and biases.

* ``neurosim``: :class:`models.forward_forward.FFSimulator` on the compiled plan (one BLAS thread
  per ``--threads``);
* ``numpy``: :class:`NumpyFF`, the reference algorithm written the way the reference code is
  (Hinton's ffcode and its Python port: ``(in, out)`` weights, row-vector activities, vectorised
  per minibatch), in float32;
* ``GEMM floor``: the time of the minibatch's GEMMs alone (three passes through every layer, the
  readout, and the positive and negative weight gradients of every layer), with preallocated
  operands (``np.matmul(..., out=)``); everything else is free. No implementation built on the
  same BLAS can be faster than this.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
def _logistic(z):
    with np.errstate(over="ignore"):  # exp(-z) overflows to inf for z << 0: p = 0, as intended
        return 1.0 / (1.0 + np.exp(-z))


class NumpyFF:
    """Forward-Forward in plain numpy (float32), following the reference code line by line.

    Parameters mirror ffcode: ``lr`` (epsilon), ``delay`` (gradient smoothing), ``wc`` /
    ``supwc`` (weight costs), ``eps_sup`` (readout learning rate), ``lam`` (peer normalisation),
    ``min_level`` (first hidden layer, 1-based, read by the readout), ``C`` label classes.
    """

    def __init__(self, sizes=(784, 1000, 1000, 1000), C=10, seed=0, lr=0.01, delay=0.9,
                 wc=1e-3, supwc=3e-3, eps_sup=0.1, lam=0.03, min_level=2, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.sizes, self.C, self.dt = tuple(sizes), C, np.dtype(dtype)
        self.lr, self.delay, self.wc, self.supwc, self.eps_sup, self.lam = \
            lr, delay, wc, supwc, eps_sup, lam
        self.W = [(rng.standard_normal((a, b)) / np.sqrt(a)).astype(dtype)
                  for a, b in zip(sizes[:-1], sizes[1:])]
        self.b = [np.zeros(b, dtype) for b in sizes[1:]]
        self.gW = [np.zeros_like(w) for w in self.W]
        self.gb = [np.zeros_like(b) for b in self.b]
        self.m = [np.full(b, 0.5, dtype) for b in sizes[1:]]
        self.sup = list(range(min_level - 1, len(self.W)))
        self.R = {l: np.zeros((sizes[l + 1], C), dtype) for l in self.sup}
        self.gR = {l: np.zeros_like(r) for l, r in self.R.items()}
        self.rng = np.random.default_rng(seed + 1)

    @staticmethod
    def _norm(a):
        return a / (1e-8 + np.sqrt(np.mean(a ** 2, axis=1, keepdims=True)))

    @staticmethod
    def _softmax(z):
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def step(self, x, targets):
        """One minibatch: ``x`` (B, d_in) float, ``targets`` (B, C) one-hot."""
        C, B = self.C, x.shape[0]
        data = x.copy()
        data[:, :C] = targets
        ns = self._norm(data)
        pos_dW, pos_db = [], []
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            states = np.maximum(0, ns @ W + b)
            p = _logistic(np.sum(states ** 2, axis=1, keepdims=True) - W.shape[1])
            d = (1 - p) * states
            self.m[l] = 0.9 * self.m[l] + 0.1 * np.mean(states, axis=0)
            d = d + self.lam * (np.mean(self.m[l]) - self.m[l])
            pos_dW.append(ns.T @ d)
            pos_db.append(np.sum(d, axis=0))
            ns = self._norm(states)
        # neutral label -> readout -> hard negatives
        data[:, :C] = 1.0 / C
        ns = self._norm(data)
        nz = []
        for W, b in zip(self.W, self.b):
            ns = self._norm(np.maximum(0, ns @ W + b))
            nz.append(ns)
        labin = sum(nz[l] @ self.R[l] for l in self.sup)
        labin = labin - labin.max(axis=1, keepdims=True)
        pred = self._softmax(labin)
        dC = targets - pred
        for l in self.sup:
            self.gR[l] = self.delay * self.gR[l] + (1 - self.delay) * (nz[l].T @ dC) / B
            self.R[l] = self.R[l] + self.eps_sup * (self.gR[l] - self.supwc * self.R[l])
        probs = self._softmax(labin - 1000 * targets)
        u = self.rng.random((B, 1), dtype=self.dt)
        chosen = (u < np.cumsum(probs, axis=1)).argmax(axis=1)
        data[:, :C] = np.eye(C, dtype=self.dt)[chosen]
        ns = self._norm(data)
        for l, (W, b) in enumerate(zip(self.W, self.b)):
            states = np.maximum(0, ns @ W + b)
            p = _logistic(np.sum(states ** 2, axis=1, keepdims=True) - W.shape[1])
            d = -p * states
            dW = pos_dW[l] + ns.T @ d
            db = pos_db[l] + np.sum(d, axis=0)
            self.gW[l] = self.delay * self.gW[l] + (1 - self.delay) * dW / B
            self.gb[l] = self.delay * self.gb[l] + (1 - self.delay) * db / B
            self.b[l] = self.b[l] + self.lr * self.gb[l]
            self.W[l] = self.W[l] + self.lr * (self.gW[l] - self.wc * self.W[l])
            ns = self._norm(states)

    def train_epoch(self, X, Y, batch=100):
        eye = np.eye(self.C, dtype=self.dt)
        for s in range(0, X.shape[0] - batch + 1, batch):
            self.step(X[s:s + batch], eye[Y[s:s + batch]])


# ---------------------------------------------------------------------------------------------
def ff_gemm_flops(batch=100, sizes=(784, 1000, 1000, 1000), C=10, min_level=2):
    """2*m*n*k summed over the GEMMs :func:`ff_gemm_floor` times."""
    layers = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    ro = sum(sizes[l] * C for l in range(min_level, len(sizes)))
    return 2 * batch * (3 * layers + ro + 2 * layers + ro)


def ff_gemm_floor(batch=100, sizes=(784, 1000, 1000, 1000), C=10, min_level=2, threads=1,
                  repeats=10, seed=0):
    """Samples/s if a minibatch cost only its GEMMs: 3 passes x every layer, the readout's
    forward and gradient, and 2 gradient GEMMs per layer (positive, negative)."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    f32 = np.float32
    L = len(sizes) - 1
    W = [rng.standard_normal((a, b), dtype=f32) for a, b in zip(sizes[:-1], sizes[1:])]
    acts = [rng.random((batch, n), dtype=f32) for n in sizes]
    outs = [np.empty((batch, n), f32) for n in sizes[1:]]
    dWs = [np.empty_like(w) for w in W]
    R = {l: rng.standard_normal((sizes[l + 1], C), dtype=f32) for l in range(min_level - 1, L)}
    logits, dC = np.empty((batch, C), f32), rng.standard_normal((batch, C), dtype=f32)
    dR = {l: np.empty_like(r) for l, r in R.items()}

    def one():
        for _ in range(3):
            for l in range(L):
                np.matmul(acts[l], W[l], out=outs[l])
        for l, r in R.items():
            np.matmul(acts[l + 1], r, out=logits)
            np.matmul(acts[l + 1].T, dC, out=dR[l])
        for _ in range(2):
            for l in range(L):
                np.matmul(acts[l].T, acts[l + 1], out=dWs[l])

    with threadpool_limits(limits=threads):
        for _ in range(2):
            one()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(3):
                one()
            best = min(best, (time.perf_counter() - t) / 3)
    return batch / best, best


# ---------------------------------------------------------------------------------------------
def neurosim_ff(threads, batch=100, sizes=(784, 1000, 1000, 1000), seed=0):
    sys.path.insert(0, str(HERE.parent))
    from neurosim import compile_plan
    from neurosim.models.forward_forward import FFSimulator, build_ff_network, ff_optimizer

    net = build_ff_network(sizes)
    plan = compile_plan(net.circuit, net.protocol, rules=list(net.rules),
                        optimizer=ff_optimizer(0.01, 100), batch=batch, seed=seed)
    return FFSimulator(plan, threads=threads, network=net)


def best_rate(fn, n, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def profile(sim, X, Y, order, repeats):
    """Share of the minibatch time per operation kind, by no-op substitution."""
    from neurosim.kernels import ops as K

    prog = sim.plan.train.prog
    names = {K.GEMM: "GEMM (sgemm)", K.TRANSFER: "transfer (ReLU + RMS normalisation)",
             K.SGD: "momentum + weight update", K.AXPY: "weight cost, axpy",
             K.APPLY: "activity / sigmoid", K.ROW_SUMSQ: "goodness", K.ROW_SCALE: "third factor",
             K.COL_MEAN: "peer running mean", K.BIAS: "peer term", K.COPY: "copies",
             K.SUB: "readout error", K.EMBED_LABEL: "label embedding",
             K.SAMPLE_WRONG: "hard negatives", K.GATHER: "input gather"}
    n = len(order)

    state = sim.state_dict()

    def run():  # from the same state every time (a no-op'd kind may wreck the weights)
        sim.load_state_dict(state)
        sim.train(X, Y, order, chunk=10_000)

    base = best_rate(run, n, repeats)
    rows = [("total", 1e3 * sim.plan.batch / base, 100.0)]
    saved = prog.copy()
    for op, label in names.items():
        if not np.any(saved[:, 0] == op):
            continue
        prog[:] = saved
        prog[saved[:, 0] == op, 0] = K.NOP
        try:
            r = best_rate(run, n, repeats)
        except Exception:  # e.g. a NaN without the kind: not attributable
            r = float("nan")
        finally:
            prog[:] = saved
        dt = sim.plan.batch / base - sim.plan.batch / r
        rows.append((label, 1e3 * dt, 100 * dt * base / sim.plan.batch))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=6000, help="samples per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--sizes", type=str, default="784,1000,1000,1000")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    sizes = tuple(int(s) for s in args.sizes.split(","))
    B = args.batch
    rng = np.random.default_rng(0)
    X = rng.random((args.n, sizes[0]), dtype=np.float32)
    Y = rng.integers(0, 10, args.n)
    order = np.arange(args.n, dtype=np.int64)
    results = {}

    sim = neurosim_ff(args.threads, B, sizes)
    sim.train(X[:5 * B], Y[:5 * B])  # compile / warm up
    sim.load_state_dict(dict(sim.state_dict(), trial=0))
    results["neurosim"] = best_rate(lambda: sim.train(X, Y, order, chunk=10_000), args.n,
                                    args.repeats)
    npf = NumpyFF(sizes)
    with threadpool_limits(limits=args.threads):
        npf.train_epoch(X[:5 * B], Y[:5 * B], B)
        results["numpy"] = best_rate(lambda: npf.train_epoch(X, Y, B), args.n, args.repeats)
    floor, t_floor = ff_gemm_floor(B, sizes, threads=args.threads)
    results["GEMM floor"] = floor

    print(f"# Forward-Forward {'-'.join(map(str, sizes))}, batch {B}, hard negatives, "
          f"threads={args.threads}, n={args.n}, best of {args.repeats}; "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"# GEMM floor: {ff_gemm_flops(B, sizes) / 1e9:.3f} GFLOP per minibatch, "
          f"{t_floor * 1e3:.1f} ms ({ff_gemm_flops(B, sizes) / t_floor / 1e9:.1f} GFLOP/s)")
    print(f"{'implementation':16s} {'samples/s':>10s} {'ms/batch':>9s} {'% floor':>8s}")
    for k, v in results.items():
        print(f"{k:16s} {v:10.0f} {1e3 * B / v:9.1f} {100 * v / floor:7.1f}%")
    ns = results["neurosim"]
    print(f"neurosim / numpy: {ns / results['numpy']:.2f}x, neurosim / floor: "
          f"{100 * ns / floor:.1f}%")
    if args.profile:
        print("\n# where neurosim's minibatch time goes (no-op substitution, ms per minibatch)")
        for label, ms, pct in profile(sim, X, Y, order, args.repeats):
            print(f"{label:38s} {ms:8.2f} ms {pct:6.1f}%")
    return results


if __name__ == "__main__":
    main()
