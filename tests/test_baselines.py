"""Tests of the PEPITA reference baselines in benchmarks/ (numpy and torch must agree)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    """Import benchmarks/<name>.py by path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", _BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bl = _load("baselines")

SIZES = (784, 1024, 10)
N_STEPS = 3
B = 64

# Tolerances on the *accumulated weight change* W - W0 after N_STEPS minibatches, as
# ||dW_a - dW_b|| / ||dW_ref|| per layer. Comparing the change rather than W itself matters:
# W1 moves by ~5e-4 per entry while |W1| ~ 0.09, so a test on W would hide a wrong update.
# Everything in the step is continuous in the inputs (relu, softmax, no thresholds other than
# the shared dropout masks), so two float32 implementations differ only by rounding in a
# different summation order (OpenBLAS vs torch's BLAS):
# * layer 2 (dW2 = e~^T h1~): no cancellation; GEMM rounding ~ sqrt(K) * eps32 with
#   K = 1024, eps32 = 1.2e-7 -> a few 1e-6 (measured ~2-3e-6 against a float64 run).
#   Tolerance 1e-4 (>30x margin); the icml2022/iclr2024 conventions differ by ~3e-3, 30x above.
# * layer 1 (dW1 = (h1 - h1~)^T x~): x~ - x = s e F^T is only ~1% of x (|F| <= 0.05*sqrt(6/784)),
#   so h1 - h1~ cancels about two digits and the float32 rounding of h1 and h1~ is amplified
#   ~30-100x: ~1e-4 relative (measured ~8e-5 for *each* float32 implementation against a
#   float64 run, ~9e-5 between them). Tolerance 1e-3 (10x margin); a wrong sign or pairing
#   of the difference gives O(1).
RTOL_UPDATE = (1e-3, 1e-4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One BLAS thread: these GEMMs are small, and the test machines are shared."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


def _batches(seed=0, n_steps=N_STEPS, dropout=0.1):
    """Same data and dropout masks for every implementation (masks scaled by 1/(1-p))."""
    rng = np.random.default_rng(seed)
    out = []
    keep = 1.0 - dropout
    for _ in range(n_steps):
        x = rng.random((B, SIZES[0]), dtype=np.float32)
        y = rng.integers(0, SIZES[-1], size=B)
        m = (rng.random((B, SIZES[1]), dtype=np.float32) < keep).astype(np.float32) / np.float32(keep)
        out.append((x, y, [m]))
    return out


def _run(model, batches, params):
    model.set_params(params)
    for x, y, masks in batches:
        model.train_step(x, y, masks=masks)
    return model.get_params()


def _rel_update_errors(p, q, p0, ref):
    errs = []
    for l in range(len(p0["W"])):
        d_ref = ref["W"][l].astype(np.float64) - p0["W"][l]
        diff = p["W"][l].astype(np.float64) - q["W"][l].astype(np.float64)
        errs.append(np.linalg.norm(diff) / np.linalg.norm(d_ref))
    return errs


def _reference(batches, p0, **kw):
    """float64 numpy run from the same float32 initial weights."""
    ref = bl.NumpyPEPITA(SIZES, dtype=np.float64, **kw)
    return _run(ref, batches, p0)


def test_numpy_float32_close_to_float64():
    batches = _batches()
    model = bl.NumpyPEPITA(SIZES, seed=1)
    p0 = model.get_params()
    p = _run(model, batches, p0)
    ref = _reference(batches, p0)
    errs = _rel_update_errors(p, ref, p0, ref)
    assert all(e < tol for e, tol in zip(errs, RTOL_UPDATE)), errs
    assert all(np.all(np.isfinite(w)) for w in p["W"])
    assert np.linalg.norm(p["W"][0] - p0["W"][0]) > 0


def test_conventions_are_distinguishable():
    """The tolerances above are tight enough to tell icml2022 from iclr2024 (via dW2)."""
    batches = _batches()
    p0 = bl.NumpyPEPITA(SIZES, seed=1).get_params()
    a = _reference(batches, p0, convention="icml2022")
    b = _reference(batches, p0, convention="iclr2024")
    errs = _rel_update_errors(a, b, p0, a)
    assert errs[1] > 10 * RTOL_UPDATE[1], errs


@pytest.mark.parametrize("convention,sign", [("icml2022", 1), ("iclr2024", -1)])
def test_torch_matches_numpy(convention, sign):
    pytest.importorskip("torch")
    batches = _batches(seed=2)
    kw = dict(convention=convention, sign=sign)
    np_model = bl.NumpyPEPITA(SIZES, seed=5, **kw)
    t_model = bl.TorchPEPITA(SIZES, seed=5, **kw)
    p0 = np_model.get_params()
    # equal seeds give equal initial weights; set_params shares them explicitly anyway
    for w_t, w_n in zip(t_model.get_params()["W"], p0["W"]):
        np.testing.assert_array_equal(w_t, w_n)
    np.testing.assert_array_equal(t_model.get_params()["F"], p0["F"])

    p_np = _run(np_model, batches, p0)
    p_t = _run(t_model, batches, p0)
    ref = _reference(batches, p0, **kw)
    errs = _rel_update_errors(p_np, p_t, p0, ref)
    assert all(e < tol for e, tol in zip(errs, RTOL_UPDATE)), errs
    # momentum buffers: V_3 = 0.81 V_1-part + ..., same rounding argument
    for l, tol in enumerate(RTOL_UPDATE):
        dv = np.linalg.norm(p_np["V"][l].astype(np.float64) - p_t["V"][l])
        assert dv / np.linalg.norm(ref["V"][l]) < tol


def test_train_epoch_deterministic_and_partial_batch():
    rng = np.random.default_rng(0)
    x = rng.random((150, 20), dtype=np.float32)  # 150 = 2 full batches + a partial one of 22
    y = rng.integers(0, 4, size=150)
    classes = [bl.NumpyPEPITA]
    try:
        import torch  # noqa: F401
        classes.append(bl.TorchPEPITA)
    except ImportError:
        pass
    for cls in classes:
        runs = []
        for _ in range(2):
            m = cls((20, 32, 4), seed=3)
            m.train_epoch(x, y, batch_size=B, rng=np.random.default_rng(7))
            runs.append(m.get_params()["W"])
        for a, b in zip(*runs):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == np.float32 and np.all(np.isfinite(a))


def test_torch_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(ImportError, match="pip install torch==2.13.0"):
        bl.TorchPEPITA(SIZES)


def test_set_threads():
    from threadpoolctl import threadpool_info

    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    bl.set_threads(1)
    try:
        assert all(info["num_threads"] == 1 for info in threadpool_info()
                   if info["user_api"] == "blas")
        if bl.torch_available():
            import torch

            assert torch.get_num_threads() == 1
    finally:
        bl._THREAD_LIMITER.restore_original_limits()
        bl._THREAD_LIMITER = None
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
    with pytest.raises(ValueError):
        bl.set_threads(0)


def test_gemm_floor_smoke():
    gf = _load("gemm_floor")
    d = gf.gemm_floor(batch=8, sizes=(32, 64, 4), threads=1, repeats=2, inner=2,
                      return_details=True)
    assert d["samples_per_s"] > 0 and d["gflops"] > 0
    assert gf.gemm_floor(batch=8, sizes=(32, 64, 4), repeats=1, inner=1, full=True) > 0
