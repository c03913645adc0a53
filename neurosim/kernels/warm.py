"""Compile the interpreter's callees on two cores when the numba cache is empty.

numba compiles one function at a time (a global lock), and compiling :func:`ops.run_trials`
first compiles every function it calls, one after the other: on a fresh install most of the
first run is spent there. The callees do not depend on each other's code, so they can be
compiled in two processes: a child process compiles one group and writes it to numba's on-disk
cache while this process compiles the other group; once the child is done, compiling
``run_trials`` loads the child's functions from the cache instead of compiling them (numba caches
object code together with the bitcode it links into callers).

Each callee is compiled by *calling* it on empty arrays of exactly the types ``run_trials``
passes (derived from ``run_trials``' own arguments), so that the cached signatures are the ones
``run_trials`` asks for. If a type differs (say a new op passes a new type), nothing breaks:
``run_trials`` compiles what it does not find, as it did before.
tests/test_kernels_warm.py checks that, after the warm-up, ``run_trials`` compiles no callee.

The child is ``python -m neurosim.kernels.warm SPEC``, with the same environment (and so the
same ``NUMBA_CACHE_DIR``); ``SPEC`` (a JSON file) holds the dtype, shape rank, layout and
writability of ``run_trials``' array arguments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np

#: the run_trials arguments whose types the callees see (by position in run_trials' signature)
_ARGS = ("mem", "bufs", "prog", "fprm", "blocks", "X", "Y", "T", "order", "start", "n_trials",
         "batch", "trial0", "step0", "keys", "scal", "rec", "stamps", "rec_meta", "rec_cnt",
         "info", "out")


def spec_of(args) -> dict:
    """The array arguments of a ``run_trials`` call as {name: (dtype, ndim, layout, writeable)}
    ("C" or "F" or "A": what numba's type of the array records)."""
    out = {}
    for name, a in zip(_ARGS, args):
        if isinstance(a, np.ndarray):
            lay = "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "A"
            out[name] = (a.dtype.str, a.ndim, lay, bool(a.flags.writeable))
    return out


def _dummy(spec, name):
    """An array of the numba type ``run_trials`` sees for argument ``name``: empty when
    C-contiguous (every callee loops over a buffer view's rows, so it reads nothing of it),
    else small and F-ordered or strided, so that numba types its layout alike."""
    dt, ndim, lay, writeable = spec[name]
    if lay == "C":
        a = np.zeros((0,) * ndim, np.dtype(dt))
    elif lay == "F":
        a = np.zeros((2,) * ndim, np.dtype(dt), order="F")
    else:
        a = np.zeros((4,) * ndim, np.dtype(dt))[(slice(None, None, 2),) * ndim]
    if not writeable:
        a.setflags(write=False)
    return a


def _filled(spec, name, shape):
    """Zeros of ``shape`` with the dtype and writability of argument ``name``."""
    a = np.zeros(shape, np.dtype(spec[name][0]))
    if not spec[name][3]:
        a.setflags(write=False)
    return a


def _calls(spec):
    """{callee name: a function that calls it once with run_trials' argument types}."""
    from . import blas as B
    from . import ops as K

    V = np.zeros((0, 0), np.float32)          # a buffer view: float32, 2-D, C, writeable
    V12 = np.zeros((1, 2), np.float32)        # COUNT_CORRECT's stats row (written)
    i64, f64, f32 = np.int64(0), 0.0, np.float32(0.0)
    d = {k: _dummy(spec, k) for k in spec}
    key = d["keys"].dtype.type(0)
    Yv, order = d["Y"], d["order"]
    # _record returns before writing: counts[0] >= meta[0, 2] = 0
    rec_meta = _filled(spec, "rec_meta", (1, 8))
    rec_cnt = _filled(spec, "rec_cnt", (1,))
    bufs = _filled(spec, "bufs", (1, 4))
    mem = _dummy(spec, "mem")
    ws_i, ws_f = np.zeros(8, np.int32), np.zeros(2, np.float32)
    return {
        "_view": lambda: K._view(mem, bufs, i64, i64),
        "gemm_rm": lambda: B.gemm_rm(False, False, f64, V, V, f64, V, ws_i, ws_f),
        "softmax_rows": lambda: K.softmax_rows(V, V),
        "rms_normalized_f": lambda: K.rms_normalized_f(V, V, i64, f64),
        "_apply_pointwise": lambda: K._apply_pointwise(V, V, i64),
        "all_finite": lambda: K.all_finite(V),
        "_ew": lambda: K._ew(i64, i64, V, V, V, f64, f64),
        "euler": lambda: K.euler(V, V, i64, V, False, f64, V),
        "deriv_mul": lambda: K.deriv_mul(V, V, i64),
        "sgd_step": lambda: K.sgd_step(V, V, V, f64, f64, f64, i64, np.int64(1), f64),
        "dropout_mask": lambda: K.dropout_mask(V, 1.0, key, i64, i64),   # keep > 0
        "_gather": lambda: K._gather(V, d["X"], order, i64),
        "_onehot": lambda: K._onehot(V, Yv, order, i64, f32, f32),
        "_embed_label": lambda: K._embed_label(V, i64, V, i64, Yv, order, i64, f32, f32),
        "_wrong_label": lambda: K._wrong_label(V, key, i64, Yv, order, i64, i64, i64),
        "_sample_wrong": lambda: K._sample_wrong(V, V, key, Yv, order, i64, i64, i64),
        "gaussian_fill": lambda: K.gaussian_fill(V, f64, key, i64, i64),
        "_record": lambda: K._record(d["rec"], d["stamps"], rec_meta, rec_cnt, i64, V, i64, i64),
        "angle_deg": lambda: K.angle_deg(V, V, False),
        "_count_correct": lambda: K._count_correct(V, V12, Yv, order, i64),
        "_output": lambda: K._output(d["out"], V, i64),
    }


#: two groups of about equal compile time (measured on an empty cache, the child's start-up of
#: about 1.5 s included): this process compiles the first, the child the second
GROUPS = (("_view", "gemm_rm", "all_finite", "softmax_rows", "rms_normalized_f",
           "_apply_pointwise", "deriv_mul", "sgd_step", "dropout_mask", "_gather", "_onehot",
           "_embed_label", "_wrong_label", "_count_correct", "_output", "angle_deg",
           "gaussian_fill"),
          ("_ew", "euler", "_sample_wrong", "_record"))


def compile_group(spec: dict, group: int) -> None:
    calls = _calls(spec)
    for name in GROUPS[group]:
        calls[name]()


def two_process_warmup(args) -> bool:
    """Compile run_trials' callees in this process and a child at the same time (see the module
    docstring); returns whether a child ran. With one usable core it does nothing."""
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        ncpu = os.cpu_count() or 1
    if ncpu < 2 or os.environ.get("NEUROSIM_WARMUP", "1") == "0":
        return False
    spec = spec_of(args)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "spec.json")
        with open(path, "w") as f:
            json.dump(spec, f)
        child = subprocess.Popen([sys.executable, "-m", "neurosim.kernels.warm", path],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            compile_group(spec, 0)
        finally:
            child.wait()
    return True


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        compile_group({k: tuple(v) for k, v in json.load(f).items()}, 1)
