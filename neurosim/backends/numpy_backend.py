"""The reference backend: a plan's program run op by op on array-API arrays.

:func:`run_trials` executes the blocks of a compiled program for a run of minibatches (trials),
with the arguments and semantics of the compiled interpreter (:func:`neurosim.kernels.ops.
run_trials`, less its BLAS workspaces and thread count). Every instruction is decoded
generically from the op table (:data:`neurosim.optable.OPS`): each operand of the op's spec is
read from its column of ``prog`` or ``fprm`` and turned into what the op's reference function
``spec.ref(ctx, **operands)`` takes (a view of the arena for a buffer, ``None`` for an absent
optional buffer, an ``int`` for an integer, code, monitor or slot, the key's value for a key,
a ``float`` for a float). The runner itself knows only GUARD (it skips instructions), the
blocks, the minibatch rows and the monitors; everything an op computes is its ``ref``.

Arrays and namespaces
---------------------
``mem`` (the float32 arena) and ``out`` are arrays of one array-API namespace ``xp`` (numpy, or
e.g. CuPy for a GPU) and are updated in place. Buffers are views of ``mem``
(``reshape(mem[off:off + rows*cols], (rows, cols))``) and ops write through them with
``view[...] = value``; the namespace must therefore return *views* for basic slicing and for the
reshape of a contiguous 1-D slice, and ``__setitem__`` on such a view must write the underlying
array. numpy, CuPy and PyTorch do; immutable namespaces (JAX) cannot run this backend, and
:func:`run_trials` refuses a namespace that fails this check. ``X``, ``Y`` and ``T`` are
converted with ``xp.asarray`` once per call. The small control arrays (``bufs``, ``prog``,
``fprm``, ``blocks``, ``order``, ``keys``, ``scal``) are read on the host, and the monitor
arrays (``rec``, ``stamps``, ``rec_cnt``) and ``info`` are host numpy arrays written in place.

Importing this module compiles nothing (no numba on its path).
"""

from __future__ import annotations

import numpy as np

from ..errors import ValidationError
from ..optable import BY_CODE, OK, RefContext, astype, to_numpy

_VIEW_CHECKED: set = set()


def _namespace(xp, mem):
    """``xp``, or the array-API namespace of ``mem`` when ``xp`` is None."""
    if xp is None:
        from array_api_compat import array_namespace

        xp = array_namespace(mem)
    key = getattr(xp, "__name__", repr(xp))
    if key not in _VIEW_CHECKED:
        probe = xp.zeros(4, dtype=xp.float32)
        try:
            v = xp.reshape(probe[1:3], (1, 2))
            v[...] = 1.0
            v[:, 1:2] = 2.0
            ok = float(probe[1]) == 1.0 and float(probe[2]) == 2.0
        except (TypeError, ValueError, AttributeError, NotImplementedError):
            ok = False
        if not ok:
            raise ValidationError(
                "run_trials.xp", f"namespace {key} does not write through views of an array "
                "(slicing or reshape copies, or its arrays are immutable); the numpy backend "
                "updates the arena in place through views",
                "use numpy, CuPy or another namespace with view semantics")
        _VIEW_CHECKED.add(key)
    return xp


class _Program:
    """The program decoded for one call: per instruction, the op's spec and its operands
    (buffer operands as views of the arena for the minibatch size ``nb``)."""

    def __init__(self, xp, mem, bufs, prog, fprm, keys, scal, n_mon):
        self.xp, self.mem = xp, mem
        self.bufs = np.asarray(bufs, dtype=np.int64)
        self.prog = np.asarray(prog, dtype=np.int64)
        self.fprm = np.asarray(fprm, dtype=np.float64)
        self.keys, self.scal, self.n_mon = keys, scal, n_mon
        self._check_bufs()
        self.specs = [self._spec(i) for i in range(self.prog.shape[0])]
        self._decoded = {}

    def _check_bufs(self):
        b, n = self.bufs, self.mem.shape[0]
        if b.ndim != 2 or b.shape[1] < 4:
            raise ValidationError("run_trials.bufs", f"shape {b.shape}; expected (n, 4) rows "
                                  "(offset, rows, cols, batch flag)")
        for i in range(b.shape[0]):
            off, rows, cols, _ = (int(v) for v in b[i, :4])
            if off < 0 or rows < 0 or cols < 0 or off + rows * cols > n:
                raise ValidationError(
                    f"run_trials.bufs[{i}]", f"(offset {off}, rows {rows}, cols {cols}) lies "
                    f"outside the arena of {n} floats", "encode the plan again")

    def _spec(self, i):
        op = int(self.prog[i, 0])
        if not 0 <= op < len(BY_CODE):
            raise ValidationError(f"run_trials.prog[{i}, 0]", f"opcode {op} is not in the op "
                                  f"table (0..{len(BY_CODE) - 1})",
                                  "the program was encoded for another op table")
        return BY_CODE[op]

    def view(self, i, nb):
        off, rows, cols, batch = (int(v) for v in self.bufs[i, :4])
        r = nb if batch else rows
        return self.xp.reshape(self.mem[off:off + r * cols], (r, cols))

    def _index(self, i, o, v, n, what, none_ok):
        if (none_ok and v == -1) or 0 <= v < n:
            return v
        allowed = f"-1 or 0..{n - 1}" if none_ok else f"0..{n - 1}"
        raise ValidationError(f"run_trials.prog[{i}, {o.col}]",
                              f"operand {o.name} of {self.specs[i].name} is {what} {v}; "
                              f"expected {allowed}", "encode the plan again")

    def operands(self, i, nb):
        """``(spec, {operand: value})`` of instruction ``i`` for minibatch size ``nb``."""
        key = (i, nb)
        hit = self._decoded.get(key)
        if hit is not None:
            return hit
        spec, kw = self.specs[i], {}
        n_buf = self.bufs.shape[0]
        for o in spec.operands:
            if o.role == "float":
                kw[o.name] = float(self.fprm[i, o.col])
                continue
            v = int(self.prog[i, o.col])
            if o.is_buffer:
                v = self._index(i, o, v, n_buf, "buffer", o.role == "opt")
                kw[o.name] = None if v == -1 else self.view(v, nb)
            elif o.role == "key":
                kw[o.name] = int(self.keys[self._index(i, o, v, len(self.keys), "key", False)])
            elif o.role == "slot":
                kw[o.name] = self._index(i, o, v, len(self.scal), "slot", True)
            elif o.role == "mon":
                kw[o.name] = self._index(i, o, v, self.n_mon, "monitor", False)
            else:  # int, code
                kw[o.name] = v
        self._decoded[key] = hit = (spec, kw)
        return hit


def run_trials(xp, mem, bufs, prog, fprm, blocks, X, Y, T, order, start, n_trials, batch,
               trial0, step0, keys, scal, rec, stamps, rec_meta, rec_cnt, info, out):
    """Execute the program's blocks for ``n_trials`` consecutive minibatches; returns a status.

    The arguments and their meaning are those of the compiled interpreter (see the module
    docstring of :mod:`neurosim.optable` and the runner signature of engine core v2): trial
    ``j`` of the call is ``trial0 + j`` and takes rows ``order[start + j*batch:][:nb]`` of
    ``X``, ``Y`` and ``T`` (``nb = batch``, or fewer for a short last minibatch); every block
    runs ``repeat`` times, every repeat of a loop block first increments the step counter
    (from ``step0``). ``xp`` is the arrays' namespace (None: that of ``mem``). The first op
    that fails stops the call: its status is returned and ``info`` holds (instruction, repeat
    within the block, trial, block).
    """
    xp = _namespace(xp, mem)
    order = np.asarray(order, dtype=np.int64)
    blocks = np.asarray(blocks, dtype=np.int64)
    rec_meta = np.asarray(rec_meta, dtype=np.int64)
    keys, scal = np.asarray(keys), np.asarray(scal, dtype=np.float64)
    program = _Program(xp, mem, bufs, prog, fprm, keys, scal, rec_meta.shape[0])
    n_prog = program.prog.shape[0]
    for bl in range(blocks.shape[0]):
        i0, i1 = int(blocks[bl, 0]), int(blocks[bl, 1])
        if not 0 <= i0 <= i1 <= n_prog:
            raise ValidationError(f"run_trials.blocks[{bl}]", f"instructions {i0}..{i1}; "
                                  f"expected 0 <= first <= end <= {n_prog}")

    n_order = order.shape[0]
    data = _data(xp, X, Y, T, order, start, n_trials, batch)
    step = int(step0)
    ctx = RefContext(xp=xp, batch=int(batch), keys=keys, scalars=scal, out=out)
    mon = _Monitors(xp, rec, stamps, rec_meta, rec_cnt, ctx)
    ctx.due, ctx.record, ctx.record_stat = mon.due, mon.record, mon.record_stat

    for j in range(int(n_trials)):
        s0 = int(start) + j * int(batch)
        nb = int(batch)
        if n_order > 0 and s0 + nb > n_order:
            nb = n_order - s0
        trial = int(trial0) + j
        ctx.nb, ctx.trial, ctx.row0 = nb, trial, s0
        ctx.X, ctx.Y, ctx.T = data.rows(order[s0:s0 + nb]) if n_order > 0 else (None,) * 3
        for bl in range(blocks.shape[0]):
            i0, i1, reps, loop = (int(blocks[bl, c]) for c in (0, 1, 2, 4))
            for rep in range(reps):
                if loop:
                    step += 1
                ctx.step = step
                i = i0
                while i < i1:
                    spec, kw = program.operands(i, nb)
                    if spec.name == "GUARD":
                        if trial % kw["every"] != 0:
                            i += kw["skip"]
                    else:
                        st = spec.ref(ctx, **kw)
                        if st is not None and st != OK:
                            info[0], info[1], info[2], info[3] = i, rep, trial, bl
                            return int(st)
                    i += 1
    return OK


class _Data:
    """The call's data arrays in namespace ``xp``; ``rows(idx)`` gives a minibatch's rows of
    X (float32), Y (int64) and T (float32), None for an array that does not cover the rows
    this call reads (a placeholder such as a (1, 1) T when the plan has no targets)."""

    def __init__(self, xp, arrays, kinds, n_rows):
        self.xp = xp
        self.arrays = [xp.asarray(a) if a is not None and a.shape[0] >= n_rows else None
                       for a in arrays]
        self.kinds = kinds

    def rows(self, idx):
        xp = self.xp
        ix = xp.asarray(idx)
        res = []
        for a, dt in zip(self.arrays, self.kinds):
            if a is None:
                res.append(None)
                continue
            r = xp.take(a, ix, axis=0)
            res.append(r if r.dtype == dt else astype(xp, r, dt))
        return tuple(res)


def _data(xp, X, Y, T, order, start, n_trials, batch):
    seg = order[int(start):int(start) + int(n_trials) * int(batch)]
    n_rows = int(seg.max()) + 1 if seg.shape[0] else 0
    return _Data(xp, (X, Y, T), (xp.float32, xp.int64, xp.float32), n_rows)


class _Monitors:
    """RECORD and RECORD_STAT: the monitors' periods, capacities and record layout
    (``rec_meta`` rows: value offset, size, capacity, every, u0, u1, sample row, -1 for the
    batch mean or -2 for the whole buffer, stamp offset), exactly as the compiled kernel fills ``rec``, ``stamps`` and
    ``rec_cnt``."""

    def __init__(self, xp, rec, stamps, meta, cnt, ctx):
        self.xp, self.rec, self.stamps, self.meta, self.cnt, self.ctx = \
            xp, rec, stamps, meta, cnt, ctx

    def due(self, m, per):
        c = self.ctx.step if per == 0 else self.ctx.trial
        return c % int(self.meta[m, 3]) == 0 and int(self.cnt[m]) < int(self.meta[m, 2])

    def _stamp(self, m, k):
        s = int(self.meta[m, 7]) + 2 * k
        self.stamps[s] = self.ctx.trial
        self.stamps[s + 1] = self.ctx.step
        self.cnt[m] = k + 1

    def record(self, m, src):
        k = int(self.cnt[m])
        size, u0, srow = int(self.meta[m, 1]), int(self.meta[m, 4]), int(self.meta[m, 6])
        cols = src[:, u0:u0 + size]
        if srow == -2:  # the whole buffer, row-major (a weight matrix)
            vals = self.xp.reshape(src, (-1,))
        elif srow >= 0:
            vals = cols[srow, :]
        else:   # mean over the minibatch's rows
            vals = self.xp.sum(cols, axis=0) / float(src.shape[0])
        base = int(self.meta[m, 0]) + k * size
        self.rec[base:base + size] = to_numpy(vals)
        self._stamp(m, k)

    def record_stat(self, m, value):
        k = int(self.cnt[m])
        self.rec[int(self.meta[m, 0]) + k] = np.float32(value)
        self._stamp(m, k)
