"""The op table: every operation a plan may contain, declared once.

An instruction of a compiled program is one row of ``prog`` (int64: the opcode in column 0,
integer operands in columns 1-7) and one row of ``fprm`` (float64, float operands in columns
0-5). Each :class:`OpSpec` below says, for one operation, which column holds which operand and
what role the operand plays:

=========  ====================================================================================
role       meaning
=========  ====================================================================================
``out``    a buffer the op writes (overwritten)
``inout``  a buffer the op reads and writes (updated in place)
``in``     a buffer the op reads
``opt``    an optional buffer the op reads (``-1``: none)
``int``    an integer parameter (a flag, a count, a class number)
``code``   a transfer or unary-function code (:data:`TRANSFER_CODES`, :data:`UNARY_CODES`)
``key``    an index into the plan's counter-RNG keys
``mon``    an index into the plan's monitors
``slot``   an index into the simulator's scalar slots (float64 values Python sets between
           chunks: learning rates, epoch gates)
``float``  a float parameter (in ``fprm``)
=========  ====================================================================================

From this table derive: the compiler's emitter (:meth:`neurosim.compiler.PlanBuilder.op`
checks names, roles and shapes), the compiled interpreter's operand decoding
(:mod:`neurosim.kernels.ops` reads its columns from :func:`col`), the numpy reference backend
(:mod:`neurosim.backends.numpy_backend` decodes every instruction generically from the table
and calls the op's reference function ``ref``), and the kernel tests (tests/test_numpy_backend.py
checks every op on random operands against float64 numpy, tests/test_backends_agree.py the two
backends against each other).

The reference functions are the numpy semantics of each op, written against the array API
standard (``xp`` is the namespace of the arrays). They receive a :class:`RefContext` and the
decoded operands by name, update ``out``/``inout`` buffers in place and return a status code
(``None`` = OK). The compiled kernels must agree with them within float32 rounding.

Conventions: a buffer is a row-major (rows, cols) float32 matrix; batch-shaped buffers have
``rows = nb``, the current minibatch size. Population state is (batch, units), a weight
matrix is (post, pre). Element-wise binary ops broadcast their second operand from a (1, cols)
row, a (rows, 1) column or a (1, 1) scalar.

Array-API rules the reference functions keep (so that any conforming namespace, e.g. CuPy, runs
them): float parameters enter array expressions as Python floats, which the standard converts
to the array's dtype (``alpha * x`` rounds ``alpha`` to float32 once, exactly as
``np.float32(alpha) * x`` does in numpy); no numpy scalar or numpy function touches an ``xp``
array. Work the standard has no function for (the counter-based random numbers, erf, the
label sampler) runs in numpy on the host and comes back through ``xp.asarray``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .rng import normal01_reference, uniform01_reference

# ---- status codes ------------------------------------------------------------------------------
OK = 0
NONFINITE_RATE = 1
NONFINITE_WEIGHT = 2
WEIGHT_RUNAWAY = 3

# ---- transfer codes (population transfer functions) ---------------------------------------------
IDENTITY, RELU, TANH, SIGMOID, ERF, SOFTMAX = range(6)
RMS_NORM = 8
"""Flag added to an element-wise transfer code (``RMS_NORM + RELU``, ...): the rate is
``f(drive)`` normalised to unit root-mean-square per row, ``f / (RMS_EPS + sqrt(mean f^2))``."""
RMS_EPS = 1e-8
TRANSFER_CODES = {"identity": IDENTITY, "linear": IDENTITY, "relu": RELU, "tanh": TANH,
                  "sigmoid": SIGMOID, "erf": ERF, "softmax": SOFTMAX}

# ---- unary math codes (op UNARY) ----------------------------------------------------------------
U_SQRT, U_RSQRT, U_EXP, U_LOG, U_ABS, U_STEP, U_RECIP, U_SQUARE, U_POW = range(9)
UNARY_CODES = {"sqrt": U_SQRT, "rsqrt": U_RSQRT, "exp": U_EXP, "log": U_LOG, "abs": U_ABS,
               "step": U_STEP, "recip": U_RECIP, "square": U_SQUARE, "pow": U_POW}
"""``step(x) = 1 if x >= 0 else 0``; ``pow`` raises to the op's float parameter ``p``."""

BUFFER_ROLES = ("out", "inout", "in", "opt")


@dataclass(frozen=True)
class Operand:
    name: str
    role: str
    col: int

    @property
    def is_buffer(self) -> bool:
        return self.role in BUFFER_ROLES

    @property
    def is_float(self) -> bool:
        return self.role == "float"


@dataclass(frozen=True)
class OpSpec:
    """One operation: opcode, operands (name, role, column), whether it can fail, its shape
    contract (``shapes(s)`` gets ``{operand: (rows, cols)}`` of the buffers and returns an error
    message or None) and its reference semantics ``ref(ctx, **operands)``."""

    name: str
    code: int
    operands: tuple
    doc: str
    ref: object = None
    shapes: object = None
    status: bool = False
    defaults: dict = field(default_factory=dict)

    def operand(self, name) -> Operand:
        for o in self.operands:
            if o.name == name:
                return o
        raise KeyError(f"op {self.name} has no operand {name!r}")


OPS: dict[str, OpSpec] = {}
BY_CODE: list[OpSpec] = []


def _op(name, operands, doc, *, status=False, shapes=None, defaults=None):
    """Declare an op; ``operands`` is a sequence of "name:role" strings, integer operands
    numbered from column 1 and float operands from column 0 in the order given."""
    ic, fc, ops = 1, 0, []
    for s in operands:
        n, role = s.split(":")
        if role == "float":
            ops.append(Operand(n, role, fc))
            fc += 1
        else:
            ops.append(Operand(n, role, ic))
            ic += 1
    if ic > 8 or fc > 6:
        raise AssertionError(f"op {name}: too many operands")

    def deco(ref):
        spec = OpSpec(name, len(BY_CODE), tuple(ops), doc, ref, shapes, status,
                      dict(defaults or {}))
        OPS[name] = spec
        BY_CODE.append(spec)
        return ref

    return deco


def col(op: str, operand: str) -> int:
    """Column of ``operand`` of ``op`` (in ``prog`` for ints/buffers, ``fprm`` for floats)."""
    return OPS[op].operand(operand).col


def code(op: str) -> int:
    return OPS[op].code


@dataclass
class RefContext:
    """Run-time information the reference semantics need."""

    xp: object
    nb: int = 1                 # rows of batch-shaped buffers in this trial
    batch: int = 1              # the plan's (maximum) minibatch size
    trial: int = 0
    step: int = 0
    X: object = None            # data rows of this minibatch (nb, features)
    Y: object = None            # integer labels of this minibatch (nb,)
    T: object = None            # float targets of this minibatch (nb, outputs)
    keys: object = None         # uint64 keys
    scalars: object = None      # float64 scalar slots
    due: object = None          # callable(monitor, per) -> bool: whether the monitor records
                                # now (its counter, step for per 0 or trial for per 1, is a
                                # multiple of its period and it has room left)
    record: object = None       # callable(monitor, array) for RECORD: append a record
    record_stat: object = None  # callable(monitor, value) for RECORD_STAT: append a value
    out: object = None          # (rows of order, cols) array that OUTPUT writes
    row0: int = 0               # index in order of this minibatch's first row


# ---- helpers of the reference semantics ---------------------------------------------------------
def f_ref(xp, code_, x):
    """The transfer function ``code_`` applied to ``x`` (float32 in, float32 out)."""
    if code_ >= RMS_NORM:
        y = f_ref(xp, code_ - RMS_NORM, x)
        ms = xp.sum(y * y, axis=1, keepdims=True) / float(y.shape[1])
        return y / (RMS_EPS + xp.sqrt(ms))
    if code_ == RELU:  # x <= 0 -> 0, so that a NaN drive stays NaN (and is reported)
        return xp.where(x <= 0, xp.zeros_like(x), x)
    if code_ == TANH:
        return xp.tanh(x)
    if code_ == SIGMOID:
        with np.errstate(over="ignore"):    # exp(-x) = inf for x << 0 gives 0, as the kernel
            return 1.0 / (1.0 + xp.exp(-x))
    if code_ == ERF:
        return _erf(xp, x * (1.0 / math.sqrt(2.0)))
    if code_ == SOFTMAX:
        e = xp.exp(x - xp.max(x, axis=1, keepdims=True))
        return e / xp.sum(e, axis=1, keepdims=True)
    return x


def astype(xp, a, dtype):
    """``a`` as ``dtype`` in namespace ``xp`` (array API ``astype``, or the method)."""
    f = getattr(xp, "astype", None)
    return f(a, dtype) if f is not None else a.astype(dtype)


def df_ref(xp, code_, x):
    if code_ == RELU:
        return xp.where(x > 0, xp.ones_like(x), xp.zeros_like(x))
    if code_ == TANH:
        t = xp.tanh(x)
        return 1.0 - t * t
    if code_ == SIGMOID:
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + xp.exp(-x))
        return s * (1.0 - s)
    if code_ == ERF:
        return math.sqrt(2.0 / math.pi) * xp.exp(-0.5 * x * x)
    return xp.ones_like(x)


def _erf(xp, x):
    # the array API has no erf; go through numpy (host) and back
    from scipy.special import erf

    a = to_numpy(x).astype(np.float64)
    return xp.asarray(erf(a).astype(np.float32))


def to_numpy(a):
    """A host numpy copy (or view) of the array ``a`` of any namespace."""
    if isinstance(a, np.ndarray):
        return a
    get = getattr(a, "get", None)          # CuPy: device to host
    if get is not None:
        return get()
    try:
        return np.from_dlpack(a)           # any CPU array of the array API (DLPack)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.asarray(a)


def unary_ref(xp, c, x, p):
    if c == U_SQRT:
        return xp.sqrt(x)
    if c == U_RSQRT:
        return 1.0 / xp.sqrt(x)
    if c == U_EXP:
        return xp.exp(x)
    if c == U_LOG:
        return xp.log(x)
    if c == U_ABS:
        return xp.abs(x)
    if c == U_STEP:
        return xp.where(x >= 0, xp.ones_like(x), xp.zeros_like(x))
    if c == U_RECIP:
        return 1.0 / x
    if c == U_SQUARE:
        return x * x
    if c == U_POW:
        return x ** float(p)
    raise ValueError(f"unknown unary code {c}")


def _f32(xp, v):
    return xp.asarray(v, dtype=xp.float32)


def _finite(xp, a) -> bool:
    return bool(xp.all(xp.isfinite(a)))


def _same(s, *names):
    shp = [s[n] for n in names if n in s]
    if len(set(shp)) > 1:
        return "shapes " + ", ".join(f"{n} {s[n]}" for n in names if n in s) + " differ"
    return None


def _bcast(s, dst, y):
    r, c = s[dst]
    yr, yc = s[y]
    if (yr, yc) in ((r, c), (1, c), (r, 1), (1, 1)):
        return None
    return f"{y} {s[y]} does not broadcast to {dst} {s[dst]}"


# ---- the table ------------------------------------------------------------------------------------
@_op("NOP", (), "Nothing.")
def _nop(ctx):
    return None


@_op("ZERO", ("dst:out",), "dst = 0")
def _zero(ctx, dst):
    dst[...] = 0.0


@_op("GEMM", ("c:inout", "a:in", "b:in", "trans_a:int", "trans_b:int", "fused:int",
              "lr_slot:slot", "alpha:float", "beta:float", "lr_scale:float"),
     "c = alpha' op(a) @ op(b) + beta c, alpha' = alpha, or with fused = 1 "
     "alpha * lr_scale * scalars[lr_slot] / nb (a momentum step folded into the GEMM "
     "that makes an update; lr_slot -1: factor 1 / nb only).",
     defaults=dict(trans_a=0, trans_b=0, fused=0, lr_slot=-1, alpha=1.0, beta=0.0, lr_scale=1.0))
def _gemm(ctx, c, a, b, trans_a, trans_b, fused, lr_slot, alpha, beta, lr_scale):
    xp = ctx.xp
    A = a.T if trans_a else a
    B = b.T if trans_b else b
    al = alpha
    if fused:
        lr = ctx.scalars[lr_slot] * lr_scale if lr_slot >= 0 else 1.0
        al = alpha * lr / ctx.nb
    prod = xp.matmul(A, B)
    if beta == 0.0:
        c[...] = float(al) * prod
    else:
        c[...] = float(al) * prod + float(beta) * c


@_op("TRANSFER", ("r:out", "drive:in", "code:code", "mask:opt"),
     "r = f(drive) [* mask]; fails (NONFINITE_RATE) if a rate is not finite.", status=True)
def _transfer(ctx, r, drive, code, mask):
    xp = ctx.xp
    v = f_ref(xp, code, drive)
    if mask is not None:
        v = v * mask
    r[...] = v
    return None if _finite(xp, r) else NONFINITE_RATE


@_op("EULER", ("r:inout", "drive:in", "code:code", "mask:opt", "tmp:opt", "alpha:float"),
     "r += alpha (f(drive) [* mask] - r): an (exponential-)Euler step of tau dr/dt = -r + "
     "f(drive); tmp is scratch for softmax. Fails (NONFINITE_RATE) on a non-finite rate.",
     status=True)
def _euler(ctx, r, drive, code, mask, tmp, alpha):
    xp = ctx.xp
    v = f_ref(xp, code, drive)
    if mask is not None:
        v = v * mask
    r[...] = r + float(alpha) * (v - r)
    return None if _finite(xp, r) else NONFINITE_RATE


@_op("AXPY", ("dst:inout", "src:in", "scale:float"), "dst += scale src", defaults=dict(scale=1.0))
def _axpy(ctx, dst, src, scale):
    dst[...] = dst + float(scale) * src


@_op("COPY", ("dst:out", "src:in"), "dst = src")
def _copy(ctx, dst, src):
    dst[...] = src


@_op("SUB", ("dst:out", "x:in", "y:in"), "dst = x - y (y broadcast)", shapes=None)
def _sub(ctx, dst, x, y):
    dst[...] = x - y


@_op("BIAS", ("dst:inout", "bias:in"), "dst += bias (a (1, cols) row added to every row)")
def _bias(ctx, dst, bias):
    dst[...] = dst + bias


@_op("GATHER", ("dst:out", "source:int"), "dst = the minibatch's rows of X (source 0) or T (1)")
def _gather(ctx, dst, source):
    dst[...] = ctx.X if source == 0 else ctx.T


@_op("ONEHOT", ("dst:out", "on:float", "off:float"),
     "dst[b, c] = on if c == label[b] else off", defaults=dict(on=1.0, off=0.0))
def _onehot(ctx, dst, on, off):
    xp = ctx.xp
    cls = xp.arange(dst.shape[1])[None, :]
    dst[...] = xp.where(ctx.Y[:, None] == cls, _f32(xp, on), _f32(xp, off))


def _counters(trial, batch, nb, n, row0=0):
    """Counters ``trial*batch*n + (row0 + b)*n + j`` of an (nb, n) block (host uint64)."""
    base = np.uint64(trial) * np.uint64(batch * n) + np.uint64(row0 * n)
    return base + np.arange(nb * n, dtype=np.uint64).reshape(nb, n)


@_op("MASK", ("dst:out", "key:key", "keep:float"),
     "inverted-dropout mask: dst = Bernoulli(keep) / keep from counter trial*batch*n + row*n + "
     "unit")
def _mask(ctx, dst, key, keep):
    nb, n = dst.shape
    u = uniform01_reference(key, _counters(ctx.trial, ctx.batch, nb, n))
    inv = np.float32(1.0 / keep)
    # compared in float64 like the compiled kernel (u < float32(keep) differs when u is the
    # float32 rounding of keep)
    dst[...] = ctx.xp.asarray(np.where(u.astype(np.float64) < keep, inv, np.float32(0.0)))


@_op("DERIV", ("dst:inout", "drive:in", "code:code"), "dst *= f'(drive)")
def _deriv(ctx, dst, drive, code):
    dst[...] = dst * df_ref(ctx.xp, code, drive)


@_op("MUL", ("dst:out", "x:in", "y:in"), "dst = x * y (y broadcast)")
def _mul(ctx, dst, x, y):
    dst[...] = x * y


@_op("SGD", ("W:inout", "V:inout", "dW:in", "style:int", "lr_slot:slot", "lr_scale:float",
             "momentum:float", "wd:float", "limit:float"),
     "SGD with momentum on a summed-over-batch update dW; lr = lr_scale * scalars[lr_slot]. "
     "style 0 (reference): V = m V + lr (dW/nb + wd W); W -= V. style 1 (torch): V = m V + "
     "dW/nb + wd W; W -= lr V. styles 2/3: V already holds the new velocity (fused into the "
     "GEMM): W -= V (2) or W -= lr V (3). Fails with NONFINITE_WEIGHT or WEIGHT_RUNAWAY "
     "(|W| > limit).", status=True)
def _sgd(ctx, W, V, dW, style, lr_slot, lr_scale, momentum, wd, limit):
    xp = ctx.xp
    lr = float(ctx.scalars[lr_slot] * lr_scale if lr_slot >= 0 else lr_scale)
    if style >= 2:
        s = lr if style == 3 else 1.0
        W[...] = W - s * V
    else:
        g = dW * (1.0 / ctx.nb) + float(wd) * W
        if style == 0:
            V[...] = float(momentum) * V + lr * g
            W[...] = W - V
        else:
            V[...] = float(momentum) * V + g
            W[...] = W - lr * V
    if not _finite(xp, W):
        return NONFINITE_WEIGHT
    if bool(xp.any(xp.abs(W) > float(limit))):
        return WEIGHT_RUNAWAY
    return None


@_op("RECORD", ("src:in", "monitor:mon", "per:int"),
     "record src (a unit range, one row or the batch mean, per the monitor) every `every` steps "
     "(per 0) or trials (per 1)", defaults=dict(per=1))
def _record(ctx, src, monitor, per):
    if ctx.due(monitor, per):
        ctx.record(monitor, src)


@_op("RECORD_STAT", ("src:in", "monitor:mon", "kind:int", "other:opt", "transpose:int"),
     "record a statistic every `every` trials: kind 0 = Frobenius norm of src; kind 1 = angle "
     "(degrees) between src and other (or other^T)", defaults=dict(kind=0, transpose=0))
def _record_stat(ctx, src, monitor, kind, other, transpose):
    if not ctx.due(monitor, 1):
        return
    xp = ctx.xp
    a = astype(xp, src, xp.float64)
    if kind == 0:
        val = float(xp.sqrt(xp.sum(a * a)))
    else:
        b = other.T if transpose else other
        b = astype(xp, b, xp.float64)
        na, nb_ = float(xp.sqrt(xp.sum(a * a))), float(xp.sqrt(xp.sum(b * b)))
        if na == 0.0 or nb_ == 0.0:
            val = float("nan")
        else:
            cs = min(1.0, max(-1.0, float(xp.sum(a * b)) / (na * nb_)))
            val = math.degrees(math.acos(cs))
    ctx.record_stat(monitor, val)


@_op("GUARD", ("every:int", "skip:int"),
     "skip the next `skip` instructions unless trial % every == 0 (emitted by "
     "PlanBuilder.every; skip is computed when the program is encoded)")
def _guard(ctx, every, skip):
    return None  # interpreted by the program runner


@_op("SCALE", ("dst:inout", "s:float"), "dst *= s")
def _scale(ctx, dst, s):
    dst[...] = dst * float(s)


@_op("EMBED_LABEL", ("dst:inout", "source:int", "labels:opt", "ncls:int", "on:float",
                     "off:float"),
     "dst[:, :ncls] = one-hot of the true labels (source 0) or of column 0 of `labels` "
     "(source 1), on/off values")
def _embed_label(ctx, dst, source, labels, ncls, on, off):
    xp = ctx.xp
    lab = ctx.Y if source == 0 else astype(xp, labels[:, 0], xp.int64)
    cls = xp.arange(ncls)[None, :]
    dst[:, :ncls] = xp.where(lab[:, None] == cls, _f32(xp, on), _f32(xp, off))


@_op("WRONG_LABEL", ("dst:out", "key:key", "ncls:int"),
     "dst[b, 0] = a label != Y[b], uniform over the ncls - 1 others (counter trial*batch + b)")
def _wrong_label(ctx, dst, key, ncls):
    nb = dst.shape[0]
    c = np.uint64(ctx.trial) * np.uint64(ctx.batch) + np.arange(nb, dtype=np.uint64)
    u = uniform01_reference(key, c)
    k = np.minimum((u.astype(np.float64) * (ncls - 1)).astype(np.int64), ncls - 2)
    y = to_numpy(ctx.Y)
    dst[:, 0] = ctx.xp.asarray(np.where(k < y, k, k + 1).astype(np.float32))


@_op("COUNT_CORRECT", ("out:in", "stats:inout"),
     "stats[0, 0] += argmax(out) == label, stats[0, 1] += rows")
def _count_correct(ctx, out, stats):
    xp = ctx.xp
    good = int(xp.sum(astype(xp, xp.argmax(out, axis=1) == ctx.Y, xp.int64)))
    stats[0, 0] = stats[0, 0] + good
    stats[0, 1] = stats[0, 1] + out.shape[0]


@_op("APPLY", ("dst:out", "src:in", "code:code"), "dst = f(src) (transfer code)")
def _apply(ctx, dst, src, code):
    dst[...] = f_ref(ctx.xp, code, src)


@_op("ROW_SUMSQ", ("dst:out", "src:in", "scale:float"), "dst[b, 0] = scale sum_j src[b, j]^2",
     defaults=dict(scale=1.0))
def _row_sumsq(ctx, dst, src, scale):
    dst[:, 0] = float(scale) * ctx.xp.sum(src * src, axis=1)


@_op("ROW_SCALE", ("dst:inout", "s:in"), "dst[b, :] *= s[b, 0]")
def _row_scale(ctx, dst, s):
    dst[...] = dst * s[:, 0:1]


@_op("ROW_NORMALIZE", ("dst:out", "src:in", "eps:float"),
     "dst[b] = src[b] / (eps + sqrt(mean_j src[b, j]^2)) (unit RMS)")
def _row_normalize(ctx, dst, src, eps):
    xp = ctx.xp
    ms = xp.sum(src * src, axis=1, keepdims=True) / src.shape[1]
    dst[...] = src / (float(eps) + xp.sqrt(ms))


@_op("AFFINE", ("dst:inout", "s:float", "c:float"), "dst = s dst + c")
def _affine(ctx, dst, s, c):
    dst[...] = float(s) * dst + float(c)


@_op("COL_MEAN", ("dst:inout", "src:in", "alpha:float", "beta:float"),
     "dst[0, j] = beta dst[0, j] + alpha mean_b src[b, j]")
def _col_mean(ctx, dst, src, alpha, beta):
    xp = ctx.xp
    m = xp.sum(src, axis=0) * float(alpha / src.shape[0])
    dst[0, :] = float(beta) * dst[0, :] + m


@_op("SAMPLE_WRONG", ("dst:out", "probs:in", "key:key"),
     "dst[b, 0] = a label != Y[b] drawn in proportion to max(probs[b], 0) over the other "
     "classes (uniform if they carry no mass); counter trial*batch + b")
def _sample_wrong(ctx, dst, probs, key):
    p = to_numpy(probs).astype(np.float64)
    y = to_numpy(ctx.Y)
    nb, n = p.shape
    c = np.uint64(ctx.trial) * np.uint64(ctx.batch) + np.arange(nb, dtype=np.uint64)
    u = uniform01_reference(key, c)
    out = np.empty(nb, np.float32)
    for b in range(nb):
        out[b] = sample_excluding_reference(p[b], int(y[b]), float(u[b]))
    dst[:, 0] = ctx.xp.asarray(out)


def sample_excluding_reference(p, lab, u):
    """Python twin of :func:`neurosim.kernels.ops.sample_excluding`."""
    n = len(p)
    w = [float(p[j]) if (j != lab and p[j] > 0.0) else 0.0 for j in range(n)]
    tot = sum(w)
    if not tot > 0.0:
        k = min(int(u * (n - 1)), n - 2)
        return k if k < lab else k + 1
    last = max(j for j in range(n) if w[j] > 0.0)
    target, c = u * tot, 0.0
    for j in range(n):
        c += w[j]
        if c > target:
            return min(j, last)
    return last


@_op("GAUSS", ("dst:out", "key:key", "scale:float"),
     "dst = scale N(0, 1), counter trial*batch*n + row*n + unit (Box-Muller)")
def _gauss(ctx, dst, key, scale):
    nb, n = dst.shape
    z = normal01_reference(key, _counters(ctx.trial, ctx.batch, nb, n))
    dst[...] = ctx.xp.asarray(np.float32(scale) * z)


# ---- ops added by engine core v2 ------------------------------------------------------------------
@_op("ADD", ("dst:out", "x:in", "y:in"), "dst = x + y (y broadcast)")
def _add(ctx, dst, x, y):
    dst[...] = x + y


@_op("DIV", ("dst:out", "x:in", "y:in"), "dst = x / y (y broadcast)")
def _div(ctx, dst, x, y):
    dst[...] = x / y


@_op("UNARY", ("dst:out", "src:in", "fn:code", "p:float"),
     "dst = fn(src) for fn in UNARY_CODES (sqrt, rsqrt, exp, log, abs, step, recip, square, "
     "pow p)", defaults=dict(p=0.0))
def _unary(ctx, dst, src, fn, p):
    dst[...] = unary_ref(ctx.xp, fn, src, p)


@_op("ROW_SUM", ("dst:out", "src:in", "scale:float"), "dst[b, 0] = scale sum_j src[b, j]",
     defaults=dict(scale=1.0))
def _row_sum(ctx, dst, src, scale):
    dst[:, 0] = float(scale) * ctx.xp.sum(src, axis=1)


@_op("COL_SUM", ("dst:out", "src:in", "scale:float", "per_row:float"),
     "dst[0, j] = (scale + per_row / rows(src)) sum_b src[b, j] (per_row: a mean over the "
     "minibatch's rows, nb at run time)", defaults=dict(scale=0.0, per_row=0.0))
def _col_sum(ctx, dst, src, scale, per_row):
    f = float(scale + per_row / src.shape[0])
    dst[0, :] = f * ctx.xp.sum(src, axis=0)


@_op("SUM", ("dst:out", "src:in", "scale:float"), "dst[0, 0] = scale sum_ij src[i, j]",
     defaults=dict(scale=1.0))
def _sum(ctx, dst, src, scale):
    dst[0, 0] = float(scale) * ctx.xp.sum(src)


@_op("FILL", ("dst:out", "src:in"), "dst[i, j] = src broadcast (a (1,1), (1,c) or (r,1) "
     "buffer filling dst)")
def _fill(ctx, dst, src):
    dst[...] = src


@_op("LOAD_SCALAR", ("dst:out", "slot:slot"), "dst[...] = float32(scalars[slot])")
def _load_scalar(ctx, dst, slot):
    dst[...] = float(ctx.scalars[slot])


@_op("SCALE_BY", ("dst:inout", "s:in", "alpha:float"),
     "dst *= alpha s[0, 0] (a (1, 1) buffer: a run-time scalar, e.g. an epoch gate)")
def _scale_by(ctx, dst, s, alpha):
    dst[...] = dst * (float(alpha) * s[0, 0])


@_op("OUTPUT", ("src:in",), "out[row0 + b, :] = src[b, :]: the minibatch's rows of a "
     "population (inference programs write the output population's rates here)")
def _output(ctx, src):
    ctx.out[ctx.row0:ctx.row0 + src.shape[0], :] = src


@_op("PICK", ("dst:out", "src:in", "idx:in"),
     "dst[0, j] = src.flat[idx[0, j]] (row-major flat indices held as float32; chosen synapses "
     "of a weight matrix for a monitor)")
def _pick(ctx, dst, src, idx):
    xp = ctx.xp
    flat = xp.reshape(src, (-1,))
    dst[0, :] = xp.take(flat, astype(xp, idx[0, :], xp.int64))


def encode(name: str, **operands) -> tuple[list, list]:
    """One instruction of op ``name`` with its operands by name (defaults from the table; an
    absent optional buffer is -1): ``(prog row of 8 ints, fprm row of 6 floats)``. Raises
    ``KeyError`` for an unknown op and ``ValueError`` for missing or unknown operands."""
    spec = OPS[name]
    ints, floats = [spec.code] + [0] * 7, [0.0] * 6
    given = dict(spec.defaults)
    given.update(operands)
    for o in spec.operands:
        if o.name not in given:
            if o.role != "opt":
                raise ValueError(f"op {name}: operand {o.name!r} missing")
            given[o.name] = -1
        v = given.pop(o.name)
        if o.is_float:
            floats[o.col] = float(v)
        else:
            ints[o.col] = int(v)
    if given:
        raise ValueError(f"op {name}: unknown operands {sorted(given)}; it takes "
                         f"{[o.name for o in spec.operands]}")
    return ints, floats


def numba_columns() -> dict:
    """``{(op, operand): column}`` for every op: what the compiled interpreter reads."""
    return {(s.name, o.name): o.col for s in BY_CODE for o in s.operands}


# ---- shape contracts -----------------------------------------------------------------------------
# Checked by PlanBuilder.op on every emitted instruction. A shape is (rows, cols, batch): batch-
# shaped buffers have the minibatch's rows at run time, so they match only each other.
_SAME = {"COPY": ("dst", "src"), "APPLY": ("dst", "src"), "UNARY": ("dst", "src"),
         "ROW_NORMALIZE": ("dst", "src"), "DERIV": ("dst", "drive"), "AXPY": ("dst", "src"),
         "TRANSFER": ("r", "drive", "mask"), "EULER": ("r", "drive", "mask", "tmp"),
         "SGD": ("W", "V", "dW"), "SUB": ("dst", "x"), "MUL": ("dst", "x"), "ADD": ("dst", "x"),
         "DIV": ("dst", "x")}
_BROADCAST = {"SUB": ("dst", "y"), "MUL": ("dst", "y"), "ADD": ("dst", "y"), "DIV": ("dst", "y"),
              "FILL": ("dst", "src")}


def check_shapes(name: str, shp: dict, ints: dict) -> str | None:
    """The op's shape contract for buffer shapes ``shp`` ({operand: (rows, cols, batch)}) and
    integer operands ``ints``; returns what is wrong, or None."""
    def rows(o):
        return "B" if shp[o][2] else shp[o][0]

    def show(o):
        return f"{o} ({rows(o)}, {shp[o][1]})"

    def same(*ops):
        ops = [o for o in ops if o in shp]
        if len({shp[o] for o in ops}) > 1:
            return "shapes differ: " + ", ".join(show(o) for o in ops)
        return None

    if name in _SAME:
        bad = same(*_SAME[name])
        if bad:
            return bad
    if name in _BROADCAST:
        d, y = _BROADCAST[name]
        if not (shp[y][:3] == shp[d][:3] or (not shp[y][2] and shp[y][0] == 1 and
                                             shp[y][1] in (1, shp[d][1]))
                or (shp[y][1] == 1 and (shp[y][2] == shp[d][2]) and
                    (shp[y][2] or shp[y][0] == shp[d][0]))):
            return f"{show(y)} does not broadcast to {show(d)} (a row, a column or a scalar)"
    if name == "GEMM":
        def op_(o, t):
            r, c = rows(o), shp[o][1]
            return (c, r) if t else (r, c)
        (m, k), (k2, n) = op_("a", ints["trans_a"]), op_("b", ints["trans_b"])
        if k != k2 or (m, n) != (rows("c"), shp["c"][1]):
            return (f"op(a) is ({m}, {k}), op(b) ({k2}, {n}), c ({rows('c')}, {shp['c'][1]}): "
                    "expected (m, k) @ (k, n) -> (m, n)")
    if name in ("ROW_SUMSQ", "ROW_SUM", "ROW_SCALE"):
        d, src = ("s", "dst") if name == "ROW_SCALE" else ("dst", "src")
        if shp[d][1] != 1 or rows(d) != rows(src):
            return f"{show(d)} must be a column with the rows of {show(src)}"
    if name in ("COL_MEAN", "COL_SUM") and (rows("dst") != 1 or shp["dst"][1] != shp["src"][1]):
        return f"{show('dst')} must be a row with the columns of {show('src')}"
    if name == "BIAS" and (rows("bias") != 1 or shp["bias"][1] != shp["dst"][1]):
        return f"{show('bias')} must be a row with the columns of {show('dst')}"
    if name == "PICK" and (rows("dst"), rows("idx")) != (1, 1) or \
            name == "PICK" and shp["dst"][1] != shp["idx"][1]:
        return f"{show('dst')} and {show('idx')} must be rows of the same length"
    if name in ("SUM", "SCALE_BY"):
        o = "dst" if name == "SUM" else "s"
        if (rows(o), shp[o][1]) != (1, 1):
            return f"{show(o)} must be (1, 1)"
    return None
