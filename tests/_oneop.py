"""Hand-built programs for the backend tests: buffers in one arena, instructions encoded by
operand name from the op table, and one random case per op with its expected result computed
here in float64 numpy (independently of the op table's reference functions).

Tolerances. ``U = 2**-24`` is the unit roundoff of float32. An expression evaluated in float32
with k roundings on exactly representable inputs is within ``k U sum|terms|`` of its exact
value (first order; ``sum|terms|`` bounds every intermediate result), so each case states k
and the magnitude of its terms. A call of a float32 transcendental function (exp, log, tanh,
the erf of scipy rounded once) counts as ``LIB = 8`` roundings: numpy documents its SIMD
float32 exp, log and tanh within 4 ULP (= 8 U of the result). A GEMM or a reduction over n
terms adds n roundings. Float parameters are drawn as float32 values so that their rounding
adds nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import erf

from neurosim.optable import (BY_CODE, ERF, IDENTITY, OPS, RELU, RMS_EPS, RMS_NORM, SIGMOID,
                              SOFTMAX, TANH, UNARY_CODES, col)

U = 2.0 ** -24
LIB = 8
B = 5                      # the plans' minibatch size
MODES = ("fixed", "batch", "short")
"""fixed: plain (rows, cols) buffers; batch: batch-shaped buffers, a full minibatch (nb = B);
short: batch-shaped buffers, the short last minibatch of a run (nb = 2)."""


def nb_of(mode):
    return 2 if mode == "short" else B


class Prog:
    """A program under construction: named buffers in one float32 arena (batch-shaped ones
    hold ``B`` rows), instructions (operands by name, as the op table lays them out), blocks
    and monitors."""

    def __init__(self, batch=B):
        self.batch = batch
        self.names, self.rows, self.init = {}, [], []
        self.ins, self.blocks, self.mons = [], [], []
        self.size = 0

    def buf(self, name, rows, cols, batch=False, init=None):
        """A buffer; ``rows`` is ignored for a batch-shaped one (it holds ``batch`` rows)."""
        r = self.batch if batch else rows
        a = np.zeros((r, cols), np.float32) if init is None else np.asarray(init, np.float32)
        if a.shape != (r, cols):
            raise AssertionError(f"init of {name}: {a.shape} != {(r, cols)}")
        self.names[name] = len(self.rows)
        self.rows.append((self.size + 3, r, cols, int(batch)))   # a gap before every buffer
        self.init.append(a)
        self.size += 3 + r * cols
        return name

    def op(self, name, **operands):
        spec = OPS[name]
        row = np.zeros(8, np.int64)
        frow = np.zeros(6, np.float64)
        row[0] = spec.code
        vals = {**spec.defaults, **operands}
        unknown = set(operands) - {o.name for o in spec.operands}
        if unknown:
            raise AssertionError(f"{name}: no operands {unknown}")
        for o in spec.operands:
            v = vals.get(o.name, None if o.is_buffer else 0)
            if o.is_float:
                frow[o.col] = v
            elif o.is_buffer:
                row[o.col] = -1 if v is None else self.names[v]
            else:
                row[o.col] = v
        self.ins.append((row, frow))
        return len(self.ins) - 1

    def block(self, first, end, repeat=1, loop=False, phase=0):
        self.blocks.append((first, end, repeat, phase, int(loop)))

    def monitor(self, size, capacity, every, u0=0, sample=-1):
        self.mons.append((size, capacity, every, u0, sample))
        return len(self.mons) - 1

    def arrays(self):
        """(mem, bufs, prog, fprm, blocks, rec, stamps, rec_meta, rec_cnt)."""
        mem = np.full(self.size + 3, np.float32(-7.25), np.float32)   # gaps hold a sentinel
        for (off, r, c, _), a in zip(self.rows, self.init):
            mem[off:off + r * c] = a.ravel()
        bufs = np.array(self.rows, np.int64).reshape(-1, 4)
        prog = np.array([r for r, _ in self.ins], np.int64).reshape(-1, 8)
        fprm = np.array([f for _, f in self.ins], np.float64).reshape(-1, 6)
        blocks = np.array(self.blocks or [(0, len(self.ins), 1, 0, 0)], np.int64)
        meta, voff, soff = [], 0, 0
        for size, cap, every, u0, sample in self.mons:
            meta.append((voff, size, cap, every, u0, u0 + size, sample, soff))
            voff += size * cap
            soff += 2 * cap
        rec_meta = np.array(meta or [(0, 0, 0, 1, 0, 0, -1, 0)], np.int64).reshape(-1, 8)
        rec = np.full(max(voff, 1), np.float32(np.nan), np.float32)
        stamps = np.full(max(soff, 2), -1, np.int64)
        rec_cnt = np.zeros(rec_meta.shape[0], np.int64)
        return mem, bufs, prog, fprm, blocks, rec, stamps, rec_meta, rec_cnt


@dataclass
class Result:
    status: int
    info: np.ndarray
    mem: np.ndarray
    prog: Prog
    bufs: np.ndarray
    rec: np.ndarray
    stamps: np.ndarray
    rec_cnt: np.ndarray
    out: np.ndarray

    def get(self, name, nb=None):
        """Buffer ``name`` as (rows, cols); a batch-shaped one with ``nb`` rows."""
        off, r, c, bt = self.bufs[self.prog.names[name]]
        r = nb if (bt and nb is not None) else r
        return self.mem[off:off + r * c].reshape(r, c)


@dataclass
class Run:
    """How to run a program: data, the call's trial range, keys, scalar slots."""

    X: np.ndarray
    Y: np.ndarray
    T: np.ndarray
    order: np.ndarray
    start: int = 0
    n_trials: int = 1
    trial0: int = 0
    step0: int = 0
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    scal: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    out_cols: int = 0


def to_host(a):
    if isinstance(a, np.ndarray):
        return a
    return np.from_dlpack(a).copy()


def execute(runner, p: Prog, run: Run, xp=np) -> Result:
    """Run program ``p`` with ``runner`` (the numpy backend's signature) on arrays of ``xp``."""
    mem, bufs, prog, fprm, blocks, rec, stamps, rec_meta, rec_cnt = p.arrays()
    out = (np.full((len(run.order), run.out_cols), np.float32(-3.5), np.float32)
           if run.out_cols else np.zeros((1, 1), np.float32))
    info = np.full(4, -1, np.int64)
    mem_x, out_x = xp.asarray(mem), xp.asarray(out)
    st = runner(xp, mem_x, bufs, prog, fprm, blocks, xp.asarray(run.X), xp.asarray(run.Y),
                xp.asarray(run.T), run.order, run.start, run.n_trials, p.batch, run.trial0,
                run.step0, run.keys, run.scal, rec, stamps, rec_meta, rec_cnt, info, out_x)
    return Result(int(st), info, to_host(mem_x), p, bufs, rec, stamps, rec_cnt,
                  to_host(out_x))


# ---- data ------------------------------------------------------------------------------------
def f32(a):
    return np.asarray(a, np.float32)


def rand(rng, shape, lo=-2.0, hi=2.0):
    return f32(rng.uniform(lo, hi, size=shape))


def fparam(rng, lo, hi):
    """A float parameter exactly representable in float32."""
    return float(np.float32(rng.uniform(lo, hi)))


def data_for(rng, mode, d_in=6, n_out=4, n_cls=4):
    """Data and trial range for a mode: one trial; 'short' starts at row B of 7 so nb = 2."""
    n = 2 * B if mode != "short" else B + 2
    X = rand(rng, (n, d_in), 0.0, 1.0)
    Y = rng.integers(0, n_cls, size=n).astype(np.int64)
    T = rand(rng, (n, n_out))
    order = rng.permutation(n).astype(np.int64)
    start = B if mode in ("short", "batch") else 0
    return Run(X, Y, T, order, start=start, trial0=int(rng.integers(0, 50)),
               step0=int(rng.integers(0, 50)))


# ---- float64 twins (written from the op table's documentation, not its code) ------------------
def f64_transfer(code, x):
    x = x.astype(np.float64)
    if code >= RMS_NORM:
        y = f64_transfer(code - RMS_NORM, x)
        return y / (RMS_EPS + np.sqrt(np.mean(y * y, axis=1, keepdims=True)))
    if code == RELU:
        return np.maximum(x, 0.0)
    if code == TANH:
        return np.tanh(x)
    if code == SIGMOID:
        return 1.0 / (1.0 + np.exp(-x))
    if code == ERF:
        return erf(x / math.sqrt(2.0))
    if code == SOFTMAX:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return x


def transfer_tol(code, x):
    """Bound on |f32 f(x) - f(x)| per element (see the module docstring)."""
    x = x.astype(np.float64)
    y = np.abs(f64_transfer(code, x))
    if code >= RMS_NORM:
        # f (kf U relative each), the squares and their n-term sum, the mean, the sqrt, eps,
        # the division: (2 kf + n + 4) U relative, plus 2 U to spare for the reciprocal form
        kf = {IDENTITY: 0, RELU: 0, TANH: LIB, SIGMOID: LIB + 2, ERF: LIB + 5}[code - RMS_NORM]
        return (2 * kf + x.shape[1] + 6) * U * y
    if code in (IDENTITY, RELU):
        return 0.0 * y
    if code == TANH:
        return LIB * U * y
    if code == SIGMOID:       # exp (LIB), 1 + e, the division
        return (LIB + 2) * U * y
    if code == ERF:           # erf(fl(x fl(1/sqrt2))): the argument's two roundings times
        # erf'(z) z <= 1.13 |x| / sqrt2, and the function (LIB)
        return LIB * U * y + 1.6 * U * np.abs(x)
    if code == SOFTMAX:       # x - max, exp (LIB), the n-term sum (whose terms carry the
        # errors of their own exps), the division
        d = np.abs(x - x.max(axis=1, keepdims=True))
        return U * y * (d + d.max(axis=1, keepdims=True) + 2 * LIB + x.shape[1] + 2)
    raise AssertionError(code)


def df64(code, x):
    x = x.astype(np.float64)
    if code == RELU:
        return (x > 0).astype(np.float64)
    if code == TANH:
        return 1.0 - np.tanh(x) ** 2
    if code == SIGMOID:
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 - s)
    if code == ERF:
        return math.sqrt(2.0 / math.pi) * np.exp(-0.5 * x * x)
    return np.ones_like(x)


def df_tol(code, x):
    """Bound on |f32 f'(x) - f'(x)| (absolute; f' <= 1): tanh: 1 - t^2 with t within LIB U,
    the square and the subtraction; sigmoid: s (LIB + 2 U relative), 1 - s, the product;
    erf: x*x, the exp (LIB), the constant and the product."""
    x = x.astype(np.float64)
    if code == TANH:
        return (2 * LIB + 3) * U + 0 * x
    if code == SIGMOID:
        return (LIB + 5) * U + 0 * x
    if code == ERF:
        return df64(ERF, x) * (0.5 * x * x + LIB + 3) * U
    return 0 * x


TRANSFER_LIST = [IDENTITY, RELU, TANH, SIGMOID, ERF, SOFTMAX, RMS_NORM + IDENTITY,
                 RMS_NORM + RELU, RMS_NORM + TANH, RMS_NORM + SIGMOID, RMS_NORM + ERF]


_M64 = (1 << 64) - 1


def _splitmix_u01(key, c):
    """The counter-based uniform of the op table (SplitMix64 finaliser of key + (c + 1) *
    golden ratio; the top 24 bits / 2^24), here in Python integers."""
    z = (key + (c + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return (z >> 40) / float(1 << 24)          # exact in float32


def uniform(key, counters):
    """float32 uniforms of ``counters`` (any shape)."""
    c = np.asarray(counters, np.uint64)
    return np.array([_splitmix_u01(int(key), int(v)) for v in c.ravel()],
                    np.float32).reshape(c.shape)


def normal(key, counters):
    """float64 Box-Muller normals on the uniforms of counters 2c and 2c + 1."""
    c = np.asarray(counters, np.uint64)
    z = [math.sqrt(-2.0 * math.log(1.0 - _splitmix_u01(int(key), 2 * int(v))))
         * math.cos(2.0 * math.pi * _splitmix_u01(int(key), 2 * int(v) + 1)) for v in c.ravel()]
    return np.array(z, np.float64).reshape(c.shape)


# ---- one case per op ---------------------------------------------------------------------------
@dataclass
class Case:
    prog: Prog
    run: Run
    expect: dict                   # buffer name -> (want float64 over the view, tol)
    status: int = 0
    check: object = None           # callable(Result) for monitors and out
    nb: int = B
    scratch: tuple = ()            # buffers the op may overwrite with anything (scratch space)
    tags: dict = field(default_factory=dict)   # the case's discrete choices (code, mask, ...)


CASES = {}


def case(name):
    def deco(fn):
        CASES[name] = fn
        return fn
    return deco


def _setup(rng, mode, **kw):
    run = data_for(rng, mode, **kw)
    return Prog(), run, mode != "fixed", nb_of(mode)


@case("NOP")
def _c_nop(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    p.buf("a", B, 3, bt, rand(rng, (B, 3)))
    p.op("NOP")
    return Case(p, run, {}, nb=nb)


@case("ZERO")
def _c_zero(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    p.buf("a", B, 3, bt, rand(rng, (B, 3)))
    p.op("ZERO", dst="a")
    return Case(p, run, {"a": (np.zeros((nb, 3)), 0.0)}, nb=nb)


@case("GEMM")
def _c_gemm(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    M, N, K = 4, 3, 6
    ta, tb = int(rng.integers(2)), int(rng.integers(2))
    fused = int(rng.integers(2))
    slot = int(rng.integers(-1, 2)) if fused else -1
    run.scal = f32(rng.uniform(0.01, 0.5, 2)).astype(np.float64)
    alpha, beta = fparam(rng, -2, 2), float(rng.choice([0.0, fparam(rng, -1, 1)]))
    lr_scale = fparam(rng, 0.5, 2)
    form = "fixed" if not bt else str(rng.choice(["forward", "update"]))
    if form == "forward":        # c (nb, N) = a (nb, K) @ b(K, N) [b stored (N, K) if tb]
        m = nb
        c = p.buf("c", B, N, True, rand(rng, (B, N)))
        a = p.buf("a", B, K, True, rand(rng, (B, K)))
        ta = 0
        b = p.buf("b", N if tb else K, K if tb else N, False, rand(rng, (N, K) if tb else (K, N)))
        A = p.init[1][:nb]
    elif form == "update":       # c (M, N) = a^T (M, nb) @ b (nb, N)
        m, K = M, nb
        c = p.buf("c", M, N, False, rand(rng, (M, N)))
        a = p.buf("a", B, M, True, rand(rng, (B, M)))
        b = p.buf("b", B, N, True, rand(rng, (B, N)))
        ta, tb = 1, 0
        A = p.init[1][:nb]
    else:
        m = M
        c = p.buf("c", M, N, False, rand(rng, (M, N)))
        a = p.buf("a", K if ta else M, M if ta else K, False, rand(rng, (K, M) if ta else (M, K)))
        b = p.buf("b", N if tb else K, K if tb else N, False, rand(rng, (N, K) if tb else (K, N)))
        A = p.init[1]
    Bm = p.init[2] if not (bt and form == "update") else p.init[2][:nb]
    A64 = (A.T if ta else A).astype(np.float64)
    B64 = (Bm.T if tb else Bm).astype(np.float64)
    C0 = p.init[0][:m].astype(np.float64)
    al = alpha
    if fused:
        al = alpha * (run.scal[slot] * lr_scale if slot >= 0 else 1.0) / nb
    want = al * (A64 @ B64) + beta * C0
    terms = abs(al) * (np.abs(A64) @ np.abs(B64)) + abs(beta) * np.abs(C0)
    p.op("GEMM", c=c, a=a, b=b, trans_a=ta, trans_b=tb, fused=fused, lr_slot=slot,
         alpha=alpha, beta=beta, lr_scale=lr_scale)
    # the k-term dot products, alpha' (rounded once), the scaling, beta c and the sum
    return Case(p, run, {"c": (want, (A64.shape[1] + 4) * U * terms)}, nb=nb)


def _mask_or_none(rng, p, bt, shape, mask=None):
    if rng.integers(2) if mask is None else mask:
        return p.buf("m", B, shape[1], bt, f32(rng.choice([0.0, 1.0, 1.25], size=(B, shape[1]))))
    return None


@case("TRANSFER")
def _c_transfer(rng, mode, code=None, mask=None):
    p, run, bt, nb = _setup(rng, mode)
    code = int(rng.choice(TRANSFER_LIST)) if code is None else code
    n = 7
    p.buf("r", B, n, bt, rand(rng, (B, n)))
    p.buf("d", B, n, bt, rand(rng, (B, n), -3, 3))
    m = _mask_or_none(rng, p, bt, (B, n), mask)
    x = p.init[1][:nb]
    want, tol = f64_transfer(code, x), transfer_tol(code, x)
    if m is not None:
        mk = p.init[2][:nb].astype(np.float64)
        want, tol = want * mk, tol * mk + U * np.abs(want * mk)
    p.op("TRANSFER", r="r", drive="d", code=code, mask=m)
    return Case(p, run, {"r": (want, tol)}, nb=nb, tags={"code": code, "mask": m is not None})


@case("EULER")
def _c_euler(rng, mode, code=None, mask=None):
    p, run, bt, nb = _setup(rng, mode)
    code = int(rng.choice(TRANSFER_LIST)) if code is None else code
    n = 7
    alpha = fparam(rng, 0.05, 1.0)
    p.buf("r", B, n, bt, rand(rng, (B, n)))
    p.buf("d", B, n, bt, rand(rng, (B, n), -3, 3))
    m = _mask_or_none(rng, p, bt, (B, n), mask)
    tmp = p.buf("tmp", B, n, bt) if code == SOFTMAX else None
    r0, x = p.init[0][:nb].astype(np.float64), p.init[1][:nb]
    v, tv = f64_transfer(code, x), transfer_tol(code, x)
    if m is not None:
        mk = p.init[2][:nb].astype(np.float64)
        v, tv = v * mk, tv * mk + U * np.abs(v * mk)
    want = r0 + alpha * (v - r0)
    tol = alpha * tv + 3 * U * (np.abs(r0) + alpha * (np.abs(v) + np.abs(r0)))
    p.op("EULER", r="r", drive="d", code=code, mask=m, tmp=tmp, alpha=alpha)
    return Case(p, run, {"r": (want, tol)}, nb=nb, scratch=("tmp",) if tmp else (),
                tags={"code": code, "mask": m is not None})


@case("AXPY")
def _c_axpy(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s = fparam(rng, -2, 2)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    p.buf("s", B, 4, bt, rand(rng, (B, 4)))
    d, x = (p.init[i][:nb].astype(np.float64) for i in (0, 1))
    p.op("AXPY", dst="d", src="s", scale=s)
    return Case(p, run, {"d": (d + s * x, 2 * U * (np.abs(d) + np.abs(s * x)))}, nb=nb)


@case("COPY")
def _c_copy(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    p.buf("s", B, 4, bt, rand(rng, (B, 4)))
    p.op("COPY", dst="d", src="s")
    return Case(p, run, {"d": (p.init[1][:nb].astype(np.float64), 0.0)}, nb=nb)


def _binary(name, fn, rng, mode):
    """dst = x (op) y with y of shape (R, C), (1, C), (R, 1) or (1, 1) (broadcast)."""
    p, run, bt, nb = _setup(rng, mode)
    C = 4
    form = str(rng.choice(["full", "row", "col", "scalar"]))
    p.buf("d", B, C, bt, rand(rng, (B, C)))
    p.buf("x", B, C, bt, rand(rng, (B, C)))
    if form == "full":
        p.buf("y", B, C, bt, rand(rng, (B, C)))
    elif form == "row":
        p.buf("y", 1, C, False, rand(rng, (1, C)))
    elif form == "col":
        p.buf("y", B, 1, bt, rand(rng, (B, 1)))
    else:
        p.buf("y", 1, 1, False, rand(rng, (1, 1)))
    if name == "DIV":   # denominators away from 0
        y = p.init[2]
        p.init[2] = f32(np.where(np.abs(y) < 0.5, np.sign(y + 1e-3) * 0.5 + y, y))
    x = p.init[1][:nb].astype(np.float64)
    y = p.init[2][:nb].astype(np.float64)
    want = fn(x, y)
    p.op(name, dst="d", x="x", y="y")
    return Case(p, run, {"d": (want, 1.001 * U * np.abs(want))}, nb=nb)


@case("SUB")
def _c_sub(rng, mode):
    return _binary("SUB", np.subtract, rng, mode)


@case("ADD")
def _c_add(rng, mode):
    return _binary("ADD", np.add, rng, mode)


@case("MUL")
def _c_mul(rng, mode):
    return _binary("MUL", np.multiply, rng, mode)


@case("DIV")
def _c_div(rng, mode):
    return _binary("DIV", np.divide, rng, mode)


@case("BIAS")
def _c_bias(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    p.buf("b", 1, 4, False, rand(rng, (1, 4)))
    want = p.init[0][:nb].astype(np.float64) + p.init[1].astype(np.float64)
    p.op("BIAS", dst="d", bias="b")
    return Case(p, run, {"d": (want, U * np.abs(want))}, nb=nb)


def _rows_of(run, nb):
    return run.order[run.start:run.start + nb]


@case("GATHER")
def _c_gather(rng, mode):
    mode = "batch" if mode == "fixed" else mode        # data rows are batch-shaped
    p, run, bt, nb = _setup(rng, mode)
    source = int(rng.integers(2))
    A = run.X if source == 0 else run.T
    p.buf("d", B, A.shape[1], True, rand(rng, (B, A.shape[1])))
    p.op("GATHER", dst="d", source=source)
    return Case(p, run, {"d": (A[_rows_of(run, nb)].astype(np.float64), 0.0)}, nb=nb)


@case("ONEHOT")
def _c_onehot(rng, mode):
    mode = "batch" if mode == "fixed" else mode
    p, run, bt, nb = _setup(rng, mode)
    on, off = fparam(rng, 0.5, 2), fparam(rng, -1, 0.4)
    p.buf("d", B, 4, True, rand(rng, (B, 4)))
    y = run.Y[_rows_of(run, nb)]
    want = np.where(np.arange(4)[None, :] == y[:, None], on, off)
    p.op("ONEHOT", dst="d", on=on, off=off)
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


def _rng_counters(trial, batch, nb, n):
    return (np.uint64(trial) * np.uint64(batch * n)
            + np.arange(nb * n, dtype=np.uint64).reshape(nb, n))


@case("MASK")
def _c_mask(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    keep = fparam(rng, 0.2, 0.95)
    key = np.uint64(rng.integers(0, 2**63))
    run.keys = np.array([7, key], np.uint64)
    p.buf("d", B, 6, bt, rand(rng, (B, 6)))
    rows = nb if bt else B
    u = uniform(key, _rng_counters(run.trial0, B, rows, 6))
    want = np.where(u.astype(np.float64) < keep, np.float32(1.0 / keep), 0.0)
    p.op("MASK", dst="d", key=1, keep=keep)
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("DERIV")
def _c_deriv(rng, mode, code=None, mask=None):
    p, run, bt, nb = _setup(rng, mode)
    code = int(rng.choice(TRANSFER_LIST)) if code is None else code
    p.buf("d", B, 5, bt, rand(rng, (B, 5)))
    p.buf("x", B, 5, bt, rand(rng, (B, 5), -4, 4))
    d0, x = p.init[0][:nb].astype(np.float64), p.init[1][:nb]
    want = d0 * df64(code if code < SOFTMAX else IDENTITY, x)
    tol = np.abs(d0) * df_tol(code, x) + U * np.abs(want)
    p.op("DERIV", dst="d", drive="x", code=code)
    return Case(p, run, {"d": (want, tol)}, nb=nb)


@case("SGD")
def _c_sgd(rng, mode):
    p, run, bt, nb = _setup(rng, mode)   # weights are plain buffers; nb enters through 1/nb
    style = int(rng.integers(4))
    slot = int(rng.integers(-1, 2))
    run.scal = f32(rng.uniform(0.01, 0.5, 2)).astype(np.float64)
    lr_scale, m, wd = fparam(rng, 0.5, 2), fparam(rng, 0, 0.9), fparam(rng, 0, 0.01)
    p.buf("W", 4, 3, False, rand(rng, (4, 3)))
    p.buf("V", 4, 3, False, rand(rng, (4, 3), -0.1, 0.1))
    p.buf("dW", 4, 3, False, rand(rng, (4, 3), -5, 5))
    W, V, dW = (p.init[i].astype(np.float64) for i in range(3))
    lr = run.scal[slot] * lr_scale if slot >= 0 else lr_scale
    if style >= 2:
        s = lr if style == 3 else 1.0
        Wn, Vn = W - s * V, V
        tW, tV = 3 * U * (np.abs(W) + abs(s) * np.abs(V)), 0.0 * V
    else:
        g = dW / nb + wd * W
        tg = 4 * U * (np.abs(dW / nb) + wd * np.abs(W))     # 1/nb, dW/nb, wd W, the sum
        if style == 0:
            Vn = m * V + lr * g
            tV = lr * tg + 3 * U * (m * np.abs(V) + lr * np.abs(g))  # lr's rounding, 2 products
            Wn = W - Vn
            tW = tV + U * (np.abs(W) + np.abs(Vn))
        else:
            Vn = m * V + g
            tV = tg + 2 * U * (m * np.abs(V) + np.abs(g))
            Wn = W - lr * Vn
            tW = lr * tV + 3 * U * (np.abs(W) + lr * np.abs(Vn))
    p.op("SGD", W="W", V="V", dW="dW", style=style, lr_slot=slot, lr_scale=lr_scale,
         momentum=m, wd=wd, limit=1e6)
    return Case(p, run, {"W": (Wn, tW), "V": (Vn, tV)}, nb=nb)


@case("RECORD")
def _c_record(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    C = 6
    p.buf("s", B, C, bt, rand(rng, (B, C)))
    rows = nb if bt else B
    u0, size = int(rng.integers(0, 3)), int(rng.integers(1, 4))
    sample = int(rng.integers(-1, rows))
    per = int(rng.integers(2))
    mon = p.monitor(size, 2, 1, u0=u0, sample=sample)
    src = p.init[0][:rows, u0:u0 + size].astype(np.float64)
    want = src[sample] if sample >= 0 else src.mean(axis=0)
    tol = 0.0 if sample >= 0 else (rows + 1) * U * np.abs(src).mean(axis=0)
    p.op("RECORD", src="s", monitor=mon, per=per)

    def check(res):
        assert res.rec_cnt[0] == 1
        np.testing.assert_array_less(np.abs(res.rec[:size] - want), tol + 1e-300)
        assert np.isnan(res.rec[size:]).all()
        assert list(res.stamps[:2]) == [run.trial0, run.step0]
        assert list(res.stamps[2:]) == [-1, -1]
    return Case(p, run, {}, check=check, nb=nb)


@case("RECORD_STAT")
def _c_record_stat(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    kind, tr = int(rng.integers(2)), int(rng.integers(2))
    p.buf("a", 4, 3, False, rand(rng, (4, 3)))
    p.buf("o", 3 if tr else 4, 4 if tr else 3, False, rand(rng, (3, 4) if tr else (4, 3)))
    mon = p.monitor(1, 3, 1)
    a = p.init[0].astype(np.float64)
    o = p.init[1].astype(np.float64)
    o = o.T if tr else o
    # a statistic stored as float32 (U |val|), computed from float32 data with at worst
    # float32-rounded products: the norm within U relative; the cosine within
    # U (sum|a o| / (|a| |o|) + 2 |c|), the angle within that / sin(angle) radians
    if kind == 0:
        val = float(np.sqrt(np.sum(a * a)))
        tol = 2 * U * val
    else:
        na, no = np.linalg.norm(a), np.linalg.norm(o)
        c = np.sum(a * o) / (na * no)
        val = math.degrees(math.acos(c))
        dc = U * (np.sum(np.abs(a * o)) / (na * no) + 2 * abs(c))
        tol = U * val + math.degrees(dc / math.sqrt(1.0 - c * c))
    p.op("RECORD_STAT", src="a", monitor=mon, kind=kind, other="o" if kind else None,
         transpose=tr)

    def check(res):
        assert res.rec_cnt[0] == 1
        assert abs(float(res.rec[0]) - val) <= tol
        assert list(res.stamps[:2]) == [run.trial0, run.step0]
    return Case(p, run, {}, check=check, nb=nb)


@case("GUARD")
def _c_guard(rng, mode):
    """GUARD(every, skip=1) before an AXPY: the AXPY runs iff trial % every == 0."""
    p, run, bt, nb = _setup(rng, mode)
    every = int(rng.integers(1, 4))
    p.buf("d", B, 3, bt, rand(rng, (B, 3)))
    p.op("GUARD", every=every, skip=1)
    p.op("AXPY", dst="d", src="d", scale=1.0)          # d += d: exact doubling
    d0 = p.init[0][:nb].astype(np.float64)
    want = 2 * d0 if run.trial0 % every == 0 else d0
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("SCALE")
def _c_scale(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s = fparam(rng, -3, 3)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    want = s * p.init[0][:nb].astype(np.float64)
    p.op("SCALE", dst="d", s=s)
    return Case(p, run, {"d": (want, U * np.abs(want))}, nb=nb)


@case("EMBED_LABEL")
def _c_embed_label(rng, mode):
    mode = "batch" if mode == "fixed" else mode
    p, run, bt, nb = _setup(rng, mode)
    source, ncls = int(rng.integers(2)), 4
    on, off = fparam(rng, 0.5, 2), fparam(rng, -1, 0.4)
    p.buf("d", B, 7, True, rand(rng, (B, 7)))
    p.buf("lab", B, 1, True, f32(rng.integers(0, ncls, size=(B, 1))))
    lab = run.Y[_rows_of(run, nb)] if source == 0 else p.init[1][:nb, 0].astype(np.int64)
    want = p.init[0][:nb].astype(np.float64)
    want[:, :ncls] = np.where(np.arange(ncls)[None, :] == lab[:, None], on, off)
    p.op("EMBED_LABEL", dst="d", source=source, labels="lab" if source else None, ncls=ncls,
         on=on, off=off)
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("WRONG_LABEL")
def _c_wrong_label(rng, mode):
    mode = "batch" if mode == "fixed" else mode
    p, run, bt, nb = _setup(rng, mode)
    ncls = 4
    key = np.uint64(rng.integers(0, 2**63))
    run.keys = np.array([key], np.uint64)
    p.buf("d", B, 2, True, rand(rng, (B, 2)))
    y = run.Y[_rows_of(run, nb)]
    u = uniform(key, np.uint64(run.trial0) * np.uint64(B) + np.arange(nb, dtype=np.uint64))
    k = np.minimum(np.floor(u.astype(np.float64) * (ncls - 1)), ncls - 2)
    want = p.init[0][:nb].astype(np.float64)
    want[:, 0] = np.where(k < y, k, k + 1)
    assert (want[:, 0] != y).all()
    p.op("WRONG_LABEL", dst="d", key=0, ncls=ncls)
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("COUNT_CORRECT")
def _c_count_correct(rng, mode):
    mode = "batch" if mode == "fixed" else mode
    p, run, bt, nb = _setup(rng, mode)
    p.buf("o", B, 4, True, rand(rng, (B, 4)))
    p.buf("st", 1, 2, False, f32([[3.0, 17.0]]))
    y = run.Y[_rows_of(run, nb)]
    good = int(np.sum(np.argmax(p.init[0][:nb], axis=1) == y))
    p.op("COUNT_CORRECT", out="o", stats="st")
    return Case(p, run, {"st": (np.array([[3.0 + good, 17.0 + nb]]), 0.0)}, nb=nb)


@case("APPLY")
def _c_apply(rng, mode, code=None, mask=None):
    p, run, bt, nb = _setup(rng, mode)
    code = int(rng.choice(TRANSFER_LIST)) if code is None else code
    p.buf("d", B, 6, bt, rand(rng, (B, 6)))
    p.buf("s", B, 6, bt, rand(rng, (B, 6), -3, 3))
    x = p.init[1][:nb]
    p.op("APPLY", dst="d", src="s", code=code)
    return Case(p, run, {"d": (f64_transfer(code, x), transfer_tol(code, x))}, nb=nb)


@case("ROW_SUMSQ")
def _c_row_sumsq(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s, C = fparam(rng, -2, 2), 6
    p.buf("d", B, 2, bt, rand(rng, (B, 2)))
    p.buf("x", B, C, bt, rand(rng, (B, C)))
    x = p.init[1][:nb].astype(np.float64)
    want = p.init[0][:nb].astype(np.float64)
    want[:, 0] = s * np.sum(x * x, axis=1)
    tol = np.zeros_like(want)
    tol[:, 0] = (C + 2) * U * np.abs(want[:, 0])      # C squares, C - 1 sums, the scale
    p.op("ROW_SUMSQ", dst="d", src="x", scale=s)
    return Case(p, run, {"d": (want, tol)}, nb=nb)


@case("ROW_SCALE")
def _c_row_scale(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    p.buf("s", B, 2, bt, rand(rng, (B, 2)))
    want = p.init[0][:nb].astype(np.float64) * p.init[1][:nb, 0:1].astype(np.float64)
    p.op("ROW_SCALE", dst="d", s="s")
    return Case(p, run, {"d": (want, U * np.abs(want))}, nb=nb)


@case("ROW_NORMALIZE")
def _c_row_normalize(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    eps, C = fparam(rng, 1e-6, 1e-2), 6
    p.buf("d", B, C, bt, rand(rng, (B, C)))
    p.buf("x", B, C, bt, rand(rng, (B, C)))
    x = p.init[1][:nb].astype(np.float64)
    want = x / (eps + np.sqrt(np.mean(x * x, axis=1, keepdims=True)))
    p.op("ROW_NORMALIZE", dst="d", src="x", eps=eps)
    # squares and sums (C), the mean, the sqrt, + eps, the division
    return Case(p, run, {"d": (want, (C + 5) * U * np.abs(want))}, nb=nb)


@case("AFFINE")
def _c_affine(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s, c = fparam(rng, -2, 2), fparam(rng, -2, 2)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    d = p.init[0][:nb].astype(np.float64)
    p.op("AFFINE", dst="d", s=s, c=c)
    return Case(p, run, {"d": (s * d + c, 2 * U * (np.abs(s * d) + abs(c)))}, nb=nb)


@case("COL_MEAN")
def _c_col_mean(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    alpha, beta = fparam(rng, -2, 2), fparam(rng, -1, 1)
    p.buf("d", 1, 4, False, rand(rng, (1, 4)))
    p.buf("x", B, 4, bt, rand(rng, (B, 4)))
    x = p.init[1][:nb].astype(np.float64)
    d = p.init[0].astype(np.float64)
    want = beta * d + alpha * x.mean(axis=0, keepdims=True)
    tol = (nb + 4) * U * (abs(beta) * np.abs(d) + abs(alpha) * np.abs(x).mean(axis=0))
    p.op("COL_MEAN", dst="d", src="x", alpha=alpha, beta=beta)
    return Case(p, run, {"d": (want, tol)}, nb=nb)


def sample_wrong64(p_row, lab, u):
    """A class != lab drawn in proportion to max(p, 0) by inverting the cumulative weights
    (uniform over the others when they carry no mass)."""
    n = len(p_row)
    w = np.where((np.arange(n) != lab) & (p_row > 0), p_row.astype(np.float64), 0.0)
    tot = w.sum()
    if not tot > 0:
        k = min(int(float(u) * (n - 1)), n - 2)
        return k if k < lab else k + 1
    cs = np.cumsum(w)
    j = int(np.searchsorted(cs, float(u) * tot, side="right"))
    return min(j, int(np.nonzero(w)[0].max()))


@case("SAMPLE_WRONG")
def _c_sample_wrong(rng, mode):
    mode = "batch" if mode == "fixed" else mode
    p, run, bt, nb = _setup(rng, mode)
    n = 5
    key = np.uint64(rng.integers(0, 2**63))
    run.keys = np.array([1, 2, key], np.uint64)
    run.Y = rng.integers(0, n, size=run.Y.shape[0]).astype(np.int64)
    probs = rand(rng, (B, n), -0.5, 1.0)
    probs[0] = -np.abs(probs[0])      # no mass: the uniform branch
    p.buf("d", B, 1, True, rand(rng, (B, 1)))
    p.buf("p", B, n, True, probs)
    y = run.Y[_rows_of(run, nb)]
    u = uniform(key, np.uint64(run.trial0) * np.uint64(B) + np.arange(nb, dtype=np.uint64))
    want = np.array([[sample_wrong64(probs[b], y[b], u[b])] for b in range(nb)], np.float64)
    assert (want[:, 0] != y).all()
    p.op("SAMPLE_WRONG", dst="d", probs="p", key=2)
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("GAUSS")
def _c_gauss(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    scale = fparam(rng, 0.1, 2)
    key = np.uint64(rng.integers(0, 2**63))
    run.keys = np.array([key], np.uint64)
    p.buf("d", B, 3, bt, rand(rng, (B, 3)))
    rows = nb if bt else B
    want = scale * normal(key, _rng_counters(run.trial0, B, rows, 3))
    p.op("GAUSS", dst="d", key=0, scale=scale)
    # the normal rounded to float32 (libm's float64 log and cos may differ by an ulp from
    # Python's), the product with scale
    return Case(p, run, {"d": (want, 3 * U * np.abs(want))}, nb=nb)


UNARY_DOMAIN = {"sqrt": (0.1, 4), "rsqrt": (0.1, 4), "exp": (-3, 3), "log": (0.1, 4),
                "abs": (-2, 2), "step": (-2, 2), "recip": (0.2, 3), "square": (-2, 2),
                "pow": (0.1, 3)}


@case("UNARY")
def _c_unary(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    name = str(rng.choice(sorted(UNARY_CODES)))
    lo, hi = UNARY_DOMAIN[name]
    x0 = rand(rng, (B, 5), lo, hi)
    if name == "recip":
        x0 = x0 * f32(rng.choice([-1.0, 1.0], size=x0.shape))
    if name in ("step", "abs"):
        x0[0, :3] = [0.0, -0.0, 1e-30]
    pw = fparam(rng, -2, 2)
    p.buf("d", B, 5, bt, rand(rng, (B, 5)))
    p.buf("x", B, 5, bt, x0)
    x = x0[:nb].astype(np.float64)
    want = {"sqrt": np.sqrt, "rsqrt": lambda v: 1 / np.sqrt(v), "exp": np.exp, "log": np.log,
            "abs": np.abs, "step": lambda v: (v >= 0).astype(np.float64),
            "recip": lambda v: 1 / v, "square": lambda v: v * v,
            "pow": lambda v: v ** pw}[name](x)
    k = {"sqrt": 1, "rsqrt": 3, "exp": LIB, "log": LIB, "abs": 0, "step": 0, "recip": 1,
         "square": 1, "pow": LIB}[name]
    p.op("UNARY", dst="d", src="x", fn=UNARY_CODES[name], p=pw)
    return Case(p, run, {"d": (want, k * U * np.abs(want))}, nb=nb)


@case("ROW_SUM")
def _c_row_sum(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s, C = fparam(rng, -2, 2), 6
    p.buf("d", B, 1, bt, rand(rng, (B, 1)))
    p.buf("x", B, C, bt, rand(rng, (B, C)))
    x = p.init[1][:nb].astype(np.float64)
    want = s * x.sum(axis=1, keepdims=True)
    p.op("ROW_SUM", dst="d", src="x", scale=s)
    return Case(p, run, {"d": (want, (C + 1) * U * abs(s) * np.abs(x).sum(1, keepdims=True))},
                nb=nb)


@case("COL_SUM")
def _c_col_sum(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s, pr = fparam(rng, -2, 2), float(rng.choice([0.0, fparam(rng, -2, 2)]))
    p.buf("d", 1, 4, False, rand(rng, (1, 4)))
    p.buf("x", B, 4, bt, rand(rng, (B, 4)))
    rows = nb if bt else B
    x = p.init[1][:rows].astype(np.float64)
    f = s + pr / rows
    want = f * x.sum(axis=0, keepdims=True)
    p.op("COL_SUM", dst="d", src="x", scale=s, per_row=pr)
    return Case(p, run, {"d": (want, (rows + 2) * U * abs(f) * np.abs(x).sum(0, keepdims=True))},
                nb=nb)


@case("SUM")
def _c_sum(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    s = fparam(rng, -2, 2)
    p.buf("d", 1, 1, False, rand(rng, (1, 1)))
    p.buf("x", B, 4, bt, rand(rng, (B, 4)))
    rows = nb if bt else B
    x = p.init[1][:rows].astype(np.float64)
    want = np.array([[s * x.sum()]])
    p.op("SUM", dst="d", src="x", scale=s)
    return Case(p, run, {"d": (want, (x.size + 1) * U * abs(s) * np.abs(x).sum())}, nb=nb)


@case("FILL")
def _c_fill(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    form = str(rng.choice(["scalar", "row", "col"]))
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    shape = {"scalar": (1, 1), "row": (1, 4), "col": (B, 1)}[form]
    p.buf("s", shape[0], shape[1], bt and form == "col", rand(rng, shape))
    src = p.init[1][:nb] if form == "col" else p.init[1]
    want = np.broadcast_to(src.astype(np.float64), (nb, 4))
    p.op("FILL", dst="d", src="s")
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("LOAD_SCALAR")
def _c_load_scalar(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    run.scal = rng.normal(size=3)            # float64: rounded once to float32
    slot = int(rng.integers(3))
    p.buf("d", B, 2, bt, rand(rng, (B, 2)))
    want = np.full((nb, 2), float(np.float32(run.scal[slot])))
    p.op("LOAD_SCALAR", dst="d", slot=slot)
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("SCALE_BY")
def _c_scale_by(rng, mode):
    p, run, bt, nb = _setup(rng, mode)
    alpha = fparam(rng, -2, 2)
    p.buf("d", B, 4, bt, rand(rng, (B, 4)))
    p.buf("s", 1, 1, False, rand(rng, (1, 1)))
    want = p.init[0][:nb].astype(np.float64) * (alpha * float(p.init[1][0, 0]))
    p.op("SCALE_BY", dst="d", s="s", alpha=alpha)
    return Case(p, run, {"d": (want, 2 * U * np.abs(want))}, nb=nb)


@case("PICK")
def _c_pick(rng, mode):
    """Chosen entries of a (weight-like) matrix by row-major flat index, held as float32."""
    p, run, bt, nb = _setup(rng, mode)
    rows, cols = 5, 7
    idx = rng.choice(rows * cols, size=4, replace=False)
    p.buf("d", 1, 4, False, rand(rng, (1, 4)))
    p.buf("w", rows, cols, False, rand(rng, (rows, cols)))
    p.buf("i", 1, 4, False, idx.reshape(1, 4).astype(np.float32))
    want = p.init[1].astype(np.float64).reshape(-1)[idx].reshape(1, 4)
    p.op("PICK", dst="d", src="w", idx="i")
    return Case(p, run, {"d": (want, 0.0)}, nb=nb)


@case("OUTPUT")
def _c_output(rng, mode):
    mode = "batch" if mode == "fixed" else mode
    p, run, bt, nb = _setup(rng, mode)
    run.out_cols = 3
    p.buf("s", B, 3, True, rand(rng, (B, 3)))
    p.op("OUTPUT", src="s")
    src = p.init[0][:nb]

    def check(res):
        want = np.full((len(run.order), 3), np.float32(-3.5), np.float32)
        want[run.start:run.start + nb] = src
        np.testing.assert_array_equal(res.out, want)
    return Case(p, run, {}, check=check, nb=nb)


# ---- multi-instruction programs (blocks, guards, steps, monitors, failures) -------------------
PROGRAMS = {}


def program(name):
    def deco(fn):
        PROGRAMS[name] = fn
        return fn
    return deco


def _no_data(n_trials=1, trial0=0, step0=0):
    z = np.zeros((1, 1), np.float32)
    return Run(z, np.zeros(1, np.int64), z, np.zeros(0, np.int64), n_trials=n_trials,
               trial0=trial0, step0=step0)


def _rows_data(n, d, seed):
    rng = np.random.default_rng(seed)
    X = rng.random((n, d), dtype=np.float32)
    Y = rng.integers(0, 3, size=n).astype(np.int64)
    return Run(X, Y, np.zeros((1, 1), np.float32), np.arange(n, dtype=np.int64))


@program("guard")
def _p_guard():
    """GUARD(every 3, skip 2), two counters it guards, one it does not; trials 4..13."""
    p = Prog()
    p.buf("one", 1, 1, False, [[1.0]])
    p.buf("a", 1, 1)
    p.buf("b", 1, 1)
    p.buf("c", 1, 1)
    p.op("GUARD", every=3, skip=2)
    p.op("AXPY", dst="a", src="one", scale=1.0)
    p.op("AXPY", dst="b", src="one", scale=2.0)
    p.op("AXPY", dst="c", src="one", scale=1.0)
    return p, _no_data(n_trials=10, trial0=4)


@program("loops")
def _p_loops():
    """Block 0, a loop block of 3 repeats counting in n with a per-step monitor (every 2),
    block 2 with a per-trial monitor; trials 5, 6 from step 10."""
    p = Prog()
    p.buf("one", 1, 1, False, [[1.0]])
    p.buf("n", 1, 1)
    p.buf("pre", 1, 1)
    p.buf("post", 1, 1)
    ms = p.monitor(1, 20, 2)
    mt = p.monitor(1, 20, 1)
    p.op("AXPY", dst="pre", src="n", scale=1.0)        # 0: block 0
    p.op("AXPY", dst="n", src="one", scale=1.0)        # 1: block 1 (loop x 3)
    p.op("RECORD", src="n", monitor=ms, per=0)         # 2
    p.op("AXPY", dst="post", src="n", scale=1.0)       # 3: block 2
    p.op("RECORD", src="n", monitor=mt, per=1)         # 4
    p.block(0, 1)
    p.block(1, 3, repeat=3, loop=True)
    p.block(3, 5)
    return p, _no_data(n_trials=2, trial0=5, step0=10)


@program("short")
def _p_short():
    """11 shuffled rows in minibatches of 4 (the last has 3): GATHER, OUTPUT, COL_SUM into an
    accumulator, a batch-mean monitor and a 1/nb-scaled SGD step."""
    run = _rows_data(11, 3, seed=2)
    run.order = np.random.default_rng(3).permutation(11).astype(np.int64)
    run.n_trials, run.out_cols = 3, 3
    p = Prog(batch=4)
    p.buf("x", 4, 3, True)
    p.buf("tot", 1, 3)
    p.buf("last", 1, 3)
    p.buf("w", 1, 1, False, [[0.0]])
    p.buf("g", 1, 1, False, [[1.0]])
    p.buf("v", 1, 1)
    m = p.monitor(3, 3, 1)
    p.op("GATHER", dst="x", source=0)
    p.op("OUTPUT", src="x")
    p.op("COL_SUM", dst="last", src="x", scale=1.0)
    p.op("AXPY", dst="tot", src="last", scale=1.0)
    p.op("RECORD", src="x", monitor=m, per=1)
    p.op("SGD", W="w", V="v", dW="g", style=1, lr_slot=-1, lr_scale=1.0, momentum=0.0,
         wd=0.0, limit=1e9)
    return p, run


@program("capacity")
def _p_capacity():
    """Units 1..2 of sample row 1 every 2 trials into a monitor of capacity 2, over 6
    minibatches of 4; a second monitor nothing records into."""
    run = _rows_data(8, 4, seed=4)
    run.n_trials = 6
    run.order = np.arange(24, dtype=np.int64) % 8
    p = Prog(batch=4)
    p.buf("x", 4, 4, True)
    m0 = p.monitor(2, 2, 2, u0=1, sample=1)
    p.monitor(1, 2, 1)
    p.op("GATHER", dst="x", source=0)
    p.op("RECORD", src="x", monitor=m0, per=1)
    return p, run


@program("failing")
def _p_failing(k=8):
    """A loop block (2 repeats) counts its repeats in cnt and sets z = log((cnt - k)^2):
    finite, but -inf at the k-th repeat overall; TRANSFER(identity) of z then fails. 6 trials."""
    p = Prog()
    p.buf("one", 1, 1, False, [[1.0]])
    p.buf("k", 1, 1, False, [[float(k)]])
    p.buf("cnt", 1, 1)
    p.buf("e", 1, 1)
    p.buf("z", 1, 1)
    p.buf("r", 1, 1)
    p.buf("after", 1, 1)
    p.op("NOP")                                         # 0  block 0
    p.op("AXPY", dst="cnt", src="one", scale=1.0)       # 1  block 1 (loop x 2)
    p.op("SUB", dst="e", x="cnt", y="k")                # 2
    p.op("MUL", dst="e", x="e", y="e")                  # 3
    p.op("UNARY", dst="z", src="e", fn=UNARY_CODES["log"])   # 4
    p.op("TRANSFER", r="r", drive="z", code=IDENTITY)   # 5
    p.op("AXPY", dst="after", src="one", scale=1.0)     # 6
    p.block(0, 1)
    p.block(1, 7, repeat=2, loop=True)
    return p, _no_data(n_trials=6)


def _zero_denominator(op):
    p = Prog()
    p.buf("x", 1, 3, False, [[1.0, -1.0, 0.0]])
    p.buf("zero", 1, 1 if op == "DIV" else 3)   # UNARY: src has dst's shape (op table)
    p.buf("q", 1, 3)
    p.buf("r", 1, 3)
    if op == "DIV":
        p.op("DIV", dst="q", x="x", y="zero")
    else:
        p.op("UNARY", dst="q", src="zero", fn=UNARY_CODES[op.lower()])
    p.op("TRANSFER", r="r", drive="q", code=IDENTITY)
    return p, _no_data()


ZERO_DENOMINATOR = {"div_zero": lambda: _zero_denominator("DIV"),
                    "recip_zero": lambda: _zero_denominator("RECIP"),
                    "rsqrt_zero": lambda: _zero_denominator("RSQRT")}
"""x / 0, 1 / 0 and 1 / sqrt(0) (IEEE: inf, -inf, NaN), then TRANSFER fails with
NONFINITE_RATE."""


def overwrite_program():
    """COL_SUM into a destination holding NaN and inf: an ``out`` operand is overwritten, so
    the result is the column sums (3, 3) whatever dst held."""
    p = Prog()
    p.buf("d", 1, 2, False, [[np.nan, np.inf]])
    p.buf("x", 3, 2, False, np.ones((3, 2)))
    p.op("COL_SUM", dst="d", src="x", scale=1.0)
    return p, _no_data()


def sgd_program(w0, limit):
    """One SGD step (style 0, lr 0.1, no gradient) on W = w0 with a runaway limit."""
    p = Prog()
    p.buf("W", 1, len(w0), False, [w0])
    p.buf("V", 1, len(w0))
    p.buf("dW", 1, len(w0))
    p.op("SGD", W="W", V="V", dW="dW", style=0, lr_slot=-1, lr_scale=0.1, momentum=0.0,
         wd=0.0, limit=limit)
    return p, _no_data()


for _i, _w in enumerate(([1.0, -2.0], [1.0, -4.0], [np.inf, 9.0], [np.nan, 1.0])):
    PROGRAMS[f"sgd_status_{_i}"] = (lambda w=_w: sgd_program(w, 3.0))


@program("mask_edge")
def _p_mask_edge():
    """MASK with keep = (a drawn uniform u) + 1e-12: float32(keep) == u, yet u < keep."""
    key, n = 12345, 6
    u = uniform(key, np.arange(B * n, dtype=np.uint64))
    keep = float(u[int(np.argmax(u))]) + 1e-12
    assert float(np.float32(keep)) == float(u.max())
    p = Prog()
    p.buf("m", B, n, False)
    p.op("MASK", dst="m", key=0, keep=keep)
    run = _no_data()
    run.keys = np.array([key], np.uint64)
    return p, run


def make_case(op, seed, mode, **force) -> Case:
    """The case of ``op`` for a seed and mode; ``force`` fixes a discrete choice (``code``,
    ``mask`` of TRANSFER, EULER, APPLY, DERIV) instead of drawing it."""
    rng = np.random.default_rng([seed, OPS[op].code, MODES.index(mode)])
    return CASES[op](rng, mode, **force)


CODE_OPS = ("TRANSFER", "EULER", "APPLY", "DERIV")


def code_variants():
    """(op, code, mask) for every transfer code of the ops that take one, with and without a
    mask where the op has one."""
    return [(op, code, mask) for op in CODE_OPS for code in TRANSFER_LIST
            for mask in ((False, True) if op in ("TRANSFER", "EULER") else (None,))]


def check_case(c: Case, res: Result, scale: float = 1.0):
    """Every expected buffer within ``scale`` times its tolerance, every other float of the
    arena (other buffers, rows past nb, the gaps) unchanged, the status as expected."""
    assert res.status == c.status, (res.status, res.info)
    mem0 = c.prog.arrays()[0]
    touched = np.zeros(mem0.shape[0], bool)
    for name in c.scratch:
        touched[region(res, c, name)] = True
    for name, (want, tol) in c.expect.items():
        got = res.get(name, c.nb).astype(np.float64)
        want = np.broadcast_to(want, got.shape)
        tol = np.broadcast_to(np.asarray(tol, np.float64) * scale, got.shape)
        err = np.abs(got - want)
        bad = ~(err <= tol)
        assert not bad.any(), (f"{name}: |got - want| > tol at {np.argwhere(bad)[:5].tolist()}"
                               f"\ngot  {got[bad][:5]}\nwant {want[bad][:5]}\n"
                               f"err {err[bad][:5]}\ntol  {tol[bad][:5]}")
        touched[region(res, c, name)] = True
    np.testing.assert_array_equal(res.mem[~touched], mem0[~touched])
    if c.check is not None:
        c.check(res)


def region(res: Result, c: Case, name: str) -> slice:
    """The floats of the arena that buffer ``name``'s view covers in case ``c``."""
    off, r, cc, bt = res.bufs[c.prog.names[name]]
    return slice(off, off + (c.nb if bt else r) * cc)


def all_ops():
    return [s.name for s in BY_CODE]


__all__ = ["B", "MODES", "Prog", "Run", "Case", "CASES", "PROGRAMS", "ZERO_DENOMINATOR",
           "overwrite_program", "execute", "make_case", "code_variants", "check_case", "region",
           "sgd_program", "all_ops", "U", "col"]
