"""Multithreaded element-wise operations (``Simulator(threads=n > 1)``).

The parallel kernels split the rows into blocks and run the serial kernel on each block, so
every element is computed by the same arithmetic: results must be *bit-identical* to the serial
kernels, for every transfer code, and statuses must be the same (a non-finite weight outranks a
runaway one, whichever block it is in). ``nthreads = 3`` exceeds the 2 CPUs of small machines on
purpose: prange then runs more blocks than threads, which must not matter.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_data
from neurosim import SGD, Simulator, compile_plan
from neurosim.kernels import ops as K
from neurosim.kernels.blas import gemm_par, gemm_reference, gemm_rm
from neurosim.models import build_pepita_network

CODES = {"identity": K.IDENTITY, "relu": K.RELU, "tanh": K.TANH, "sigmoid": K.SIGMOID,
         "erf": K.ERF, "softmax": K.SOFTMAX, "rms_relu": K.RMS_NORM + K.RELU}


def _arr(shape, seed, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("nthreads", [2, 3])
@pytest.mark.parametrize("code", list(CODES))
@pytest.mark.parametrize("use_mask", [False, True])
def test_transfer_and_euler_par_equal_serial(code, use_mask, nthreads):
    d = _arr((37, 300), 1)
    mask = (np.random.default_rng(2).random((37, 300)) < 0.9).astype(np.float32) / 0.9
    c = CODES[code]
    r1, r2 = np.zeros_like(d), np.zeros_like(d)
    assert K.transfer(r1, d, c, mask, use_mask) and K.transfer_par(r2, d, c, mask, use_mask,
                                                                   nthreads)
    np.testing.assert_array_equal(r1, r2)
    r1, r2 = _arr(d.shape, 3), None
    r2 = r1.copy()
    t1, t2 = np.zeros_like(d), np.zeros_like(d)
    assert K.euler(r1, d, c, mask, use_mask, 0.2, t1)
    assert K.euler_par(r2, d, c, mask, use_mask, 0.2, t2, nthreads)
    np.testing.assert_array_equal(r1, r2)


def test_transfer_par_reports_nonfinite_in_any_block():
    for bad, row in ((np.inf, 37), (np.nan, 0), (-np.inf, 20)):
        d = _arr((40, 500), 4)
        d[row, 11] = bad
        r = np.zeros_like(d)
        expect = K.transfer(r.copy(), d, K.IDENTITY, d, False)
        assert not expect
        assert K.transfer_par(r, d, K.IDENTITY, d, False, 2) == expect


@pytest.mark.parametrize("nthreads", [2, 3])
@pytest.mark.parametrize("style", [0, 1, 2, 3])
def test_sgd_step_par_equals_serial(style, nthreads):
    W, V, dW = _arr((301, 257), 5), _arr((301, 257), 6, 0.1), _arr((301, 257), 7)
    W2, V2 = W.copy(), V.copy()
    args = (0.05, 0.9, 1e-3, style, 16, 1e6)
    assert K.sgd_step(W, V, dW, *args) == K.OK
    assert K.sgd_step_par(W2, V2, dW, *args, nthreads) == K.OK
    np.testing.assert_array_equal(W, W2)
    np.testing.assert_array_equal(V, V2)


@pytest.mark.parametrize("style", [0, 2])
def test_sgd_step_par_status(style):
    """A runaway weight in the first block and a NaN in the last: NONFINITE_WEIGHT, as serially;
    a runaway alone: WEIGHT_RUNAWAY."""
    W, V, dW = _arr((64, 300), 8), np.zeros((64, 300), np.float32), np.zeros((64, 300),
                                                                           np.float32)
    W[0, 0] = 1e9
    W2 = W.copy()
    assert K.sgd_step_par(W2, V.copy(), dW, 0.1, 0.0, 0.0, style, 1, 1e6, 2) == K.WEIGHT_RUNAWAY
    W[63, 5] = np.nan
    for n in (2, 3):
        assert K.sgd_step_par(W.copy(), V.copy(), dW, 0.1, 0.0, 0.0, style, 1, 1e6, n) == \
            K.sgd_step(W.copy(), V.copy(), dW, 0.1, 0.0, 0.0, style, 1, 1e6) == \
            K.NONFINITE_WEIGHT


@pytest.mark.parametrize("nthreads", [2, 3])
def test_dropout_mask_and_deriv_par_equal_serial(nthreads):
    m1, m2 = np.zeros((50, 333), np.float32), np.zeros((50, 333), np.float32)
    K.dropout_mask(m1, 0.8, np.uint64(1234), 7, 64)
    K.dropout_mask_par(m2, 0.8, np.uint64(1234), 7, 64, nthreads)
    np.testing.assert_array_equal(m1, m2)
    d = _arr((50, 333), 9)
    for code in (K.RELU, K.TANH, K.SIGMOID, K.ERF):
        x1, x2 = _arr((50, 333), 10), None
        x2 = x1.copy()
        K.deriv_mul(x1, d, code)
        K.deriv_mul_par(x2, d, code, nthreads)
        np.testing.assert_array_equal(x1, x2)


# (m, k, n): tall, wide (split along the other dimension), odd sizes, the PEPITA shapes
SPLIT_SHAPES = [(1024, 64, 784), (64, 784, 1024), (333, 129, 77), (77, 300, 333), (10, 64, 1024)]


@pytest.mark.parametrize("m,k,n", SPLIT_SHAPES, ids=["x".join(map(str, s)) for s in SPLIT_SHAPES])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("nthreads", [2, 3])
def test_gemm_par_blocks(m, k, n, trans_a, trans_b, nthreads):
    """The product split into row or column blocks (leading dimensions from the strides of the
    blocks) equals the float64 product to float32 accuracy: |error| <= k 2^-24 sum |a||b| per
    element (the standard dot-product bound), checked as rtol 1e-5 with atol scaled by
    sqrt(k); the neighbours of c outside the product are never written."""
    rng = np.random.default_rng(m + 7 * k + 13 * n)
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    big = rng.standard_normal((m, n + 5)).astype(np.float32)   # c is a column block of it
    c0 = big[:, 2:2 + n].copy()
    guard = big.copy()
    c = big[:, 2:2 + n]
    ws = (np.zeros(8, np.int32), np.zeros(2, np.float32))
    gemm_par(trans_a, trans_b, -0.7, a, b, 0.5, c, *ws, nthreads)
    want = gemm_reference(trans_a, trans_b, -0.7, a, b, 0.5, c0)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-6 * np.sqrt(k) * 4)
    np.testing.assert_array_equal(big[:, :2], guard[:, :2])
    np.testing.assert_array_equal(big[:, 2 + n:], guard[:, 2 + n:])
    c1 = c0.copy()                       # and the same as one call, to float32 accuracy
    gemm_rm(trans_a, trans_b, -0.7, a, b, 0.5, c1, *ws)
    np.testing.assert_allclose(c, c1, rtol=1e-5, atol=1e-6 * np.sqrt(k) * 4)


@pytest.mark.parametrize("mode", ["steady", "time"])
def test_simulator_threads_give_the_same_training(mode):
    """PEPITA with dropout, 784-1024-10 shapes cut down to 300-512-10 (large enough that the
    GEMMs are split and every element-wise operation takes the parallel path), steady state and
    time mode (Euler steps in row blocks): threads=2 trains like threads=1. The dropout masks are
    identical bit for bit; the weights can differ only where a GEMM block is summed in another
    order by the BLAS kernel (float32, fan-in <= 512: relative error of a dot product <= 512 *
    2^-24 = 3e-5 per update, and the weight change over the minibatches is ~1% of the weight),
    so the tolerance on the weights is 1e-5 relative to their scale."""
    sizes = (300, 512, 10)
    X, Y = make_data(256 if mode == "steady" else 128, sizes[0], sizes[-1], seed=0)
    out = {}
    for threads in (1, 2):
        kw = dict(mode="time", tau=0.01, dt=0.002, phase_duration=0.03) if mode == "time" else {}
        net = build_pepita_network(sizes, dropout=0.1, **kw)
        plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                            optimizer=SGD(lr=0.1, momentum=0.9), batch=64, seed=3)
        sim = Simulator(plan, threads=threads)
        sim.train(X, Y)
        out[threads] = (sim.weights["W1"].copy(), sim.weights["W2"].copy(),
                        sim.buffer("hidden.mask").copy(), sim.predict(X))
    w1, w2, m1, p1 = out[1]
    v1, v2, n1, q1 = out[2]
    assert (m1 == 0).any()
    np.testing.assert_array_equal(m1, n1)
    for a, b in ((w1, v1), (w2, v2)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())
    assert np.mean(p1 == q1) > 0.99
