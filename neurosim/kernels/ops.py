"""Compiled operations and the plan interpreter.

A compiled plan is data: one float32 arena ``mem`` holding every state, weight and scratch
array; a buffer table ``bufs`` (offset, rows, cols, batch-shaped flag); and a program ``prog``
of integer instructions with float parameters ``fprm``. ``run_trials`` executes blocks of that
program for a run of minibatches (trials) without returning to Python. Each operation is also a
plain ``@njit`` function tested one by one against a numpy twin (tests/test_kernels.py,
``blas.gemm_reference``, ``rng.uniform01_reference``).

Conventions: a batch-shaped buffer has ``rows = nb`` (the current minibatch size) at run time;
population state is (batch, units); a weight matrix is (post, pre).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blas import gemm_par, gemm_rm
from .rng import normal01, uniform01

# ---- opcodes, operand columns, status and transfer codes: from the op table ----------------------
from ..optable import (BY_CODE, ERF, IDENTITY, NONFINITE_RATE, NONFINITE_WEIGHT, OK,  # noqa: E402
                       RELU, RMS_EPS, RMS_NORM, SIGMOID, SOFTMAX, TANH, U_ABS, U_EXP, U_LOG,
                       U_POW, U_RECIP, U_RSQRT, U_SQRT, U_SQUARE, U_STEP, WEIGHT_RUNAWAY, col)

(NOP, ZERO, GEMM, TRANSFER, EULER, AXPY, COPY, SUB, BIAS, GATHER, ONEHOT, MASK, DERIV, MUL, SGD,
 RECORD, RECORD_STAT, GUARD, SCALE, EMBED_LABEL, WRONG_LABEL, COUNT_CORRECT, APPLY, ROW_SUMSQ,
 ROW_SCALE, ROW_NORMALIZE, AFFINE, COL_MEAN, SAMPLE_WRONG, GAUSS, ADD, DIV, UNARY, ROW_SUM,
 COL_SUM, SUM, FILL, LOAD_SCALAR, SCALE_BY, OUTPUT, PICK) = (s.code for s in BY_CODE)
assert [s.name for s in BY_CODE][-1] == "PICK" and len(BY_CODE) == 41, "op table changed"

# the interpreter passes views of columns 1-3 as GEMM's (c, a, b) and SGD's (W, V, dW)
assert [col("GEMM", n) for n in "cab"] == [1, 2, 3] and [col("SGD", n) for n in
                                                          ("W", "V", "dW")] == [1, 2, 3]
# bit c of _BUFCOLS[op] is set when operand column c of the op holds a buffer (roles in, out,
# inout, opt): the interpreter views those columns before it dispatches
_BUFCOLS = np.array([sum(1 << o.col for o in s.operands if o.role in ("in", "out", "inout", "opt")
                         and not o.is_float) for s in BY_CODE], dtype=np.int64)

# operand columns the interpreter reads (numba freezes these module globals at compile time)
_GEMM_TA, _GEMM_TB, _GEMM_FUSED, _GEMM_SLOT = (col("GEMM", n) for n in
                                               ("trans_a", "trans_b", "fused", "lr_slot"))
_GEMM_ALPHA, _GEMM_BETA, _GEMM_SCALE = (col("GEMM", n) for n in ("alpha", "beta", "lr_scale"))
_SGD_STYLE, _SGD_SLOT = (col("SGD", n) for n in ("style", "lr_slot"))
_SGD_SCALE, _SGD_M, _SGD_WD, _SGD_LIM = (col("SGD", n) for n in
                                         ("lr_scale", "momentum", "wd", "limit"))

_SQRT_HALF = np.float32(1.0 / math.sqrt(2.0))
_SQRT_2_PI = np.float32(math.sqrt(2.0 / math.pi))


@njit(cache=True, inline="always")
def _f(code, x):
    if code == RELU:
        return np.float32(0.0) if x <= 0.0 else x  # NaN stays NaN
    if code == TANH:
        return np.float32(math.tanh(x))
    if code == SIGMOID:
        return np.float32(1.0 / (1.0 + math.exp(-x)))
    if code == ERF:
        return np.float32(math.erf(x * _SQRT_HALF))
    return x


@njit(cache=True, inline="always")
def _df(code, x):
    if code == RELU:
        return np.float32(1.0) if x > 0.0 else np.float32(0.0)
    if code == TANH:
        t = math.tanh(x)
        return np.float32(1.0 - t * t)
    if code == SIGMOID:
        s = 1.0 / (1.0 + math.exp(-x))
        return np.float32(s * (1.0 - s))
    if code == ERF:
        return np.float32(_SQRT_2_PI * math.exp(-0.5 * x * x))
    return np.float32(1.0)


@njit(cache=True)
def softmax_rows(out, x):
    """``out[b] = softmax(x[b])`` row-wise (max-shifted), float32."""
    for b in range(x.shape[0]):
        m = x[b, 0]
        for j in range(1, x.shape[1]):
            if x[b, j] > m:
                m = x[b, j]
        s = np.float32(0.0)
        for j in range(x.shape[1]):
            e = np.float32(math.exp(x[b, j] - m))
            out[b, j] = e
            s += e
        inv = np.float32(1.0) / s
        for j in range(x.shape[1]):
            out[b, j] *= inv


_EXP_MASK = np.uint32(0x7F800000)


@njit(cache=True)
def all_finite(a):
    """True if every element is finite: a float32 is NaN or inf exactly when its exponent bits
    are all ones, so the check is an integer max-reduction (it vectorises, and no floating-point
    flag can fold it away)."""
    u = a.reshape(-1).view(np.uint32)
    m = np.uint32(0)
    for i in range(u.shape[0]):
        e = u[i] & _EXP_MASK
        if e > m:
            m = e
    return m != _EXP_MASK


@njit(cache=True, inline="always")
def _row_f_sumsq(out, x, b, base):
    """``out[b] = f(x[b])`` with the element-wise transfer ``base``; returns sum f^2 (float32,
    in order). Specialised loops for ReLU and identity."""
    acc = np.float32(0.0)
    if base == RELU:
        for j in range(x.shape[1]):
            v = x[b, j]
            v = np.float32(0.0) if v <= 0.0 else v  # NaN stays NaN
            out[b, j] = v
            acc += v * v
    elif base == IDENTITY:
        for j in range(x.shape[1]):
            v = x[b, j]
            out[b, j] = v
            acc += v * v
    else:
        for j in range(x.shape[1]):
            v = _f(base, x[b, j])
            out[b, j] = v
            acc += v * v
    return acc


@njit(cache=True)
def rms_normalized_f(out, x, base, eps=RMS_EPS):
    """``out[b] = f(x[b]) / (eps + sqrt(mean_j f(x[b, j])^2))`` with the element-wise
    transfer ``base``; ``out`` may be ``x``."""
    n = x.shape[1]
    eps = np.float32(eps)
    for b in range(x.shape[0]):
        acc = _row_f_sumsq(out, x, b, base)
        inv = np.float32(1.0) / (eps + np.float32(math.sqrt(acc / n)))
        for j in range(n):
            out[b, j] *= inv


@njit(cache=True, inline="always")
def sample_excluding(p, lab, u):
    """A class index != lab drawn in proportion to max(p, 0) (u uniform in [0, 1)); uniform
    over the other classes when they carry no mass."""
    n = p.shape[0]
    tot = 0.0
    last = -1
    for j in range(n):
        if j != lab and p[j] > 0.0:
            tot += float(p[j])
            last = j
    if not tot > 0.0:
        k = int(u * (n - 1))
        if k > n - 2:
            k = n - 2
        return k if k < lab else k + 1
    target = float(u) * tot
    c = 0.0
    for j in range(n):
        if j != lab and p[j] > 0.0:
            c += float(p[j])
        if c > target:
            return min(j, last)
    return last


@njit(cache=True)
def apply_f(out, x, code):
    """``out = f(x)`` element-wise (softmax row-wise), one specialised loop per code."""
    if code == SOFTMAX:
        softmax_rows(out, x)
    elif code >= RMS_NORM:
        rms_normalized_f(out, x, code - RMS_NORM, RMS_EPS)
    else:
        _apply_pointwise(out, x, code)


@njit(cache=True)
def _apply_pointwise(out, x, code):
    """:func:`apply_f` for the element-wise codes (not softmax, not RMS-normalised)."""
    if code == RELU:
        for b in range(x.shape[0]):
            for j in range(x.shape[1]):
                v = x[b, j]
                out[b, j] = np.float32(0.0) if v <= 0.0 else v  # NaN stays NaN
    elif code == IDENTITY:
        for b in range(x.shape[0]):
            for j in range(x.shape[1]):
                out[b, j] = x[b, j]
    else:
        for b in range(x.shape[0]):
            for j in range(x.shape[1]):
                out[b, j] = _f(code, x[b, j])


@njit(cache=True)
def transfer(r, drive, code, mask, use_mask):
    """``r = f(drive) [* mask]``; returns False if a result is not finite."""
    apply_f(r, drive, code)
    if use_mask:
        for b in range(r.shape[0]):
            for j in range(r.shape[1]):
                r[b, j] *= mask[b, j]
    return all_finite(r)


@njit(cache=True)
def euler(r, drive, code, mask, use_mask, alpha, tmp):
    """``r += alpha * (f(drive) [* mask] - r)``: an Euler (alpha = dt/tau) or exponential-Euler
    (alpha = 1 - exp(-dt/tau)) step of ``tau dr/dt = -r + f(drive)``. ``tmp`` is (rows, cols)
    scratch used for softmax. Returns False if a rate is not finite."""
    a = np.float32(alpha)
    if code == SOFTMAX:
        softmax_rows(tmp, drive)
        for b in range(r.shape[0]):
            for j in range(r.shape[1]):
                target = tmp[b, j] * mask[b, j] if use_mask else tmp[b, j]
                r[b, j] += a * (target - r[b, j])
    elif code == RELU:
        for b in range(r.shape[0]):
            if use_mask:
                for j in range(r.shape[1]):
                    v = drive[b, j]
                    target = (np.float32(0.0) if v <= 0.0 else v) * mask[b, j]
                    r[b, j] += a * (target - r[b, j])
            else:
                for j in range(r.shape[1]):
                    v = drive[b, j]
                    target = np.float32(0.0) if v <= 0.0 else v
                    r[b, j] += a * (target - r[b, j])
    elif code >= RMS_NORM:
        base = code - RMS_NORM
        n = r.shape[1]
        eps = np.float32(RMS_EPS)
        for b in range(r.shape[0]):
            acc = np.float32(0.0)
            if base == RELU:
                for j in range(n):
                    v = drive[b, j]
                    if not v <= 0.0:  # NaN included: it must reach the rate
                        acc += v * v
            else:
                for j in range(n):
                    v = _f(base, drive[b, j])
                    acc += v * v
            inv = np.float32(1.0) / (eps + np.float32(math.sqrt(acc / n)))
            for j in range(n):
                if base == RELU:
                    v = drive[b, j]
                    target = np.float32(0.0) if v <= 0.0 else v * inv
                else:
                    target = _f(base, drive[b, j]) * inv
                if use_mask:
                    target *= mask[b, j]
                r[b, j] += a * (target - r[b, j])
    else:
        for b in range(r.shape[0]):
            for j in range(r.shape[1]):
                target = _f(code, drive[b, j])
                if use_mask:
                    target *= mask[b, j]
                r[b, j] += a * (target - r[b, j])
    return all_finite(r)


@njit(cache=True)
def deriv_mul(dst, drive, code):
    """``dst *= f'(drive)`` element-wise (not defined for softmax)."""
    for b in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[b, j] *= _df(code, drive[b, j])


@njit(cache=True)
def dropout_mask(mask, keep, key, trial, batch, row0=0):
    """Inverted-dropout mask: ``mask = Bernoulli(keep) / keep``, a pure function of
    (key, trial, row, unit): counter ``trial * batch * n + row * n + unit`` with ``batch`` the
    plan's (maximum) minibatch size, so both passes of a trial, any chunking and a short last
    minibatch all see their own, reproducible mask. ``mask`` may be rows ``row0..`` of the
    minibatch's mask (the parallel path fills row blocks)."""
    nb, n = mask.shape
    inv = np.float32(1.0 / keep)
    base = np.uint64(trial) * np.uint64(batch * n) + np.uint64(row0 * n)
    for b in range(nb):
        for j in range(n):
            u = uniform01(key, base + np.uint64(b * n + j))
            mask[b, j] = inv if u < keep else np.float32(0.0)


@njit(cache=True)
def gaussian_fill(out, scale, key, trial, batch):
    """``out = scale * N(0, 1)``, a pure function of (key, trial, row, unit) like
    :func:`dropout_mask` (counter ``trial * batch * n + row * n + unit``)."""
    nb, n = out.shape
    s = np.float32(scale)
    base = np.uint64(trial) * np.uint64(batch * n)
    for b in range(nb):
        for j in range(n):
            out[b, j] = s * normal01(key, base + np.uint64(b * n + j))


@njit(cache=True)
def sgd_step(W, V, dW, lr, momentum, wd, style, nb, limit):
    """One SGD-with-momentum step on a summed-over-batch update ``dW`` (descent direction).

    style 0 (reference PEPITA code): ``V = m V + lr (dW/nb + wd W); W -= V``.
    style 1 (torch SGD):             ``V = m V + (dW/nb + wd W);    W -= lr V``.
    styles 2 and 3: the momentum update was fused into the GEMM that produced the update (V
    already holds the new velocity); only ``W -= V`` (2) or ``W -= lr V`` (3) remains.
    Returns a status: OK, NONFINITE_WEIGHT or WEIGHT_RUNAWAY (``|W| > limit``)."""
    inv = np.float32(1.0 / nb)
    m = np.float32(momentum)
    lr32 = np.float32(lr)
    wd32 = np.float32(wd)
    lim = np.float32(limit)
    status = OK
    if style >= 2:
        s = lr32 if style == 3 else np.float32(1.0)
        bad = False
        big = False
        for i in range(W.shape[0]):
            for j in range(W.shape[1]):
                w = W[i, j] - s * V[i, j]
                W[i, j] = w
                bad |= not np.isfinite(w)
                big |= abs(w) > lim
        if bad:
            return NONFINITE_WEIGHT
        return WEIGHT_RUNAWAY if big else OK
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            g = dW[i, j] * inv + wd32 * W[i, j]
            if style == 0:
                v = m * V[i, j] + lr32 * g
                V[i, j] = v
                w = W[i, j] - v
            else:
                v = m * V[i, j] + g
                V[i, j] = v
                w = W[i, j] - lr32 * v
            W[i, j] = w
            if not np.isfinite(w):
                status = NONFINITE_WEIGHT
            elif abs(w) > lim and status == OK:
                status = WEIGHT_RUNAWAY
    return status


# ---- multithreaded element-wise operations ----------------------------------------------------
# With ``Simulator(threads=n > 1)`` the large element-wise operations run on n row blocks in
# parallel (numba prange). Each block calls the serial function above on a row slice, so the
# arithmetic, and hence every result, is the same as with one thread: element-wise work has no
# reductions across rows to reorder. Below PAR_MIN elements the fork/join costs more than it saves.
PAR_MIN = 16384


@njit(cache=True, inline="always")
def _rows(rows, c, n):
    return c * rows // n, (c + 1) * rows // n


@njit(cache=True, parallel=True)
def sgd_step_par(W, V, dW, lr, momentum, wd, style, nb, limit, nthreads):
    """:func:`sgd_step` on ``nthreads`` row blocks in parallel; the same status (a non-finite
    weight outranks a runaway one)."""
    st = np.zeros(nthreads, np.int64)
    fused = style >= 2
    for c in prange(nthreads):
        i0, i1 = _rows(W.shape[0], c, nthreads)
        if fused:   # dW is not read (and may be a placeholder)
            st[c] = sgd_step(W[i0:i1], V[i0:i1], dW, lr, momentum, wd, style, nb, limit)
        else:
            st[c] = sgd_step(W[i0:i1], V[i0:i1], dW[i0:i1], lr, momentum, wd, style, nb, limit)
    out = OK
    for c in range(nthreads):
        if st[c] == NONFINITE_WEIGHT:
            return NONFINITE_WEIGHT
        if st[c] == WEIGHT_RUNAWAY:
            out = WEIGHT_RUNAWAY
    return out


@njit(cache=True, parallel=True)
def transfer_par(r, drive, code, mask, use_mask, nthreads):
    """:func:`transfer` on ``nthreads`` row blocks (every code is row-wise)."""
    ok = np.zeros(nthreads, np.bool_)
    for c in prange(nthreads):
        i0, i1 = _rows(r.shape[0], c, nthreads)
        ok[c] = transfer(r[i0:i1], drive[i0:i1], code, mask[i0:i1] if use_mask else mask,
                         use_mask)
    return ok.all()


@njit(cache=True, parallel=True)
def euler_par(r, drive, code, mask, use_mask, alpha, tmp, nthreads):
    """:func:`euler` on ``nthreads`` row blocks."""
    ok = np.zeros(nthreads, np.bool_)
    for c in prange(nthreads):
        i0, i1 = _rows(r.shape[0], c, nthreads)
        ok[c] = euler(r[i0:i1], drive[i0:i1], code, mask[i0:i1] if use_mask else mask,
                      use_mask, alpha, tmp[i0:i1] if code == SOFTMAX else tmp)
    return ok.all()


@njit(cache=True, parallel=True)
def dropout_mask_par(mask, keep, key, trial, batch, nthreads):
    """:func:`dropout_mask` on ``nthreads`` row blocks (same counters, same mask)."""
    for c in prange(nthreads):
        i0, i1 = _rows(mask.shape[0], c, nthreads)
        dropout_mask(mask[i0:i1], keep, key, trial, batch, i0)


@njit(cache=True, parallel=True)
def deriv_mul_par(dst, drive, code, nthreads):
    """:func:`deriv_mul` on ``nthreads`` row blocks."""
    for c in prange(nthreads):
        i0, i1 = _rows(dst.shape[0], c, nthreads)
        deriv_mul(dst[i0:i1], drive[i0:i1], code)


@njit(cache=True, inline="always")
def _par(a, nthreads):
    """Whether an operation on ``a`` is worth splitting over ``nthreads`` threads."""
    return nthreads > 1 and a.shape[0] >= nthreads and a.size >= PAR_MIN


@intrinsic
def _borrowed_view(typingctx, mem, off, rows, cols):
    """``mem[off:off + rows*cols]`` as a C-contiguous (rows, cols) float32 array that *borrows*
    ``mem``'s memory: no reference count (its meminfo is null), so creating, copying and
    dropping it costs no atomic operation. Valid while ``mem`` is: the interpreter's views never
    outlive a ``run_trials`` call. No bounds check (the compiler laid the arena out)."""
    view = types.Array(types.float32, 2, "C")

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        out = context.make_array(view)(context, builder)
        intp = context.get_value_type(types.intp)
        off_, r, c = (context.cast(builder, a, t, types.intp)
                      for a, t in zip(args[1:], sig.args[1:]))
        size = context.get_constant(types.intp, 4)
        context.populate_array(out, data=builder.gep(src.data, [off_]),
                               shape=cgutils.pack_array(builder, [r, c], ty=intp),
                               strides=cgutils.pack_array(builder, [builder.mul(c, size), size],
                                                          ty=intp),
                               itemsize=size, meminfo=None)
        return out._getvalue()

    return view(mem, off, rows, cols), codegen


@njit(cache=True)
def _view(mem, bufs, i, nb):
    """Buffer ``i`` of the arena as a (rows, cols) view (rows = nb if batch-shaped), borrowed
    (:func:`_borrowed_view`): the interpreter holds up to five views per instruction, and
    reference-counted ones cost two atomic operations each per instruction (about 2 us per step
    of a small time-mode circuit). C-contiguous, so the element-wise loops vectorise."""
    off = bufs[i, 0]
    rows = nb if bufs[i, 3] == 1 else bufs[i, 1]
    return _borrowed_view(mem, off, rows, bufs[i, 2])


@njit(cache=True)
def _record(dst, stamps, meta, cnt, m, src, trial, step):
    k = cnt[m]
    if k >= meta[m, 2]:
        return
    size = meta[m, 1]
    u0 = meta[m, 4]
    srow = meta[m, 6]
    base = meta[m, 0] + k * size
    if srow >= 0:
        for j in range(size):
            dst[base + j] = src[srow, u0 + j]
    elif srow == -2:  # the whole buffer, row-major (a weight matrix)
        cols = src.shape[1]
        for j in range(size):
            dst[base + j] = src[j // cols, j % cols]
    else:  # mean over the batch
        for j in range(size):
            s = np.float32(0.0)
            for b in range(src.shape[0]):
                s += src[b, u0 + j]
            dst[base + j] = s / src.shape[0]
    stamps[meta[m, 7] + 2 * k] = trial
    stamps[meta[m, 7] + 2 * k + 1] = step
    cnt[m] = k + 1


@njit(cache=True, inline="always")
def frob(a):
    s = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            s += np.float64(a[i, j]) * np.float64(a[i, j])
    return math.sqrt(s)


@njit(cache=True)
def angle_deg(a, b, transpose_b):
    """Angle in degrees between matrices ``a`` and ``b`` (or ``b.T``) seen as vectors."""
    dot = 0.0
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            bij = b[j, i] if transpose_b else b[i, j]
            dot += np.float64(a[i, j]) * np.float64(bij)
    na = frob(a)
    nb_ = frob(b)
    if na == 0.0 or nb_ == 0.0:
        return np.nan
    c = dot / (na * nb_)
    c = min(1.0, max(-1.0, c))
    return math.degrees(math.acos(c))


@njit(cache=True, inline="always")
def _fail(info, i, rep, trial, bl, status):
    info[0] = i
    info[1] = rep
    info[2] = trial
    info[3] = bl
    return status


@njit(cache=True, error_model="numpy", inline="always")
def _unary(dst, src, fn, p):
    pf = np.float32(p)
    for b in range(dst.shape[0]):
        for c in range(dst.shape[1]):
            x = src[b, c]
            if fn == U_SQRT:
                v = np.float32(math.sqrt(x)) if x >= 0.0 else np.float32(np.nan)
            elif fn == U_RSQRT:
                v = np.float32(1.0) / np.float32(math.sqrt(x)) if x >= 0.0 else np.float32(np.nan)
            elif fn == U_EXP:
                v = np.float32(math.exp(x))
            elif fn == U_LOG:
                v = np.float32(math.log(x)) if x > 0.0 else (
                    np.float32(-np.inf) if x == 0.0 else np.float32(np.nan))
            elif fn == U_ABS:
                v = abs(x)
            elif fn == U_STEP:
                v = np.float32(1.0) if x >= 0.0 else np.float32(0.0)
            elif fn == U_RECIP:
                v = np.float32(1.0) / x
            elif fn == U_SQUARE:
                v = x * x
            else:  # U_POW
                v = np.float32(x ** pf)
            dst[b, c] = v


# ---- the interpreter's element-wise and bookkeeping ops, called (not inlined) from run_trials
# so that the interpreter itself stays small. Every compiled function costs a fixed ~0.1-0.3 s of
# numba/LLVM work on an empty cache, so the simple ops share one function, dispatched on the
# opcode (docs/benchmarks.md, first run).
@njit(cache=True, error_model="numpy")
def _ew(op, k, dst, x, y, s, c0):
    """The simple ops on ``dst`` with operands ``x``, ``y`` (buffers), ``k`` (an int) and ``s``,
    ``c0`` (float64 carriers of the op's float parameters; float32 ops convert them first, so
    results are those of the op table's float32 semantics). Element-wise binary ops broadcast
    ``y`` from (1, cols), (rows, 1) or (1, 1); equal shapes take loops of their own so that they
    vectorise."""
    R = dst.shape[0]
    C = dst.shape[1]
    if op == SUB or op == MUL or op == ADD or op == DIV:
        if y.shape[0] == R and y.shape[1] == C:
            for b in range(R):
                if op == SUB:
                    for c in range(C):
                        dst[b, c] = x[b, c] - y[b, c]
                elif op == MUL:
                    for c in range(C):
                        dst[b, c] = x[b, c] * y[b, c]
                elif op == ADD:
                    for c in range(C):
                        dst[b, c] = x[b, c] + y[b, c]
                else:
                    for c in range(C):
                        dst[b, c] = x[b, c] / y[b, c]
            return
        rs = 0 if y.shape[0] == 1 else 1
        cs = 0 if y.shape[1] == 1 else 1
        for b in range(R):
            for c in range(C):
                v = y[b * rs, c * cs]
                if op == SUB:
                    dst[b, c] = x[b, c] - v
                elif op == MUL:
                    dst[b, c] = x[b, c] * v
                elif op == ADD:
                    dst[b, c] = x[b, c] + v
                else:
                    dst[b, c] = x[b, c] / v
    elif op == UNARY:
        _unary(dst, x, k, s)
    elif op == ZERO or op == LOAD_SCALAR:
        v = np.float32(s)
        for b in range(R):
            for c in range(C):
                dst[b, c] = v
    elif op == AXPY:
        sc = np.float32(s)
        for b in range(R):
            for c in range(C):
                dst[b, c] += sc * x[b, c]
    elif op == COPY:
        for b in range(R):
            for c in range(C):
                dst[b, c] = x[b, c]
    elif op == SCALE or op == SCALE_BY:
        sc = np.float32(s)
        for b in range(R):
            for c in range(C):
                dst[b, c] *= sc
    elif op == AFFINE:
        sc = np.float32(s)
        c1 = np.float32(c0)
        for b in range(R):
            for c in range(C):
                dst[b, c] = sc * dst[b, c] + c1
    elif op == BIAS:
        for b in range(R):
            for c in range(C):
                dst[b, c] += x[0, c]
    elif op == ROW_SCALE:
        for b in range(R):
            f = x[b, 0]
            for c in range(C):
                dst[b, c] *= f
    elif op == ROW_SUM or op == ROW_SUMSQ:
        sc = np.float32(s)
        for b in range(x.shape[0]):
            acc = np.float32(0.0)
            if op == ROW_SUMSQ:
                for c in range(x.shape[1]):
                    acc += x[b, c] * x[b, c]
            else:
                for c in range(x.shape[1]):
                    acc += x[b, c]
            dst[b, 0] = sc * acc
    elif op == COL_MEAN or op == COL_SUM:
        # COL_MEAN: dst = beta dst + (alpha / rows) sum_b x (alpha / rows in float64);
        # COL_SUM: dst = float32(scale + per_row / rows) sum_b x, whatever dst held
        n = x.shape[0]
        if op == COL_MEAN:
            al = np.float32(s) / n
            be = np.float32(c0)
        else:
            al = np.float64(np.float32(s + c0 / n))
            be = np.float32(0.0)
        for c in range(x.shape[1]):
            acc = np.float32(0.0)
            for b in range(n):
                acc += x[b, c]
            dst[0, c] = be * dst[0, c] + al * acc if op == COL_MEAN else al * acc
    elif op == SUM:
        acc = np.float32(0.0)
        for b in range(x.shape[0]):
            for c in range(x.shape[1]):
                acc += x[b, c]
        dst[0, 0] = np.float32(s) * acc
    elif op == FILL:
        rs = 0 if x.shape[0] == 1 else 1
        cs = 0 if x.shape[1] == 1 else 1
        for b in range(R):
            for c in range(C):
                dst[b, c] = x[b * rs, c * cs]
    elif op == PICK:
        cols = x.shape[1]
        for j in range(C):
            f = int(y[0, j])
            dst[0, j] = x[f // cols, f % cols]


@njit(cache=True)
def _gather(dst, src, order, s0):
    for b in range(dst.shape[0]):
        r = order[s0 + b]
        for c in range(dst.shape[1]):
            dst[b, c] = src[r, c]


@njit(cache=True)
def _onehot(dst, Y, order, s0, on, off):
    for b in range(dst.shape[0]):
        lab = Y[order[s0 + b]]
        for c in range(dst.shape[1]):
            dst[b, c] = on if c == lab else off


@njit(cache=True)
def _embed_label(dst, source, lb, ncls, Y, order, s0, on, off):
    """dst[:, :ncls] = one-hot of the true label (source 0) or of column 0 of ``lb``."""
    for b in range(dst.shape[0]):
        lab = Y[order[s0 + b]] if source == 0 else int(lb[b, 0])
        for c in range(ncls):
            dst[b, c] = on if c == lab else off


@njit(cache=True)
def _wrong_label(dst, key, ncls, Y, order, s0, trial, batch):
    """dst[b, 0] = a label != Y[b], uniform over the ncls - 1 others."""
    for b in range(dst.shape[0]):
        u = uniform01(key, np.uint64(trial) * np.uint64(batch) + np.uint64(b))
        k = int(u * (ncls - 1))
        if k >= ncls - 1:
            k = ncls - 2
        lab = Y[order[s0 + b]]
        dst[b, 0] = np.float32(k if k < lab else k + 1)


@njit(cache=True)
def _sample_wrong(dst, pr, key, Y, order, s0, trial, batch):
    for b in range(dst.shape[0]):
        u = uniform01(key, np.uint64(trial) * np.uint64(batch) + np.uint64(b))
        dst[b, 0] = np.float32(sample_excluding(pr[b], Y[order[s0 + b]], u))


@njit(cache=True)
def _count_correct(o, stt, Y, order, s0):
    good = 0
    for b in range(o.shape[0]):
        best = 0
        for c in range(1, o.shape[1]):
            if o[b, c] > o[b, best]:
                best = c
        if best == Y[order[s0 + b]]:
            good += 1
    stt[0, 0] += good
    stt[0, 1] += o.shape[0]


@njit(cache=True)
def _output(out, src, s0):
    for b in range(src.shape[0]):
        for c in range(src.shape[1]):
            out[s0 + b, c] = src[b, c]


@njit(cache=True)
def run_trials(mem, bufs, prog, fprm, blocks, X, Y, T, order, start, n_trials, batch, trial0,
               step0, keys, scal, rec, stamps, rec_meta, rec_cnt, info, out, ws_i, ws_f,
               nthreads, par):
    """Execute the program's blocks for ``n_trials`` consecutive minibatches: the one compiled
    entry of training, inference (op OUTPUT writes the rows to ``out``) and free runs.

    ``blocks`` rows are (first instruction, end instruction, repeat, phase index, is-loop); each
    repeat of a loop block is one time step (the step counter feeds monitors). Minibatch ``j``
    takes rows ``order[start + j*batch : ...]`` of X (inputs), Y (int labels) and T (float
    targets); the last minibatch may be short. ``scal`` holds the scalar slots (learning rates,
    epoch gates) that Python sets between calls. ``par`` is None (one thread: the parallel
    variants are pruned at compile time and never compiled) or an int64 array (``nthreads > 1``:
    large GEMMs are split into blocks of single-threaded BLAS calls and large element-wise
    operations into row blocks on numba's pool; element-wise results are identical to one
    thread). Operand columns: :mod:`neurosim.optable`. Returns a status; on failure ``info``
    holds (instruction, repeat within the block, trial, block).
    """
    n_order = order.shape[0]
    step = step0
    none = _borrowed_view(mem, 0, 0, 0)  # stands for an operand column that holds no buffer
    for j in range(n_trials):
        s0 = start + j * batch
        nb = batch
        if n_order > 0 and s0 + nb > n_order:
            nb = n_order - s0
        trial = trial0 + j
        for bl in range(blocks.shape[0]):
            i0 = blocks[bl, 0]
            i1 = blocks[bl, 1]
            reps = blocks[bl, 2]
            loop = blocks[bl, 4] == 1
            for rep in range(reps):
                if loop:
                    step += 1
                i = i0
                while i < i1:
                    op = prog[i, 0]
                    if op == GUARD:
                        if trial % prog[i, 1] != 0:
                            i += prog[i, 2]
                        i += 1
                        continue
                    # the buffer operands (op table roles in/out/inout/opt), viewed once here:
                    # one call site per column keeps the interpreter small to compile
                    bm = _BUFCOLS[op]
                    c1 = prog[i, 1]
                    c2 = prog[i, 2]
                    c3 = prog[i, 3]
                    c4 = prog[i, 4]
                    c5 = prog[i, 5]
                    V1 = _view(mem, bufs, c1, nb) if bm & 2 and c1 >= 0 else none
                    V2 = _view(mem, bufs, c2, nb) if bm & 4 and c2 >= 0 else none
                    V3 = _view(mem, bufs, c3, nb) if bm & 8 and c3 >= 0 else none
                    V4 = _view(mem, bufs, c4, nb) if bm & 16 and c4 >= 0 else none
                    V5 = _view(mem, bufs, c5, nb) if bm & 32 and c5 >= 0 else none
                    f0 = fprm[i, 0]
                    if op == GEMM:
                        alpha = fprm[i, _GEMM_ALPHA]
                        if prog[i, _GEMM_FUSED] == 1:  # fused optimizer step: alpha * lr / nb
                            sl = prog[i, _GEMM_SLOT]
                            lr = scal[sl] * fprm[i, _GEMM_SCALE] if sl >= 0 else 1.0
                            alpha = alpha * lr / nb
                        ta = prog[i, _GEMM_TA] == 1
                        tb = prog[i, _GEMM_TB] == 1
                        if par is None:
                            gemm_rm(ta, tb, alpha, V2, V3, fprm[i, _GEMM_BETA], V1, ws_i, ws_f)
                        else:
                            gemm_par(ta, tb, alpha, V2, V3, fprm[i, _GEMM_BETA], V1, ws_i, ws_f,
                                     nthreads)
                    elif op == TRANSFER or op == EULER:
                        use_mask = c4 >= 0
                        mk = V4 if use_mask else V2
                        if op == TRANSFER:
                            if par is not None and _par(V1, nthreads):
                                ok = transfer_par(V1, V2, c3, mk, use_mask, nthreads)
                            else:
                                # transfer() spelt out: each compiled function is re-optimised
                                # inside every caller, so the interpreter calls the leaves
                                if c3 == SOFTMAX:
                                    softmax_rows(V1, V2)
                                elif c3 >= RMS_NORM:
                                    rms_normalized_f(V1, V2, c3 - RMS_NORM, RMS_EPS)
                                else:
                                    _apply_pointwise(V1, V2, c3)
                                if use_mask:
                                    _ew(np.int64(MUL), c3, V1, V1, mk, 0.0, 0.0)
                                ok = all_finite(V1)
                        else:
                            tmp = V5 if c5 >= 0 else V2
                            if par is not None and _par(V1, nthreads):
                                ok = euler_par(V1, V2, c3, mk, use_mask, f0, tmp, nthreads)
                            else:
                                ok = euler(V1, V2, c3, mk, use_mask, f0, tmp)
                        if not ok:
                            return _fail(info, i, rep, trial, bl, NONFINITE_RATE)
                    elif op == DERIV:
                        if par is not None and _par(V1, nthreads):
                            deriv_mul_par(V1, V2, c3, nthreads)
                        else:
                            deriv_mul(V1, V2, c3)
                    elif op == SGD:
                        sl = prog[i, _SGD_SLOT]
                        lr = scal[sl] * fprm[i, _SGD_SCALE] if sl >= 0 else fprm[i, _SGD_SCALE]
                        style = prog[i, _SGD_STYLE]
                        if par is not None and _par(V1, nthreads):
                            st = sgd_step_par(V1, V2, V3, lr, fprm[i, _SGD_M], fprm[i, _SGD_WD],
                                              style, nb, fprm[i, _SGD_LIM], nthreads)
                        else:
                            st = sgd_step(V1, V2, V3, lr, fprm[i, _SGD_M], fprm[i, _SGD_WD],
                                          style, nb, fprm[i, _SGD_LIM])
                        if st != OK:
                            return _fail(info, i, rep, trial, bl, st)
                    elif op == MASK:
                        if par is not None and _par(V1, nthreads):
                            dropout_mask_par(V1, f0, keys[c2], trial, batch, nthreads)
                        else:
                            dropout_mask(V1, f0, keys[c2], trial, batch)
                    elif op == APPLY:
                        if c3 == SOFTMAX:
                            softmax_rows(V1, V2)
                        elif c3 >= RMS_NORM:
                            rms_normalized_f(V1, V2, c3 - RMS_NORM, RMS_EPS)
                        else:
                            _apply_pointwise(V1, V2, c3)
                    elif op == ROW_NORMALIZE:
                        rms_normalized_f(V1, V2, np.int64(IDENTITY), f0)
                    elif op == GATHER:
                        _gather(V1, X if c2 == 0 else T, order, s0)
                    elif op == ONEHOT:
                        _onehot(V1, Y, order, s0, np.float32(f0), np.float32(fprm[i, 1]))
                    elif op == EMBED_LABEL:
                        _embed_label(V1, c2, V3 if c3 >= 0 else V1, c4, Y, order, s0,
                                     np.float32(f0), np.float32(fprm[i, 1]))
                    elif op == WRONG_LABEL:
                        _wrong_label(V1, keys[c2], c3, Y, order, s0, trial, batch)
                    elif op == SAMPLE_WRONG:
                        _sample_wrong(V1, V2, keys[c3], Y, order, s0, trial, batch)
                    elif op == GAUSS:
                        gaussian_fill(V1, f0, keys[c2], trial, batch)
                    elif op == RECORD:
                        cntr = step if c3 == 0 else trial
                        if cntr % rec_meta[c2, 3] == 0:
                            _record(rec, stamps, rec_meta, rec_cnt, c2, V1, trial, step)
                    elif op == RECORD_STAT:
                        if trial % rec_meta[c2, 3] == 0 and rec_cnt[c2] < rec_meta[c2, 2]:
                            val = frob(V1) if c3 == 0 else angle_deg(V1, V4 if c4 >= 0 else V1,
                                                                     c5 == 1)
                            k = rec_cnt[c2]
                            rec[rec_meta[c2, 0] + k] = np.float32(val)
                            stamps[rec_meta[c2, 7] + 2 * k] = trial
                            stamps[rec_meta[c2, 7] + 2 * k + 1] = step
                            rec_cnt[c2] = k + 1
                    elif op == COUNT_CORRECT:
                        _count_correct(V1, V2, Y, order, s0)
                    elif op == OUTPUT:
                        _output(out, V1, s0)
                    elif op != NOP:
                        # the simple ops: float parameters as float64, the float32 conversions
                        # (and SCALE_BY's and LOAD_SCALAR's operands) applied as before
                        s = f0
                        if op == LOAD_SCALAR:
                            s = np.float64(np.float32(scal[c2]))
                        elif op == SCALE_BY:
                            s = np.float64(np.float32(f0) * V2[0, 0])
                        elif op == ZERO:
                            s = 0.0
                        _ew(op, c3, V1, V2, V3, s, fprm[i, 1])
                    i += 1
    return OK
