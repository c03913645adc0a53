"""The kernel pieces Forward-Forward and the contrastive rule use, each against a numpy twin.

New in ops.py for them: the ``RMS_NORM`` transfer flag (RMS-normalised population outputs, in
``TRANSFER``, ``EULER`` and ``APPLY``) and the ``SAMPLE_WRONG`` opcode (hard negatives). The
existing generic row ops the rules compose (``EMBED_LABEL``, ``WRONG_LABEL``, ``ONEHOT``,
``ROW_SUMSQ``, ``ROW_SCALE``, ``ROW_NORMALIZE``, ``AFFINE``, ``COL_MEAN``, ``APPLY``, ``BIAS``,
``GUARD``) are checked here too, through ``run_trials`` on hand-built programs.

Tolerances: kernels compute in float32, twins in float64 (row reductions over n terms: rtol 1e-5).
"""

from __future__ import annotations


import numpy as np
import pytest

from neurosim.kernels import ops as K
from neurosim.kernels.rng import uniform01_reference
from neurosim.optable import encode

KEY = np.uint64(0x1234_5678_9ABC_DEF0)


def _f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def f_twin(code, x):
    x = np.asarray(x, np.float64)
    if code == K.RELU:
        return np.maximum(x, 0.0)
    if code == K.TANH:
        return np.tanh(x)
    if code == K.SIGMOID:
        return 1.0 / (1.0 + np.exp(-x))
    return x


def rms_twin(code, x):
    """f(x) / (eps + rms(f(x))) per row."""
    f = f_twin(code, x)
    return f / (K.RMS_EPS + np.sqrt(np.mean(f * f, axis=1, keepdims=True)))


# ---- a tiny interpreter harness --------------------------------------------------------------
class Prog:
    """Buffers + instructions run through ``run_trials`` (one block, ``n_trials`` trials)."""

    def __init__(self, batch):
        self.batch = batch
        self.arrays, self.flags, self.instr = [], [], []

    def buf(self, arr, batch=False):
        self.arrays.append(_f32(arr))
        self.flags.append(batch)
        return len(self.arrays) - 1

    def op(self, name, **operands):
        """An instruction encoded through the op table (operands by name)."""
        self.instr.append(encode(name, **operands))

    def run(self, X=None, Y=None, order=None, trial0=0, n_trials=1, start=0, keys=(KEY,)):
        offs, total = [], 0
        for a in self.arrays:
            offs.append(total)
            total += a.size + 16
        mem = np.zeros(total, np.float32)
        bufs = np.zeros((len(self.arrays), 4), np.int64)
        for i, (a, b) in enumerate(zip(self.arrays, self.flags)):
            mem[offs[i]:offs[i] + a.size] = a.ravel()
            bufs[i] = (offs[i], a.shape[0], a.shape[1], int(b))
        prog = np.array([p for p, _ in self.instr], np.int64).reshape(-1, 8)
        fprm = np.array([f for _, f in self.instr], np.float64).reshape(-1, 6)
        blocks = np.array([[0, len(prog), 1, -1, 0]], np.int64)
        if order is None:  # no data: every minibatch is full (nb = batch)
            order = np.zeros(0, np.int64) if Y is None else np.arange(len(Y), dtype=np.int64)
        X = np.zeros((1, 1), np.float32) if X is None else _f32(X)
        Y = np.zeros(1, np.int64) if Y is None else np.asarray(Y, np.int64)
        st = K.run_trials(mem, bufs, prog, fprm, blocks, X, Y, np.zeros((1, 1), np.float32),
                          order, start, n_trials, self.batch, trial0, 0,
                          np.asarray(keys, np.uint64), np.zeros(1, np.float64),
                          np.zeros(1, np.float32), np.zeros(2, np.int64),
                          np.zeros((1, 8), np.int64), np.zeros(1, np.int64),
                          np.zeros(4, np.int64), np.zeros((1, 1), np.float32),
                          np.zeros(8, np.int32), np.zeros(2, np.float32), 1, None)
        assert st == K.OK
        self.out = [mem[o:o + a.size].reshape(a.shape).copy() for o, a in zip(offs, self.arrays)]
        return self.out


# ---- RMS-normalised transfer ------------------------------------------------------------------
@pytest.mark.parametrize("base", [K.IDENTITY, K.RELU, K.TANH, K.SIGMOID])
@pytest.mark.parametrize("use_mask", [False, True])
def test_transfer_rms(base, use_mask):
    """TRANSFER with code base + RMS_NORM: r = f(d) / (eps + rms f(d)) [* mask]; a zero row
    stays zero (no 0/0)."""
    rng = np.random.default_rng(0)
    d = _f32(rng.standard_normal((6, 17)) * 2)
    d[3] = 0.0 if base in (K.IDENTITY, K.RELU, K.TANH) else d[3]
    mask = _f32((rng.random((6, 17)) < 0.7) / 0.7)
    r = np.zeros_like(d)
    ok = K.transfer(r, d, base + K.RMS_NORM, mask, use_mask)
    want = rms_twin(base, d) * (mask if use_mask else 1.0)
    assert ok
    np.testing.assert_allclose(r, want, rtol=1e-5, atol=1e-6)
    norm = np.sqrt(np.mean(rms_twin(base, d) ** 2, axis=1))
    nonzero = np.abs(f_twin(base, d)).sum(1) > 0
    np.testing.assert_allclose(norm[nonzero], 1.0, rtol=1e-5)
    # APPLY reaches the same code path (used by rules), also in place
    a = d.copy()
    K.apply_f(a, a, base + K.RMS_NORM)
    np.testing.assert_allclose(a, rms_twin(base, d), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", [K.IDENTITY, K.RELU])
def test_rms_transfer_reports_nan(base):
    """A NaN or inf drive is not normalised away: TRANSFER and EULER report a non-finite rate."""
    for bad in (np.nan, np.inf):
        d = _f32(np.ones((3, 5)))
        d[1, 2] = bad
        r = np.zeros_like(d)
        assert not K.transfer(r, d, base + K.RMS_NORM, d, False)
        r = np.zeros_like(d)
        assert not K.euler(r, d, base + K.RMS_NORM, d, False, 0.5, d)


@pytest.mark.parametrize("base", [K.IDENTITY, K.RELU])
@pytest.mark.parametrize("use_mask", [False, True])
def test_euler_rms(base, use_mask):
    """EULER with a normalised code: r += alpha (n(f(d)) [* mask] - r)."""
    rng = np.random.default_rng(1)
    d = _f32(rng.standard_normal((5, 11)))
    r0 = _f32(rng.random((5, 11)))
    mask = _f32((rng.random((5, 11)) < 0.8) / 0.8)
    r = r0.copy()
    ok = K.euler(r, d, base + K.RMS_NORM, mask, use_mask, 0.3, np.zeros_like(d))
    target = rms_twin(base, d) * (mask if use_mask else 1.0)
    assert ok
    np.testing.assert_allclose(r, r0 + 0.3 * (target - r0), rtol=1e-5, atol=1e-6)


def test_rms_normalization_is_scale_invariant_and_matches_row_normalize():
    """n(c x) = n(x) for c > 0 (what makes the layer see only the direction of its input), and
    TRANSFER identity+RMS equals the ROW_NORMALIZE op with the same eps."""
    rng = np.random.default_rng(2)
    x = _f32(rng.random((4, 9)))
    a, b = np.zeros_like(x), np.zeros_like(x)
    K.apply_f(a, x, K.IDENTITY + K.RMS_NORM)
    K.apply_f(b, _f32(x * 37.0), K.IDENTITY + K.RMS_NORM)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    p = Prog(4)
    src, dst = p.buf(x, True), p.buf(np.zeros_like(x), True)
    p.op("ROW_NORMALIZE", dst=dst, src=src, eps=K.RMS_EPS)
    np.testing.assert_allclose(p.run()[dst], a, rtol=1e-6)


# ---- SAMPLE_WRONG (hard negatives) -------------------------------------------------------------
def sample_excluding_twin(p, lab, u):
    p = np.where(np.arange(len(p)) == lab, 0.0, np.maximum(np.asarray(p, np.float64), 0.0))
    tot = p.sum()
    if not tot > 0:
        k = min(int(u * (len(p) - 1)), len(p) - 2)
        return k if k < lab else k + 1
    c = np.cumsum(p)
    j = int(np.searchsorted(c, u * tot, side="right"))
    return min(j, int(np.flatnonzero(p)[-1]))


def test_sample_excluding_matches_twin():
    rng = np.random.default_rng(3)
    for _ in range(400):
        n = int(rng.integers(2, 12))
        p = _f32(rng.dirichlet(np.ones(n) * 0.5))
        lab = int(rng.integers(n))
        u = np.float32(rng.random())
        assert K.sample_excluding(p, lab, u) == sample_excluding_twin(p, lab, float(u))


def test_sample_excluding_degenerate_rows():
    """All mass on the true class (saturated softmax) -> uniform over the others; never lab."""
    p = _f32([0.0, 0.0, 1.0, 0.0])
    got = {K.sample_excluding(p, 2, np.float32(u)) for u in np.linspace(0, 0.999, 50)}
    assert got == {0, 1, 3}


def test_sample_wrong_op():
    """SAMPLE_WRONG draws, per row, a class != Y with probability p_j / sum_{k != y} p_k, from the
    counter stream (key, trial * batch + row); the twin reproduces every draw."""
    B, C, trials = 16, 5, 300
    rng = np.random.default_rng(4)
    P = _f32(rng.dirichlet(np.ones(C), size=B))
    Y = rng.integers(0, C, size=B * trials)
    order = rng.permutation(B * trials).astype(np.int64)
    counts = np.zeros((B, C))
    for t in range(trials):
        p = Prog(B)
        pr, dst = p.buf(P, True), p.buf(np.zeros((B, 1)), True)
        p.op("SAMPLE_WRONG", dst=dst, probs=pr, key=0)
        out = p.run(Y=Y, order=order, start=t * B, trial0=t)[dst][:, 0].astype(int)
        u = uniform01_reference(int(KEY), np.arange(B, dtype=np.uint64) + np.uint64(t * B))
        ys = Y[order[t * B:(t + 1) * B]]
        want = [sample_excluding_twin(P[b], ys[b], float(u[b])) for b in range(B)]
        np.testing.assert_array_equal(out, want)
        assert np.all(out != ys)
        for b in range(B):
            if ys[b] == 0:
                counts[b, out[b]] += 1
    # rows with label 0: frequencies follow p over classes 1..C-1
    rows = counts.sum(1) > 50
    freq = counts[rows, 1:] / counts[rows].sum(1, keepdims=True)
    expect = P[rows, 1:] / P[rows, 1:].sum(1, keepdims=True)
    assert np.max(np.abs(freq - expect)) < 0.2


# ---- label embedding ----------------------------------------------------------------------------
def test_embed_label_and_wrong_label():
    """EMBED_LABEL overwrites the first C columns (true label / label buffer / neutral), leaves the
    rest; WRONG_LABEL is uniform over the C - 1 wrong classes and never the true one."""
    B, C, D = 32, 10, 20
    rng = np.random.default_rng(5)
    X = _f32(rng.random((B * 40, D)))
    Y = rng.integers(0, C, size=B * 40)
    seen = np.zeros((C, C))
    for t in range(40):
        p = Prog(B)
        xs = p.buf(np.zeros((B, D)), True)
        pos, neg, neu = (p.buf(np.zeros((B, D)), True) for _ in range(3))
        lab = p.buf(np.zeros((B, 1)), True)
        p.op("GATHER", dst=xs, source=0)
        p.op("COPY", dst=pos, src=xs)
        p.op("EMBED_LABEL", dst=pos, source=0, ncls=C, on=1.0, off=0.0)
        p.op("WRONG_LABEL", dst=lab, key=0, ncls=C)
        p.op("COPY", dst=neg, src=xs)
        p.op("EMBED_LABEL", dst=neg, source=1, labels=lab, ncls=C, on=2.0, off=0.0)
        p.op("COPY", dst=neu, src=xs)
        p.op("EMBED_LABEL", dst=neu, source=0, ncls=C, on=0.1, off=0.1)
        out = p.run(X=X, Y=Y, start=t * B, trial0=t)
        x, y = X[t * B:(t + 1) * B], Y[t * B:(t + 1) * B]
        want = x.copy()
        want[:, :C] = np.eye(C)[y]
        np.testing.assert_array_equal(out[pos], want)
        wl = out[lab][:, 0].astype(int)
        u = uniform01_reference(int(KEY), np.arange(B, dtype=np.uint64) + np.uint64(t * B))
        k = np.minimum((u * (C - 1)).astype(int), C - 2)
        np.testing.assert_array_equal(wl, np.where(k < y, k, k + 1))
        assert np.all(wl != y)
        want = x.copy()
        want[:, :C] = 2.0 * np.eye(C)[wl]
        np.testing.assert_array_equal(out[neg], want)
        assert np.all(out[neg][np.arange(B), y] == 0.0)
        want = x.copy()
        want[:, :C] = 0.1
        np.testing.assert_allclose(out[neu], want)
        seen[y, wl] += 1
    assert np.all(np.diag(seen) == 0)


# ---- row and column ops of the goodness / peer-normalisation pipeline --------------------------
def test_goodness_pipeline_ops():
    """APPLY(relu) -> ROW_SUMSQ -> COPY/AFFINE/APPLY(sigmoid) -> ROW_SCALE -> COL_MEAN -> BIAS, the
    sequence the contrastive rule emits, against numpy."""
    B, n = 7, 13
    theta, T, lam, d = 5.0, 2.0, 0.03, 0.9
    rng = np.random.default_rng(6)
    drive = _f32(rng.standard_normal((B, n)) * 1.5)
    m0 = _f32(rng.random((1, n)))
    pv0 = _f32(rng.standard_normal((1, n)))
    p = Prog(B)
    dr, y, G, q = p.buf(drive, True), p.buf(np.zeros((B, n)), True), p.buf(np.zeros((B, 1)), True), \
        p.buf(np.zeros((B, 1)), True)
    m, pv = p.buf(m0), p.buf(pv0)
    p.op("APPLY", dst=y, src=dr, code=K.RELU)
    p.op("ROW_SUMSQ", dst=G, src=y, scale=1.0)
    p.op("COL_MEAN", dst=m, src=y, alpha=1 - d, beta=d)
    p.op("COPY", dst=q, src=G)
    p.op("AFFINE", dst=q, s=-1.0 / T, c=theta / T)
    p.op("APPLY", dst=q, src=q, code=K.SIGMOID)
    p.op("ROW_SCALE", dst=y, s=q)
    p.op("BIAS", dst=y, bias=pv)
    out = p.run()
    h = np.maximum(drive.astype(np.float64), 0)
    g = (h * h).sum(1, keepdims=True)
    qq = 1.0 / (1.0 + np.exp((g - theta) / T))      # 1 - sigmoid((G - theta)/T)
    np.testing.assert_allclose(out[G], g, rtol=1e-5)
    np.testing.assert_allclose(out[q], qq, rtol=1e-5)
    np.testing.assert_allclose(out[m], d * m0 + (1 - d) * h.mean(0, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(out[y], qq * h + pv0, rtol=1e-5, atol=1e-6)


def test_onehot_and_guard():
    """ONEHOT writes on/off by label; GUARD(every, k) skips the next k instructions on trials
    that are not multiples of ``every``."""
    B, C = 4, 3
    Y = np.array([2, 0, 1, 2, 1, 1, 0, 0])
    for trial, runs in ((0, True), (1, False), (2, True)):
        p = Prog(B)
        t = p.buf(np.full((B, C), 7.0), True)
        p.op("GUARD", every=2, skip=1)
        p.op("ONEHOT", dst=t, on=1.0, off=-0.5)
        out = p.run(Y=Y, start=4 * (trial % 2), trial0=trial)
        if runs:
            want = np.where(np.eye(C)[Y[4 * (trial % 2):4 * (trial % 2) + 4]] > 0, 1.0, -0.5)
            np.testing.assert_array_equal(out[t], want)
        else:
            assert np.all(out[t] == 7.0)
