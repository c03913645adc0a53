"""Backends: what runs a compiled plan's programs.

A backend executes :class:`~neurosim.compiler.Program` instructions over a simulator's arena,
with one entry point for training, inference and free runs (:meth:`run`). Two exist:

* ``"numba"`` (default): the compiled interpreter :func:`neurosim.kernels.ops.run_trials`, the
  whole time loop in machine code. One thread by default; ``threads > 1`` compiles (once,
  cached) a variant that splits large GEMMs and element-wise operations over numba's pool.
* ``"numpy"``: the reference backend :func:`neurosim.backends.numpy_backend.run_trials`, every
  operation executed by its reference semantics in the op table (:mod:`neurosim.optable`), op
  by op in Python with numpy/BLAS. Nothing is compiled, so it starts at once; it is the
  reference the compiled backend is tested against, and being written against the array API
  standard, the way to other array libraries (CuPy, PyTorch) later.

Adding a backend: a class with ``name`` and ``run(sim, program, blocks, X, Y, T, order, start,
n_trials, trial0, step0, rec, stamps, rec_meta, rec_cnt, info, out) -> status`` that implements
the runner semantics of docs/engine.md ("Backends"), registered in :data:`BACKENDS`.
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from .errors import ValidationError

_CONTROLLER = None


def _controller():
    global _CONTROLLER
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    return _CONTROLLER


class NumbaBackend:
    """The compiled interpreter (see the module docstring)."""

    name = "numba"

    def __init__(self, threads: int = 1):
        import numba

        self.threads = threads
        # numba's pool cannot exceed NUMBA_NUM_THREADS (the CPU count by default)
        self.nthreads = min(threads, numba.config.NUMBA_NUM_THREADS)
        self._ws_i = np.zeros(8, np.int32)
        self._ws_f = np.zeros(2, np.float32)
        self._par = np.zeros(1, np.int64) if self.nthreads > 1 else None

    def run(self, sim, program, blocks, X, Y, T, order, start, n_trials, trial0, step0, rec,
            stamps, rec_meta, rec_cnt, info, out):
        from .kernels import ops as K

        plan = sim.plan
        args = (sim.mem, plan.bufs, program.prog, program.fprm, blocks, X, Y, T, order,
                np.int64(start), np.int64(n_trials), np.int64(plan.batch), np.int64(trial0),
                np.int64(step0), plan.keys, sim.scal, rec, stamps, rec_meta, rec_cnt, info, out,
                self._ws_i, self._ws_f, np.int64(self.nthreads), self._par)
        with self._threads(), _announce_compile(K.run_trials, self._par is not None, args):
            return K.run_trials(*args)

    @contextlib.contextmanager
    def _threads(self):
        """One thread pool: with ``threads > 1`` the kernels split GEMMs and element-wise work
        over numba's pool and BLAS runs single-threaded inside each block (two pools, BLAS's and
        numba's, spinning on the same cores slowed training tenfold on a 2-core machine)."""
        import numba

        blas = 1 if self.nthreads > 1 else self.threads
        with _controller().limit(limits=blas, user_api="blas"):
            if self.nthreads > 1:
                numba.set_num_threads(self.nthreads)
            yield


class NumpyBackend:
    """The reference backend (see the module docstring)."""

    name = "numpy"

    def __init__(self, threads: int = 1, xp=None):
        self.threads = threads
        self.xp = xp

    def run(self, sim, program, blocks, X, Y, T, order, start, n_trials, trial0, step0, rec,
            stamps, rec_meta, rec_cnt, info, out):
        from .backends.numpy_backend import run_trials

        xp = self.xp
        if xp is None:
            import array_api_compat

            xp = array_api_compat.array_namespace(sim.mem)
        plan = sim.plan
        with _controller().limit(limits=self.threads, user_api="blas"):
            return run_trials(xp, sim.mem, plan.bufs, program.prog, program.fprm, blocks, X, Y,
                              T, order, int(start), int(n_trials), int(plan.batch), int(trial0),
                              int(step0), plan.keys, sim.scal, rec, stamps, rec_meta, rec_cnt,
                              info, out)


BACKENDS = {"numba": NumbaBackend, "numpy": NumpyBackend}


def get_backend(name, threads: int = 1):
    """A backend instance by name (or a backend object, returned as it is)."""
    if not isinstance(name, str):
        if hasattr(name, "run"):
            return name
        raise ValidationError("Simulator.backend", f"got {type(name).__name__} {name!r}, "
                              f"expected one of {sorted(BACKENDS)}.")
    cls = BACKENDS.get(name)
    if cls is None:
        raise ValidationError("Simulator.backend", f"got {name!r}, expected one of "
                              f"{sorted(BACKENDS)}.", "use 'numba' (compiled, default) or "
                              "'numpy' (reference, no compilation).")
    return cls(threads)


_ANNOUNCED = set()


@contextlib.contextmanager
def _announce_compile(dispatcher, parallel: bool, args=()):
    """Say on stderr when the kernels are compiled for the first time (an empty numba cache:
    a fresh install), and how long it took; compile the interpreter's callees on two cores
    first (:mod:`neurosim.kernels.warm`)."""
    key = (id(dispatcher), parallel)
    if key in _ANNOUNCED or dispatcher.signatures and not parallel:
        yield
        return
    _ANNOUNCED.add(key)
    cached = _cache_present(dispatcher)
    t0 = time.perf_counter()
    if not cached and _verbose():
        print(f"neurosim: compiling the simulation kernels{' (parallel variant)' if parallel else ''}"
              f" for the first time; this takes {'30-50' if parallel else '10-25'} s once, later "
              "runs load them from the cache ...", file=sys.stderr, flush=True)
    warmed = False
    if not cached and not parallel and args:
        from .kernels.warm import two_process_warmup

        warmed = two_process_warmup(args)
    # the callees are compiled (at numba's -O3); the interpreter's dispatch code gains nothing
    # from -O3 and is the one serial compile left
    with _first_compile_opt_level(warmed):
        yield
    if not cached and _verbose():
        print(f"neurosim: kernels compiled in {time.perf_counter() - t0:.0f} s (cached).",
              file=sys.stderr, flush=True)


#: LLVM optimisation level of the interpreter's own compile after the warm-up (numba's default
#: is 3); see docs/engine.md, "First run"
DISPATCH_OPT = 2


@contextlib.contextmanager
def _first_compile_opt_level(active: bool):
    """Compile what is compiled inside the block (``run_trials`` itself, its callees being
    compiled already) at LLVM -O``DISPATCH_OPT``, unless the user set ``NUMBA_OPT``. numba reads
    ``config.OPT`` for every module it optimises, so nothing compiled outside the block is
    affected; the previous value is restored afterwards."""
    import os

    if not active or "NUMBA_OPT" in os.environ:
        yield
        return
    from numba.core import config

    old = config.OPT
    config.OPT = config._OptLevel(DISPATCH_OPT)
    try:
        yield
    finally:
        config.OPT = old


def _cache_present(dispatcher) -> bool:
    """Whether numba's on-disk cache already holds this function (index file present)."""
    try:
        import os

        cache = dispatcher._cache
        return os.path.exists(cache._cache_file._index_path)
    except Exception:   # internal API; unknown means "say nothing"
        return True


def _verbose() -> bool:
    import os

    return os.environ.get("NEUROSIM_QUIET", "") in ("", "0")
