"""Direct single-precision GEMM from compiled code.

numba's ``np.dot`` cannot accumulate (``beta``) nor scale (``alpha``), so every projection that
adds into a drive and every fused momentum step would need an extra pass over memory. Here the
Fortran ``sgemm`` of SciPy's bundled BLAS is registered under a fixed symbol name, which keeps
``cache=True`` working (the compiled code refers to the name, not to a process address).
"""

from __future__ import annotations

import llvmlite.binding as _llvm
import numpy as np
from numba import njit, prange, types
from numba.extending import get_cython_function_address, intrinsic

_SYMBOL = "neurosim_sgemm"
_SYMBOL_GEMV = "neurosim_sgemv"
_llvm.add_symbol(_SYMBOL, get_cython_function_address("scipy.linalg.cython_blas", "sgemm"))
_llvm.add_symbol(_SYMBOL_GEMV, get_cython_function_address("scipy.linalg.cython_blas", "sgemv"))

_P = types.voidptr
_sgemm = types.ExternalFunction(_SYMBOL, types.void(_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P))
_sgemv = types.ExternalFunction(_SYMBOL_GEMV, types.void(_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P))


@intrinsic
def _ptr(typingctx, arr):
    """Data pointer of an array as ``void*`` (no copy, no bounds)."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.bitcast(ary.data, context.get_value_type(types.voidptr))

    return types.voidptr(arr), codegen


@njit(cache=True)
def gemm_rm(trans_a, trans_b, alpha, a, b, beta, c, ws_i, ws_f):
    """``c = alpha * op(a) @ op(b) + beta * c`` for row-major float32 2-D arrays, in place.

    The arrays must have unit stride along their rows; the row stride may exceed the row length
    (column blocks of a larger matrix: the leading dimensions come from the strides).
    ``ws_i`` (int32[8]) and ``ws_f`` (float32[2]) are scratch for the by-reference Fortran
    arguments. Row-major trick: BLAS sees ``c.T = op(b).T @ op(a).T`` in column-major order.
    """
    m = a.shape[1] if trans_a else a.shape[0]
    k = a.shape[0] if trans_a else a.shape[1]
    n = b.shape[0] if trans_b else b.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:
        for i in range(m):
            for j in range(n):
                c[i, j] = beta * c[i, j] if beta != 0.0 else 0.0
        return
    if k == 1:
        # outer product (e.g. an online update): a plain loop beats BLAS's packing
        for i in range(m):
            ai = alpha * (a[0, i] if trans_a else a[i, 0])
            for j in range(n):
                bj = b[j, 0] if trans_b else b[0, j]
                c[i, j] = ai * bj + (beta * c[i, j] if beta != 0.0 else 0.0)
        return
    if m == 1 or n == 1:
        # matrix-vector: sgemm with a unit dimension packs the whole matrix on every call
        # (about 20x slower than sgemv at 784 x 1024 here)
        _gemv(trans_a, trans_b, alpha, a, b, beta, c, m, n, k, ws_i, ws_f)
        return
    ws_i[0] = n
    ws_i[1] = m
    ws_i[2] = k
    ws_i[3] = _ld(b)
    ws_i[4] = _ld(a)
    ws_i[5] = _ld(c)
    ws_i[6] = 84 if trans_b else 78  # 'T' or 'N' for BLAS's first operand (our b)
    ws_i[7] = 84 if trans_a else 78
    ws_f[0] = alpha
    ws_f[1] = beta
    _sgemm(_ptr(ws_i[6:7]), _ptr(ws_i[7:8]), _ptr(ws_i[0:1]), _ptr(ws_i[1:2]), _ptr(ws_i[2:3]),
           _ptr(ws_f[0:1]), _ptr(b), _ptr(ws_i[3:4]), _ptr(a), _ptr(ws_i[4:5]),
           _ptr(ws_f[1:2]), _ptr(c), _ptr(ws_i[5:6]))


@njit(cache=True, inline="always")
def _ld(x):
    """Leading dimension (row stride in elements) of a row-major 2-D array."""
    return max(x.strides[0] // 4, x.shape[1], 1)


# below this many multiply-adds a split GEMM costs more in fork/join than it gains
PAR_GEMM_MIN = 1 << 20


@njit(cache=True, parallel=True)
def _gemm_blocks(trans_a, trans_b, alpha, a, b, beta, c, nthreads):
    """:func:`gemm_rm` with ``c`` split into ``nthreads`` row blocks (``m >= n``) or column
    blocks, one single-threaded BLAS call per block, in parallel. Every element of ``c`` is the
    same dot product as in one call, so the result only depends on the BLAS kernel's blocking."""
    m, n = c.shape
    for t in prange(nthreads):
        ws_i = np.empty(8, np.int32)
        ws_f = np.empty(2, np.float32)
        if m >= n:
            i0, i1 = t * m // nthreads, (t + 1) * m // nthreads
            if trans_a:
                gemm_rm(trans_a, trans_b, alpha, a[:, i0:i1], b, beta, c[i0:i1], ws_i, ws_f)
            else:
                gemm_rm(trans_a, trans_b, alpha, a[i0:i1], b, beta, c[i0:i1], ws_i, ws_f)
        else:
            j0, j1 = t * n // nthreads, (t + 1) * n // nthreads
            if trans_b:
                gemm_rm(trans_a, trans_b, alpha, a, b[j0:j1], beta, c[:, j0:j1], ws_i, ws_f)
            else:
                gemm_rm(trans_a, trans_b, alpha, a, b[:, j0:j1], beta, c[:, j0:j1], ws_i, ws_f)


@njit(cache=True)
def gemm_par(trans_a, trans_b, alpha, a, b, beta, c, ws_i, ws_f, nthreads):
    """:func:`gemm_rm` on ``nthreads`` threads of numba's pool (BLAS itself single-threaded:
    one thread pool, no two pools competing for the cores). Small products and matrix-vector
    products run in one call."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    if nthreads < 2 or m < 2 or n < 2 or k < 2 or m * n * k < PAR_GEMM_MIN or \
            max(m, n) < 2 * nthreads:
        gemm_rm(trans_a, trans_b, alpha, a, b, beta, c, ws_i, ws_f)
    else:
        _gemm_blocks(trans_a, trans_b, alpha, a, b, beta, c, nthreads)


@njit(cache=True)
def _gemv(trans_a, trans_b, alpha, a, b, beta, c, m, n, k, ws_i, ws_f):
    """The m == 1 or n == 1 cases of :func:`gemm_rm` through Fortran ``sgemv``."""
    if m == 1:
        # c^T = op(b)^T a^T: the matrix is b, the vector is a's single row/column
        if trans_b:   # b is (n, k) row-major = (k, n) column-major; y = b x
            tr, rows, cols, ld = 84, k, n, k
        else:         # b is (k, n) row-major = (n, k) column-major; y = b^T x
            tr, rows, cols, ld = 78, n, k, n
        mat, vec = b, a
    else:
        # c = op(a) op(b) with one column: the matrix is a, the vector is b
        if trans_a:   # a is (k, m) row-major = (m, k) column-major; y = a^T x
            tr, rows, cols, ld = 78, m, k, m
        else:         # a is (m, k) row-major = (k, m) column-major; y = a x
            tr, rows, cols, ld = 84, k, m, k
        mat, vec = a, b
    ws_i[0] = rows
    ws_i[1] = cols
    ws_i[2] = ld
    ws_i[3] = 1
    ws_i[6] = tr
    ws_f[0] = alpha
    ws_f[1] = beta
    _sgemv(_ptr(ws_i[6:7]), _ptr(ws_i[0:1]), _ptr(ws_i[1:2]), _ptr(ws_f[0:1]), _ptr(mat),
           _ptr(ws_i[2:3]), _ptr(vec), _ptr(ws_i[3:4]), _ptr(ws_f[1:2]), _ptr(c), _ptr(ws_i[3:4]))


def gemm_reference(trans_a, trans_b, alpha, a, b, beta, c):
    """numpy twin of :func:`gemm_rm` (returns the new c)."""
    A = a.T if trans_a else a
    B = b.T if trans_b else b
    return (alpha * (A.astype(np.float64) @ B.astype(np.float64)) + beta * c).astype(np.float32)
