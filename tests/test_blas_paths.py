"""gemm_rm's special paths (matrix-vector via sgemv, rank-1 updates by loop) against numpy."""

import numpy as np
import pytest

from neurosim.kernels.blas import gemm_reference, gemm_rm

SHAPES = [(1, 7, 5), (5, 7, 1), (1, 1, 1), (4, 1, 6), (1, 5, 1), (3, 4, 5), (1, 300, 200),
          (16, 1, 10)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_gemm_paths_match_numpy(m, k, n, ta, tb, beta):
    rng = np.random.default_rng(m * 100 + k * 10 + n)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    c = rng.standard_normal((m, n)).astype(np.float32)
    ref = gemm_reference(ta, tb, 1.3, a, b, beta, c)
    gemm_rm(ta, tb, 1.3, a, b, beta, c, np.zeros(8, np.int32), np.zeros(2, np.float32))
    # float32 dot products of length k: relative error <= ~k * 2^-24 of the summed magnitudes;
    # 1e-5 of the largest |ref| is a safe bound for k <= 300 with unit-variance entries
    np.testing.assert_allclose(c, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()) * max(1, k) ** 0.5)


def test_beta_zero_ignores_nan_in_output():
    # BLAS semantics: with beta = 0 the old contents are not read (a NaN there must not leak)
    a = np.ones((1, 3), np.float32)
    b = np.ones((3, 2), np.float32)
    for m, k in ((1, 3), (2, 1)):
        aa = np.ones((m, k), np.float32)
        bb = np.ones((k, 2), np.float32)
        c = np.full((m, 2), np.nan, np.float32)
        gemm_rm(False, False, 1.0, aa, bb, 0.0, c, np.zeros(8, np.int32), np.zeros(2, np.float32))
        assert np.all(c == k)
    c = np.full((1, 2), np.nan, np.float32)
    gemm_rm(False, False, 1.0, a, b, 0.0, c, np.zeros(8, np.int32), np.zeros(2, np.float32))
    assert np.all(c == 3)
