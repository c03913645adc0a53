"""Each compiled kernel against a numpy twin written here, on random inputs.

The kernels are called directly with the argument types the interpreter (``run_trials``) uses:
C-contiguous float32 2-D arrays, int64 codes, float64 scalars, Python bools for flags, uint64
keys, so the on-disk numba cache is shared with the engine.

Tolerances: kernels compute in float32 (transcendentals in float64 then rounded), twins in
float64. Element-wise maps are within ~1 ulp (rtol 1e-6); reductions over n terms within
~n eps32 (GEMM: rtol 1e-5 for k <= 40).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import erf

from neurosim.kernels import ops as K
from neurosim.kernels.blas import gemm_reference, gemm_rm
from neurosim.kernels.rng import uniform01, uniform01_reference

CODES = {"identity": K.IDENTITY, "relu": K.RELU, "tanh": K.TANH, "sigmoid": K.SIGMOID,
         "erf": K.ERF, "softmax": K.SOFTMAX}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def _ws():
    return np.zeros(8, np.int32), np.zeros(2, np.float32)


# ---- numpy twins --------------------------------------------------------------------------------
def f_twin(code, x):
    x = x.astype(np.float64)
    if code == K.RELU:
        return np.maximum(x, 0.0)
    if code == K.TANH:
        return np.tanh(x)
    if code == K.SIGMOID:
        return 1.0 / (1.0 + np.exp(-x))
    if code == K.ERF:
        return erf(x / math.sqrt(2.0))
    if code == K.SOFTMAX:
        z = np.exp(x - x.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    return x


def df_twin(code, x):
    x = x.astype(np.float64)
    if code == K.RELU:
        return (x > 0).astype(np.float64)
    if code == K.TANH:
        return 1.0 - np.tanh(x) ** 2
    if code == K.SIGMOID:
        s = 1.0 / (1.0 + np.exp(-x))
        return s * (1.0 - s)
    if code == K.ERF:
        return math.sqrt(2.0 / math.pi) * np.exp(-0.5 * x * x)
    return np.ones_like(x)


# ---- GEMM ---------------------------------------------------------------------------------------
# (m, k, n): the general sgemm path, the matrix-vector (sgemv) paths m == 1 / n == 1, the
# outer-product loop k == 1, and scalars
GEMM_SHAPES = [(7, 13, 5), (1, 13, 5), (7, 13, 1), (1, 13, 1), (7, 1, 5), (1, 1, 1)]


@pytest.mark.parametrize("m,k,n", GEMM_SHAPES, ids=["x".join(map(str, s)) for s in GEMM_SHAPES])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.7, 1.0), (2.5, 0.3)])
def test_gemm_rm(m, k, n, trans_a, trans_b, alpha, beta):
    """c = alpha op(a) op(b) + beta c for rectangular shapes (catches swapped leading
    dimensions), against gemm_reference and against plain numpy. With beta = 0 the old c is
    not read (BLAS semantics): stale NaNs do not leak."""
    rng = _rng(1)
    a = _f32(rng.standard_normal((k, m) if trans_a else (m, k)))
    b = _f32(rng.standard_normal((n, k) if trans_b else (k, n)))
    c0 = _f32(rng.standard_normal((m, n)))
    c = c0.copy() if beta != 0.0 else np.full((m, n), np.nan, np.float32)
    a_in, b_in = a.copy(), b.copy()
    gemm_rm(trans_a, trans_b, alpha, a, b, beta, c, *_ws())
    want = gemm_reference(trans_a, trans_b, alpha, a, b, beta, c0)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)
    A = a.T if trans_a else a
    B = b.T if trans_b else b
    np.testing.assert_allclose(c, alpha * (A.astype(np.float64) @ B) + beta * c0.astype(np.float64),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a, a_in)          # inputs untouched
    np.testing.assert_array_equal(b, b_in)


def test_gemm_rm_views_of_an_arena():
    """The interpreter passes reshaped slices of one arena; the neighbours must not be written."""
    rng = _rng(2)
    mem = _f32(rng.standard_normal(200))
    guard = mem.copy()
    a = mem[0:24].reshape(4, 6)
    b = mem[32:50].reshape(3, 6)
    c = mem[64:76].reshape(4, 3)
    want = gemm_reference(False, True, 1.0, a.copy(), b.copy(), 1.0, c.copy())
    gemm_rm(False, True, 1.0, a, b, 1.0, c, *_ws())
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-6)
    outside = np.ones(200, bool)
    outside[64:76] = False
    np.testing.assert_array_equal(mem[outside], guard[outside])


def test_gemm_rm_empty_inner_dimension():
    """k = 0: the product is zero, c = beta c."""
    c = _f32(np.full((3, 2), 2.0))
    gemm_rm(False, False, 1.0, np.zeros((3, 0), np.float32), np.zeros((0, 2), np.float32),
            0.5, c, *_ws())
    np.testing.assert_array_equal(c, np.full((3, 2), 1.0, np.float32))
    c[...] = np.nan
    gemm_rm(False, False, 1.0, np.zeros((3, 0), np.float32), np.zeros((0, 2), np.float32),
            0.0, c, *_ws())
    np.testing.assert_array_equal(c, np.zeros((3, 2), np.float32))


# ---- transfer / euler / deriv / softmax ---------------------------------------------------------
@pytest.mark.parametrize("name", list(CODES))
@pytest.mark.parametrize("use_mask", [False, True])
def test_transfer(name, use_mask):
    code = CODES[name]
    rng = _rng(4)
    drive = _f32(3 * rng.standard_normal((5, 37)))     # 37: not a multiple of a SIMD width
    mask = _f32((rng.random((5, 37)) < 0.7) / 0.7)
    r = np.full_like(drive, np.nan)
    ok = K.transfer(r, drive, code, mask, use_mask)
    want = f_twin(code, drive) * (mask if use_mask else 1.0)
    assert ok is True
    np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-7)


# Regression: all_finite once summed (x - x) under fastmath reassoc/nsz, which LLVM folded to 0,
# so inf/NaN went unreported. It now tests the exponent bits.


def _nonfinite_cases():
    out = []
    for name in ["identity", "relu", "tanh", "softmax"]:
        for bad in (np.inf, np.nan):
            for pos in [(0, 0), (4, 36)]:
                # non-finite after f, except tanh(+inf) = 1 (a saturated, finite rate); relu keeps
                # NaN (NaN <= 0 is False) and +inf
                expect_ok = bool(name == "tanh" and bad == np.inf)
                out.append(pytest.param(name, bad, pos, expect_ok,
                                        id=f"{name}-{bad}-{pos[0]}.{pos[1]}"))
    return out


@pytest.mark.parametrize("name,bad,pos,expect_ok", _nonfinite_cases())
def test_transfer_reports_nonfinite(name, bad, pos, expect_ok):
    """Any non-finite rate anywhere (first, middle, last element) returns False.
    (relu maps -inf to 0, a finite rate, but keeps NaN and +inf.)"""
    code = CODES[name]
    drive = _f32(_rng(5).standard_normal((5, 37)))
    drive[pos] = bad
    r = np.zeros_like(drive)
    ok = K.transfer(r, drive, code, drive, False)
    assert ok is expect_ok
    if expect_ok:
        assert r[pos] == 1.0


def test_all_finite_true_on_finite():
    a = _f32(_rng(6).standard_normal((3, 33)))
    assert K.all_finite(a) is True
    big = np.full((2, 40), np.finfo(np.float32).max, np.float32)   # finite, huge
    assert K.all_finite(big) is True


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("shape,pos", [((1, 1), (0, 0)), ((3, 33), (2, 32))])
def test_all_finite_detects_nonfinite(bad, shape, pos):
    b = _f32(_rng(6).standard_normal(shape))
    b[pos] = bad
    assert K.all_finite(b) is False


@pytest.mark.parametrize("name,use_mask", [(n, m) for n in CODES for m in (False, True)
                                           if not (n == "softmax" and m)])
@pytest.mark.parametrize("alpha", [0.05, 1.0])
def test_euler(name, use_mask, alpha):
    """r += alpha (f(drive) [* mask] - r); softmax populations never carry a dropout mask
    (Population rejects dropout on softmax), so the mask is not tested for softmax."""
    code = CODES[name]
    rng = _rng(7)
    drive = _f32(2 * rng.standard_normal((4, 19)))
    r0 = _f32(rng.standard_normal((4, 19)))
    mask = _f32((rng.random((4, 19)) < 0.5) / 0.5)
    r = r0.copy()
    tmp = np.zeros_like(r)
    ok = K.euler(r, drive, code, mask, use_mask, alpha, tmp)
    target = f_twin(code, drive) * (mask if use_mask else 1.0)
    want = r0 + alpha * (target - r0)
    assert ok is True
    np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-6)


def test_euler_reports_nonfinite():
    r = np.zeros((2, 3), np.float32)
    drive = np.array([[0.0, np.inf, 1.0], [0.0, 0.0, 0.0]], np.float32)
    assert K.euler(r, drive, K.IDENTITY, drive, False, 0.1, r.copy()) is False


@pytest.mark.parametrize("name", ["identity", "relu", "tanh", "sigmoid", "erf"])
def test_deriv_mul(name):
    code = CODES[name]
    rng = _rng(8)
    drive = _f32(2 * rng.standard_normal((6, 11)))
    drive[0, :3] = 0.0                                  # relu'(0) = 0 (strict inequality)
    d0 = _f32(rng.standard_normal((6, 11)))
    d = d0.copy()
    K.deriv_mul(d, drive, code)
    np.testing.assert_allclose(d, d0 * df_twin(code, drive), rtol=1e-6, atol=1e-7)


def test_softmax_rows():
    rng = _rng(9)
    x = _f32(5 * rng.standard_normal((6, 10)))
    x[0] += 1000.0                                      # max-shift: no overflow
    x[1] -= 1000.0                                      # no underflow to 0/0
    out = np.zeros_like(x)
    K.softmax_rows(out, x)
    np.testing.assert_allclose(out, f_twin(K.SOFTMAX, x), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(np.isfinite(out))


# ---- random numbers and dropout -----------------------------------------------------------------
@pytest.mark.parametrize("key", [0, 12345, 2**63 + 17, 2**64 - 1])
def test_uniform01_bit_exact(key):
    """The compiled draw equals its numpy twin bit for bit (uint64 wrap-around included)."""
    counters = np.concatenate([np.arange(200, dtype=np.uint64),
                               np.array([2**32, 2**40 + 3, 2**64 - 2, 2**64 - 1], np.uint64)])
    want = uniform01_reference(key, counters)
    got = np.array([uniform01(np.uint64(key), np.uint64(c)) for c in counters], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.all((want >= 0.0) & (want < 1.0))


def test_uniform01_statistics():
    u = uniform01_reference(99, np.arange(100_000, dtype=np.uint64))
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.002
    assert len(np.unique(u)) > 95_000


@pytest.mark.parametrize("trial", [0, 1, 7, 123456])
@pytest.mark.parametrize("keep", [0.9, 0.5])
def test_dropout_mask(trial, keep):
    """mask[b, j] = 1/keep iff uniform01(key, trial * nb * n + b * n + j) < keep, else 0
    (full minibatch: nb = the plan's batch)."""
    key = np.uint64(0xDEADBEEF12345678)
    nb, n = 8, 13
    mask = np.full((nb, n), np.nan, np.float32)
    K.dropout_mask(mask, keep, key, trial, nb)
    c = np.uint64(trial) * np.uint64(nb * n) + np.arange(nb * n, dtype=np.uint64)
    u = uniform01_reference(int(key), c).reshape(nb, n)
    want = np.where(u.astype(np.float64) < keep, np.float32(1.0 / keep), np.float32(0.0))
    np.testing.assert_array_equal(mask, want)


@pytest.mark.parametrize("trial", [0, 3])
def test_gaussian_fill(trial):
    """GAUSS noise equals its numpy twin (Box-Muller in float64 on the same counters) and is
    standard normal: over 64 x 1000 draws the mean is within 5 standard errors (5/sqrt(n)) of 0,
    the variance within 5 sqrt(2/n) of 1, and the 4th moment within 5 sqrt(96/n) of 3."""
    from neurosim.kernels.rng import normal01_reference

    out = np.zeros((64, 1000), np.float32)
    K.gaussian_fill(out, 0.5, np.uint64(99), trial, 64)
    b = np.arange(64, dtype=np.uint64)[:, None]
    j = np.arange(1000, dtype=np.uint64)[None, :]
    want = 0.5 * normal01_reference(99, (np.uint64(trial) * np.uint64(64) + b) * np.uint64(1000)
                                    + j)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)
    z = out.astype(np.float64).ravel() / 0.5
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs(np.mean(z ** 4) - 3) < 5 * np.sqrt(96 / n)
    assert np.isfinite(z).all()


def test_dropout_mask_rate_and_independence():
    key = np.uint64(42)
    m0 = np.zeros((64, 100), np.float32)
    m1 = np.zeros((64, 100), np.float32)
    K.dropout_mask(m0, 0.9, key, 0, 64)
    K.dropout_mask(m1, 0.9, key, 1, 64)
    assert abs((m0 > 0).mean() - 0.9) < 0.02
    assert set(np.unique(m0)) <= {0.0, np.float32(1 / 0.9)}
    assert abs(m0.mean() - 1.0) < 0.03                 # inverted scaling keeps the mean
    assert (m0 != m1).mean() > 0.1                      # redrawn every trial
    m2 = np.zeros((64, 100), np.float32)
    K.dropout_mask(m2, 0.9, np.uint64(43), 0, 64)
    assert (m0 != m2).mean() > 0.1                      # independent across keys


# ---- SGD ----------------------------------------------------------------------------------------
def sgd_twin(W, V, dW, lr, m, wd, style, nb):
    W, V, dW = (a.astype(np.float64) for a in (W, V, dW))
    g = dW / nb + wd * W
    if style == 0:
        V = m * V + lr * g
        W = W - V
    else:
        V = m * V + g
        W = W - lr * V
    return W, V


@pytest.mark.parametrize("style", [0, 1])
@pytest.mark.parametrize("wd", [0.0, 1e-2])
@pytest.mark.parametrize("nb", [8, 5])
def test_sgd_step(style, wd, nb):
    rng = _rng(10)
    W0 = _f32(rng.standard_normal((6, 9)))
    V0 = _f32(0.1 * rng.standard_normal((6, 9)))
    dW = _f32(rng.standard_normal((6, 9)))
    W, V = W0.copy(), V0.copy()
    st = K.sgd_step(W, V, dW, 0.1, 0.9, wd, style, nb, 1e4)
    Wt, Vt = sgd_twin(W0, V0, dW, 0.1, 0.9, wd, style, nb)
    assert st == K.OK
    np.testing.assert_allclose(V, Vt, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(W, Wt, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("style", [2, 3])
def test_sgd_step_fused_styles(style):
    """Styles 2/3: V already holds the new velocity; W -= V (2) or W -= lr V (3)."""
    rng = _rng(11)
    W0 = _f32(rng.standard_normal((4, 5)))
    V = _f32(rng.standard_normal((4, 5)))
    W = W0.copy()
    st = K.sgd_step(W, V, np.zeros_like(W), 0.1, 0.9, 0.0, style, 8, 1e4)
    assert st == K.OK
    s = 1.0 if style == 2 else 0.1
    np.testing.assert_allclose(W, W0 - s * V.astype(np.float64), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("style", [0, 1, 2, 3])
def test_sgd_step_status(style):
    """|W| > limit -> WEIGHT_RUNAWAY; a non-finite W -> NONFINITE_WEIGHT, which wins over a
    runaway anywhere in the matrix."""
    W = np.zeros((2, 3), np.float32)
    V = np.zeros((2, 3), np.float32)
    dW = np.zeros((2, 3), np.float32)
    W[0, 1] = 50.0
    assert K.sgd_step(W.copy(), V.copy(), dW, 0.1, 0.9, 0.0, style, 1, 10.0) == K.WEIGHT_RUNAWAY
    assert K.sgd_step(W.copy(), V.copy(), dW, 0.1, 0.9, 0.0, style, 1, 100.0) == K.OK
    for pos in [(0, 0), (1, 2)]:                    # before and after the runaway entry
        Wb = W.copy()
        Wb[pos] = np.inf
        assert K.sgd_step(Wb, V.copy(), dW, 0.1, 0.9, 0.0, style, 1, 10.0) == K.NONFINITE_WEIGHT
    if style < 2:                                   # NaN coming in through the update
        dWn = dW.copy()
        dWn[1, 1] = np.nan
        assert K.sgd_step(W.copy(), V.copy(), dWn, 0.1, 0.9, 0.0, style, 1, 100.0) == \
            K.NONFINITE_WEIGHT
    else:                                           # through the fused velocity
        Vn = V.copy()
        Vn[1, 1] = np.nan
        assert K.sgd_step(W.copy(), Vn, dW, 0.1, 0.9, 0.0, style, 1, 100.0) == \
            K.NONFINITE_WEIGHT


# ---- statistics ---------------------------------------------------------------------------------
def test_frob():
    a = _f32(_rng(12).standard_normal((7, 9)))
    # squares are rounded to float32 before the float64 sum (the result is recorded as a
    # float32 anyway): ~1e-8 relative
    assert K.frob(a) == pytest.approx(np.linalg.norm(a.astype(np.float64)), rel=1e-7)
    assert K.frob(np.zeros((2, 2), np.float32)) == 0.0


def _angle_twin(a, b):
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    c = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


def test_angle_deg():
    rng = _rng(13)
    a = _f32(rng.standard_normal((6, 4)))
    b = _f32(rng.standard_normal((6, 4)))
    bt = np.ascontiguousarray(b.T)
    # float32 products (see test_frob): ~1e-8 relative in the cosine, ~1e-6 degrees
    assert K.angle_deg(a, b, False) == pytest.approx(_angle_twin(a, b), abs=1e-5)
    assert K.angle_deg(a, bt, True) == pytest.approx(_angle_twin(a, b), abs=1e-5)
    assert K.angle_deg(a, a, False) == pytest.approx(0.0, abs=1e-5)
    assert K.angle_deg(a, -a, False) == pytest.approx(180.0, abs=1e-5)
    e = np.zeros((2, 2), np.float32)
    f = np.zeros((2, 2), np.float32)
    e[0, 0] = 1.0
    f[1, 1] = 3.0
    assert K.angle_deg(e, f, False) == pytest.approx(90.0, abs=1e-12)
    assert math.isnan(K.angle_deg(a, np.zeros_like(a), False))
