"""Steady-state training throughput of every rule (BP, FA, DFA, AFA, PEPITA and its variants):
neurosim vs a plain numpy implementation of the same rule vs the rule's GEMM floor, all measured
in the same process, interleaved.

    python benchmarks/rules_throughput.py [--rules bp,fa,...] [--rounds 15] [--window 8]
                                          [--threads N] [--clock cpu|wall]

Each neurosim simulator is compiled from the rule's MNIST scenario (``scenarios/<rule>_mnist.toml``:
784-1024-10, or 784-1024-1024-1024-10 for ``pepita_deep``, batch 64, dropout 0.1, one BLAS
thread). The numpy implementations (:class:`NumpyRule`) are written the way
``benchmarks/baselines.py`` writes PEPITA: vectorised per minibatch, float32, idiomatic numpy
(``h = x @ W.T``, in-place momentum ``V *= m; V += lr/B dW; W -= V``).

The GEMM floor of a rule is the time of its big float32 GEMMs only (those with a 784 x 1024 or
1024 x 1024 operand; :data:`BIG_GEMMS`), preallocated ``np.matmul(..., out=...)``: everything else
is free.

Timing under contention. The machine this was written on is shared (load 4-10 on 2 cores), so
wall-clock timings measure the share of the CPU a process gets, not the code. Every
implementation is therefore timed in *thread CPU time* (``time.thread_time``; BLAS runs
single-threaded in the calling thread, as do the compiled kernels), on short windows of
``--window`` minibatches, the implementations interleaved round after round (``--rounds``), and
the best window of each counts (for the floor too). ``--clock wall`` uses wall-clock time
instead (the right choice on an idle machine). Other processes still cost cache and memory
bandwidth, which this cannot remove.

``--threads N`` gives every implementation N threads (BLAS's pool for numpy and the floor;
numba's pool for neurosim, which splits its GEMMs and element-wise loops itself); the time is then
wall-clock (thread CPU time would miss the other threads), so run it on an idle machine. Idle
pool threads spin for a while before they sleep (OpenBLAS's for about 0.1 s), and a spinning
OpenBLAS worker left by the numpy run takes a core from the next implementation's window:
with N > 1 each window therefore starts after a 0.3 s pause (``--settle``).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import NumpyPEPITA  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RULES = ["bp", "fa", "dfa", "afa", "pepita", "pepita_wd", "pepita_norm", "pepita_wm",
         "pepita_tl", "pepita_hebbian", "pepita_deep"]

# the big GEMMs of one minibatch: ("fwd", n_in, n_out) = (B x n_in) @ (n_in x n_out) as
# x @ W^T; ("upd", n_out, n_in) = (n_out x B) @ (B x n_in) as delta^T @ x
_L1 = [("fwd", 784, 1024), ("upd", 1024, 784)]
BIG_GEMMS = {
    "bp": _L1, "fa": _L1, "dfa": _L1,
    "afa": _L1 + [("fwd", 784, 1024)],                              # u_1 = (s e F^T) W_1^T
    "pepita": _L1 + [("fwd", 784, 1024)],                           # clean, modulated, dW_1
    "pepita_wd": _L1 + [("fwd", 784, 1024)],
    "pepita_norm": _L1 + [("fwd", 784, 1024)],
    "pepita_tl": _L1 + _L1,                                         # 2 passes, 2 steps
    "pepita_hebbian": _L1 + _L1,                                    # h^T x and h~^T x~
    "pepita_wm": _L1 + [("fwd", 784, 1024)] + _L1,                  # + xi W_1^T, xi^T y
    "pepita_deep": [g for n_in in (784, 1024, 1024)
                    for g in (("fwd", n_in, 1024), ("fwd", n_in, 1024), ("upd", 1024, n_in))],
}
SCENARIO = {r: f"{r}_mnist" for r in RULES}
SCENARIO["pepita"] = "pepita_mnist"


# ---------------------------------------------------------------------------------------------
class NumpyRule:
    """One rule in plain numpy (float32, per minibatch), same hyperparameters as the scenario."""

    def __init__(self, rule, sizes, lr, momentum, wd=0.0, dropout=0.1, seed=0, f_scale=0.05,
                 sign=1.0, norm=False, wm=None):
        self.rule, self.sizes = rule, tuple(sizes)
        self.lr, self.m, self.wd, self.p = lr, momentum, wd, dropout
        self.sign, self.norm, self.wm = sign, norm, wm
        rng = np.random.default_rng(seed)
        f32 = np.float32
        self.W = [rng.uniform(-np.sqrt(6 / a), np.sqrt(6 / a), (b, a)).astype(f32)
                  for a, b in zip(sizes[:-1], sizes[1:])]
        self.V = [np.zeros_like(w) for w in self.W]
        if rule == "pepita_tl":
            self.V2 = [np.zeros_like(w) for w in self.W]
        lim = f_scale * np.sqrt(6 / sizes[0])
        self.F = rng.uniform(-lim, lim, (sizes[0], sizes[-1])).astype(f32)
        self.B = [rng.uniform(-np.sqrt(6 / a), np.sqrt(6 / a), (b, a)).astype(f32)
                  for a, b in zip(sizes[1:-1], sizes[2:])]                    # FA
        self.D = [rng.uniform(-np.sqrt(6 / n), np.sqrt(6 / n), (sizes[-1], n)).astype(f32)
                  for n in sizes[1:-1]]                                       # DFA
        if wm is not None:
            L = len(self.W)
            self.sd_f = f_scale * np.sqrt(2 / sizes[0])
            s = (self.sd_f / np.sqrt(np.prod(sizes[1:-1]))) ** (1 / L)
            self.Bf = [(s * rng.standard_normal((a, b))).astype(f32)
                       for a, b in zip(sizes[:-1], sizes[1:])]
            self._product()
        self.rng = np.random.default_rng(seed + 1)

    def _product(self):
        F = self.Bf[0]
        for B in self.Bf[1:]:
            F = F @ B
        self.F = F

    _softmax = staticmethod(NumpyPEPITA._softmax)   # the PEPITA baseline's, shared

    def _masks(self, nb):
        keep = 1 - self.p
        return [(self.rng.random((nb, n), dtype=np.float32) < keep).astype(np.float32) / keep
                for n in self.sizes[1:-1]]

    def _forward(self, x, masks):
        hs, acts, h = [x], [], x
        for l, w in enumerate(self.W[:-1]):
            a = h @ w.T
            acts.append(a)
            h = np.maximum(a, 0) * masks[l]
            if self.norm:
                h = h / (np.linalg.norm(h, axis=1, keepdims=True) + 1e-12)
            hs.append(h)
        return hs, acts, self._softmax(h @ self.W[-1].T)

    def _sgd(self, l, dW, B, V=None):
        V = self.V if V is None else V
        V[l] *= self.m
        if self.wd:
            V[l] += self.lr * (dW / B + self.wd * self.W[l])
        else:
            V[l] += (self.lr / B) * dW
        self.W[l] -= V[l]

    def step(self, x, t):
        B = x.shape[0]
        masks = self._masks(B)
        r = self.rule
        L = len(self.W)
        if r in ("bp", "fa", "dfa", "afa"):
            hs, acts, out = self._forward(x, masks)
            e = out - t
            deltas = [None] * L
            deltas[-1] = e
            if r == "afa":
                u = self.sign * (e @ self.F.T)
                for l in range(L - 1):
                    u = (u @ self.W[l].T) * (acts[l] > 0) * masks[l]
                    deltas[l] = -u
            else:
                d = e
                for l in range(L - 2, -1, -1):
                    back = {"bp": lambda: d @ self.W[l + 1], "fa": lambda: d @ self.B[l],
                            "dfa": lambda: e @ self.D[l]}[r]()
                    d = back * (acts[l] > 0) * masks[l]
                    deltas[l] = d
            for l in range(L):
                self._sgd(l, deltas[l].T @ hs[l], B)
            return
        if r == "pepita_hebbian":
            hs, _, out = self._forward(x, masks)
            e = out - t
            hm, _, _ = self._forward(x + self.sign * (e @ self.F.T), masks)
            for l in range(L):
                post = out if l == L - 1 else hs[l + 1]
                postm = t if l == L - 1 else hm[l + 1]
                self._sgd(l, post.T @ hs[l] - postm.T @ hm[l], B)
            return
        if r == "pepita_tl":
            hs, _, out = self._forward(x, masks)
            e = out - t
            for l in range(L):
                self._sgd(l, (out if l == L - 1 else hs[l + 1]).T @ hs[l], B)
            hm, _, _ = self._forward(x + self.sign * (e @ self.F.T), masks)
            for l in range(L):
                post = t if l == L - 1 else hm[l + 1]
                self._sgd(l, -(post.T @ hm[l]), B, self.V2)
            return
        hs, _, out = self._forward(x, masks)
        e = out - t
        hm, _, outm = self._forward(x + self.sign * (e @ self.F.T), masks)
        err = e if self.sign < 0 else outm - t
        for l in range(L):
            dW = (hs[l + 1] - hm[l + 1]).T @ hm[l] if l < L - 1 else err.T @ hm[l]
            self._sgd(l, dW, B)
        if self.wm is not None:
            lr_wm, wd_wm = self.wm
            for l in range(L):
                xi = 0.1 * self.rng.standard_normal((B, self.W[l].shape[1]), dtype=np.float32)
                xi -= xi.mean()
                a = xi @ self.W[l].T
                y = self._softmax(a) if l == L - 1 else np.maximum(a, 0) * masks[l]
                self.Bf[l] += (lr_wm / B) * (xi.T @ y) - (lr_wm * wd_wm) * self.Bf[l]
            self._product()
            g = (self.sd_f / self.F.std()) ** (1 / L)
            for Bf in self.Bf:
                Bf *= g
            self.F *= g ** L

    def train(self, X, T, batch=64):
        for s in range(0, X.shape[0], batch):
            self.step(X[s:s + batch], T[s:s + batch])


def numpy_model(rule):
    common = dict(dropout=0.1, seed=0)
    if rule == "pepita_deep":
        return NumpyRule("pepita", (784, 1024, 1024, 1024, 10), 0.01, 0.9, **common)
    if rule == "pepita_wd":
        return NumpyRule("pepita", (784, 1024, 10), 0.1, 0.9, wd=1e-4, **common)
    if rule == "pepita_norm":
        return NumpyRule("pepita", (784, 1024, 10), 1.0, 0.9, norm=True, **common)
    if rule == "pepita_wm":
        return NumpyRule("pepita", (784, 1024, 10), 0.1, 0.9, sign=-1.0, wm=(0.1, 0.5), **common)
    if rule == "pepita_tl":
        return NumpyRule("pepita_tl", (784, 1024, 10), 0.01, 0.0, **common)
    if rule == "pepita_hebbian":
        return NumpyRule("pepita_hebbian", (784, 1024, 10), 0.1, 0.9, **common)
    return NumpyRule(rule, (784, 1024, 10), 0.1, 0.9, **common)


def neurosim_sim(rule, threads=1):
    from neurosim import scenario as sc
    from neurosim.training import make_simulator

    settings = sc.load(ROOT / "scenarios" / f"{SCENARIO[rule]}.toml", [f"training.threads={threads}"])
    settings["monitor"] = []      # training only (the scenarios' diagnostics are not the rule)
    return make_simulator(settings)


# ---------------------------------------------------------------------------------------------
class Floor:
    """The rule's big GEMMs, preallocated."""

    def __init__(self, gemms, batch=64, seed=0):
        rng = np.random.default_rng(seed)
        f32 = np.float32
        self.ops = []
        for kind, a, b in gemms:
            if kind == "fwd":      # (B x a) @ (b x a)^T -> (B x b)
                x = rng.random((batch, a), dtype=f32)
                W = rng.standard_normal((b, a), dtype=f32)
                self.ops.append((x, W.T, np.empty((batch, b), f32)))
            else:                  # (B x a)^T @ (B x b) -> (a x b)
                d = rng.standard_normal((batch, a), dtype=f32)
                x = rng.random((batch, b), dtype=f32)
                self.ops.append((d.T, x, np.empty((a, b), f32)))

    def train(self, n_batches):
        for _ in range(n_batches):
            for a, b, c in self.ops:
                np.matmul(a, b, out=c)


def bench(rules, rounds, window, seed=0, clock=time.thread_time, threads=1, settle=0.0):
    rng = np.random.default_rng(seed)
    n = window * 64
    X = rng.random((n, 784), dtype=np.float32)
    Y = rng.integers(0, 10, n)
    T = np.eye(10, dtype=np.float32)[Y]
    order = np.arange(n, dtype=np.int64)
    impls = {}
    for r in rules:
        sim = neurosim_sim(r, threads)
        sim.train(X, Y, order)                              # compile + warm
        impls[(r, "neurosim")] = lambda sim=sim: sim.train(X, Y, order, chunk=window)
        npm = numpy_model(r)
        npm.train(X, T)
        impls[(r, "numpy")] = lambda npm=npm: npm.train(X, T)
        fl = Floor(BIG_GEMMS[r])
        fl.train(2)
        impls[(r, "floor")] = lambda fl=fl: fl.train(window)
    best = {k: float("inf") for k in impls}
    with threadpool_limits(limits=threads):
        for _ in range(rounds):
            for k, fn in impls.items():
                if settle:
                    time.sleep(settle)
                t0 = clock()
                fn()
                best[k] = min(best[k], clock() - t0)
    return {k: n / v for k, v in best.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--window", type=int, default=8, help="minibatches per timed window")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every implementation (forces --clock wall when > 1)")
    ap.add_argument("--settle", type=float, default=None,
                    help="seconds of pause before each timed window (default 0.3 with --threads "
                         "> 1, else 0)")
    args = ap.parse_args(argv)
    if args.threads > 1:
        args.clock = "wall"
    if args.settle is None:
        args.settle = 0.3 if args.threads > 1 else 0.0
    rules = [r for r in args.rules.split(",") if r]
    bad = [r for r in rules if r not in RULES]
    if bad:
        sys.exit(f"unknown rules {bad}; expected some of {RULES}")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    res = bench(rules, args.rounds, args.window, clock=clock, threads=args.threads,
                settle=args.settle)
    print(f"# rule throughput, batch 64, {args.threads} thread(s), best of {args.rounds} interleaved windows "
          f"of {args.window} minibatches, {args.clock} time; "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(f"{'rule':14s} {'neurosim':>10s} {'numpy':>10s} {'floor':>10s} {'vs numpy':>9s} "
          f"{'% floor':>8s}  samples/s")
    out = {}
    for r in rules:
        ns, npy, fl = res[(r, "neurosim")], res[(r, "numpy")], res[(r, "floor")]
        out[r] = dict(neurosim=ns, numpy=npy, floor=fl)
        ok = "ok" if ns >= 1.5 * npy and ns >= 0.6 * fl else "BELOW TARGET"
        print(f"{r:14s} {ns:10.0f} {npy:10.0f} {fl:10.0f} {ns / npy:8.2f}x "
              f"{100 * ns / fl:7.1f}%  {ok}")
    return out


if __name__ == "__main__":
    main()
