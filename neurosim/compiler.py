"""Turn a Circuit + Protocol (+ rules, optimizer, monitors) into a Plan of flat arrays.

The plan is data only: one float32 arena, a buffer table, and integer programs executed by
:func:`neurosim.kernels.ops.run_trials`. This module is the only one that knows both the
descriptions and the kernel opcodes.

Programs are made of *sections*, each becoming one block of the kernel: ``trial_start``,
then for each phase ``<phase>:pre`` (once), ``<phase>:loop`` (``duration/dt`` times, time mode
only) and ``<phase>:post`` (once), then ``trial_end``. Rules emit into sections through
:meth:`PlanBuilder.at`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np

from .circuit import Circuit, ErrorPopulation
from .errors import CompileError, ValidationError
from .expr import Buf, Expr, FPrime, emit_into
from .optable import IDENTITY, OPS, RMS_NORM, SOFTMAX, check_shapes, encode
from .monitors import Monitor
from .plasticity.base import builder_for
from .plasticity.optim import SGD
from .protocol import Protocol
from .rng import component_key, component_rng

_ALIGN = 16  # floats (64 bytes) between buffers

KINDS = ("weight", "optimizer", "state", "stimulus", "rule", "constant", "scratch", "stats")
"""Buffer kinds. ``weight``: projection weights and biases; ``optimizer``: momentum and update
buffers; ``state``: population rates, drives and dropout masks; ``stimulus``: clamped inputs;
``rule``: persistent state of a rule or monitor (learned factors, running means, counters);
``constant``: never written; ``scratch``: temporaries of one trial; ``stats``: counters read by
Python (training accuracy). :meth:`Simulator.reset` and checkpoints select by kind."""


@dataclass(frozen=True)
class Program:
    """Instructions + blocks of one kind of run (train, infer, free-run of a phase)."""

    prog: np.ndarray          # int64 (n, 8): opcode, integer operands (neurosim.optable)
    fprm: np.ndarray          # float64 (n, 6): float operands
    blocks: np.ndarray        # int64 (k, 5): start, end, repeat, phase index (-1), is-loop
    where: tuple              # per instruction: (section, description of the object)
    records: tuple = ()
    steps_per_trial: int = 0
    block_sections: tuple = ()

    def __post_init__(self):
        for a in (self.prog, self.fprm, self.blocks):
            a.setflags(write=False)


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a simulator needs, as immutable arrays plus name tables. The mutable state
    (the arena of every buffer, the scalar slots) belongs to each :class:`Simulator`; the plan
    holds its initial values (``init_mem``, ``scalar_init``)."""

    circuit: Circuit
    protocol: Protocol
    batch: int
    seed: int
    init_mem: np.ndarray
    bufs: np.ndarray
    buffer_index: dict
    buffer_kind: dict         # name -> one of KINDS
    keys: np.ndarray
    scalar_index: dict        # slot name -> index into scalar_init
    scalar_init: np.ndarray   # float64
    train: Program
    infer: Program
    free: dict               # phase -> Program (one time step of that phase, for Simulator.run)
    monitors: tuple
    monitor_meta: tuple      # per monitor: dict(buffer, size, per, every, units, sample, phase)
    rules: tuple
    optimizer: SGD | None
    plastic: tuple           # projection names updated by the optimizer
    stimuli: dict            # stimulus name -> buffer id
    output: str | None       # population whose argmax classifies
    error: str | None
    targets: str = "onehot"  # how stimulus t is made: one-hot of Y, or rows of T
    schedules: tuple = ()    # (slot name, callable(epoch) -> value) set by Simulator per epoch
    fuse: bool = True        # the compile argument (a saved simulator compiles its plan again)
    optimize: dict = field(default_factory=dict)   # pass name -> on/off (resolved, every pass)
    passes: dict = field(default_factory=dict)     # pass name -> rewrites made, per program

    def __post_init__(self):
        for a in (self.init_mem, self.bufs, self.keys, self.scalar_init):
            a.setflags(write=False)

    def view(self, name: str, nb: int | None = None, mem: np.ndarray | None = None) -> np.ndarray:
        """Buffer ``name`` of the arena ``mem`` (default: the plan's read-only initial values)."""
        i = self.buffer_index[name]
        return view_of(self.init_mem if mem is None else mem, self.bufs, i,
                       self.batch if nb is None else nb)

    def names_of_kind(self, *kinds) -> list:
        return [n for n, k in self.buffer_kind.items() if k in kinds]


def _as_expr(pb, e):
    if isinstance(e, Expr):
        return e
    raise CompileError(f"expected an array expression (neurosim.expr), got {type(e).__name__}")


def _handle_index(h, where) -> int:
    """Buffer index of a handle (or of a buffer index)."""
    if isinstance(h, Buf):
        return h.index
    if isinstance(h, (int, np.integer)) and not isinstance(h, bool):
        return int(h)
    raise CompileError(f"{where}: expected a buffer handle, got {type(h).__name__}")


def view_of(mem, bufs, i, nb):
    off, rows, cols, batch = (int(v) for v in bufs[i])
    if batch:
        rows = nb
    return mem[off:off + rows * cols].reshape(rows, cols)


@dataclass
class Instr:
    """One instruction before encoding: op spec, operands by column, tags for passes."""

    spec: object
    ints: list
    floats: list
    where: str
    tags: dict = field(default_factory=dict)

    def __getitem__(self, operand):
        o = self.spec.operand(operand)
        return self.floats[o.col] if o.is_float else self.ints[o.col - 1]

    def __setitem__(self, operand, value):
        o = self.spec.operand(operand)
        if o.is_float:
            self.floats[o.col] = float(value)
        else:
            self.ints[o.col - 1] = int(value)


@dataclass
class Every:
    """A structured conditional block: its body runs only on trials ``trial % every == 0``
    (encoded as a GUARD whose skip count is computed from the encoded body)."""

    every: int
    body: list
    where: str


class _ProgramBuilder:
    def __init__(self, sections):
        self.sections = {s: [] for s in sections}
        self.repeat = {s: 1 for s in sections}
        self.is_loop = {s: False for s in sections}
        self.phase_of = {s: -1 for s in sections}
        self.current = None
        self.target = None     # the list instructions go to (a section or an Every body)

    def append(self, item):
        if self.current is None:
            raise CompileError("internal: operation emitted outside a section")
        (self.target if self.target is not None else self.sections[self.current]).append(item)
        return item

    def instructions(self):
        """Every Instr, with its section, in program order (Every bodies included)."""
        def walk(items, sec):
            for it in items:
                if isinstance(it, Every):
                    yield from walk(it.body, sec)
                else:
                    yield sec, it
        for s, items in self.sections.items():
            yield from walk(items, s)

    def finish(self) -> Program:
        prog, fprm, blocks, where, names = [], [], [], [], []

        def encode(items, sec):
            for it in items:
                if isinstance(it, Every):
                    g = len(prog)
                    prog.append([OPS["GUARD"].code, it.every, 0, 0, 0, 0, 0, 0])
                    fprm.append([0.0] * 6)
                    where.append((sec, it.where))
                    encode(it.body, sec)
                    prog[g][2] = len(prog) - g - 1
                    continue
                prog.append([it.spec.code] + list(it.ints))
                fprm.append(list(it.floats))
                where.append((sec, it.where))

        for s, items in self.sections.items():
            start = len(prog)
            encode(items, s)
            if len(prog) > start or self.is_loop[s]:
                blocks.append((start, len(prog), self.repeat[s], self.phase_of[s],
                               int(self.is_loop[s])))
                names.append(s)
        steps = sum(b[2] for b in blocks if b[4])
        return Program(np.asarray(prog, np.int64).reshape(-1, 8),
                       np.asarray(fprm, np.float64).reshape(-1, 6),
                       np.asarray(blocks, np.int64).reshape(-1, 5), tuple(where), (),
                       steps, tuple(names))


class PlanBuilder:
    """The compile-time context handed to rule build functions.

    Rules use: :meth:`rate`, :meth:`drive`, :meth:`weight`, :meth:`grad`, :meth:`scratch`,
    :meth:`persistent`, the operations (:meth:`op`, and the shorthands :meth:`gemm`,
    :meth:`sub`, :meth:`mul`, :meth:`axpy`, :meth:`copy`, :meth:`scale`, :meth:`deriv`,
    :meth:`zero`), :meth:`at` to choose where the operations run and :meth:`every` for a block
    that runs every n-th trial. Rules written as array expressions use :mod:`neurosim.expr`
    (``pb.update(projection, expression)``), which lowers onto the same operations.
    """

    def __init__(self, circuit: Circuit, protocol: Protocol, batch: int, seed: int):
        self.circuit = circuit
        self.protocol = protocol
        self.batch = batch
        self.seed = seed
        self._bufs: list[tuple[str, int, int, bool]] = []
        self._index: dict[str, int] = {}
        self._kind: dict[str, str] = {}
        self._init: dict[str, np.ndarray] = {}
        self._grad_written: set[str] = set()
        self.grads: list[str] = []
        self._keys: list[np.uint64] = []
        self._key_index: dict[str, int] = {}
        self._scalars: dict[str, float] = {}
        self._schedules: dict[str, object] = {}
        self._pb: _ProgramBuilder | None = None
        self._tmp = 0

    # -- buffers --------------------------------------------------------------------------------
    def buffer(self, name, rows, cols, batch=False, init=None, kind="scratch") -> int:
        """Declare (or fetch) a named buffer; batch=True means ``rows`` = the minibatch size."""
        if kind not in KINDS:
            raise CompileError(f"buffer {name!r}: kind {kind!r} is not one of {KINDS}")
        if name in self._index:
            i = self._index[name]
            _, r, c, b = self._bufs[i]
            if (c != cols) or (b != batch) or (not batch and r != rows):
                raise CompileError(f"buffer {name!r} redeclared with another shape")
            return i
        self._index[name] = len(self._bufs)
        self._kind[name] = kind
        self._bufs.append((name, self.batch if batch else rows, cols, batch))
        if init is not None:
            self._init[name] = np.asarray(init, np.float32).reshape(
                self.batch if batch else rows, cols)
        return self._index[name]

    def shape(self, buf: int) -> tuple:
        """(rows, cols, batch-shaped) of buffer index ``buf``."""
        _, r, c, b = self._bufs[buf]
        return r, c, b

    def name_of(self, buf: int) -> str:
        return self._bufs[buf][0]

    def rate(self, pop: str, phase: str) -> int:
        """Buffer of population ``pop``'s rate in (and at the end of) ``phase``."""
        self._check_pop(pop)
        return self.buffer(f"{pop}.r@{phase}", 0, self.circuit.populations[pop].size, True,
                           kind="state")

    def drive(self, pop: str, phase: str) -> int:
        self._check_pop(pop)
        return self.buffer(f"{pop}.drive@{phase}", 0, self.circuit.populations[pop].size, True,
                           kind="state")

    def weight(self, proj: str) -> int:
        return self._index[f"{proj}.W"]

    def grad(self, proj: str) -> tuple[int, float]:
        """The summed update buffer of ``proj`` and the beta to use: 0.0 for the first write in
        the trial, 1.0 for later ones (so no zeroing pass is needed)."""
        self.require_projection(proj, "grad")
        post, pre = self.circuit.shape_of(self.circuit.projections[proj])
        i = self.buffer(f"{proj}.dW", post, pre, kind="optimizer")
        if proj not in self.grads:
            self.grads.append(proj)
        beta = 1.0 if proj in self._grad_written else 0.0
        self._grad_written.add(proj)
        return i, beta

    def scratch(self, name: str, cols: int, rows: int | None = None) -> int:
        """A scratch buffer; batch-shaped unless ``rows`` is given."""
        return self.buffer(f"scratch.{name}", rows or 0, cols, rows is None)

    def temp(self, rows: int, cols: int, batch: bool) -> int:
        """A fresh anonymous scratch buffer (for expression temporaries)."""
        self._tmp += 1
        return self.buffer(f"tmp.{self._tmp}", 0 if batch else rows, cols, batch)

    def persistent(self, name: str, rows: int, cols: int, init=None, kind="rule") -> int:
        """A buffer that keeps its value across trials (e.g. a learned feedback matrix)."""
        return self.buffer(name, rows, cols, False, init=init, kind=kind)

    def constant(self, value, rows: int = 1, cols: int = 1) -> int:
        """A constant buffer filled with ``value`` (shared by every user of the same value)."""
        return self.buffer(f"const.{float(value)!r}:{rows}x{cols}", rows, cols,
                           init=np.full((rows, cols), value, np.float32), kind="constant")

    def key(self, name: str) -> int:
        """Index of a counter-RNG key for component ``name`` (seeded from the root seed)."""
        if name not in self._key_index:
            self._key_index[name] = len(self._keys)
            self._keys.append(component_key(self.seed, name))
        return self._key_index[name]

    def slot(self, name: str, value: float = 0.0, schedule=None) -> int:
        """A scalar slot (float64, owned by the simulator): a value Python sets between chunks,
        such as a learning rate or an epoch gate. ``schedule(epoch) -> value``, if given, is
        evaluated by the simulator at the start of every epoch."""
        if name not in self._scalars:
            self._scalars[name] = float(value)
            if schedule is not None:
                self._schedules[name] = schedule
        return list(self._scalars).index(name)

    # -- sections -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def at(self, section: str):
        """Emit into ``section``: ``trial_start``, ``trial_end``, ``<phase>:pre``,
        ``<phase>:loop`` (every time step) or ``<phase>:post`` (phase end)."""
        if section not in self._pb.sections:
            raise CompileError(f"unknown section {section!r}; expected one of "
                               f"{list(self._pb.sections)}")
        prev, prev_t = self._pb.current, self._pb.target
        self._pb.current, self._pb.target = section, None
        try:
            yield
        finally:
            self._pb.current, self._pb.target = prev, prev_t

    @property
    def section(self) -> str | None:
        return self._pb.current

    @contextlib.contextmanager
    def every(self, n: int, where: str = ""):
        """Operations emitted inside run only on trials whose index is a multiple of ``n``."""
        blk = self._pb.append(Every(int(n), [], where))
        prev = self._pb.target
        self._pb.target = blk.body
        try:
            yield
        finally:
            self._pb.target = prev

    # -- operations -----------------------------------------------------------------------------
    def op(self, name: str, where: str = "", **operands) -> Instr:
        """Append operation ``name`` of the op table with its operands by name (defaults from
        the table); buffer operands are buffer indices (``-1`` for an absent optional one)."""
        return self._pb.append(self.instr(name, where, **operands))

    def instr(self, name: str, where: str = "", **operands) -> Instr:
        """The checked instruction :meth:`op` appends, without appending it (for passes that
        rewrite the op list)."""
        spec = OPS.get(name)
        if spec is None:
            raise CompileError(f"unknown op {name!r}; the op table has {sorted(OPS)}")
        try:
            row, floats = encode(name, **operands)
        except ValueError as e:
            raise CompileError(f"{e} ({where or 'no context'})") from None
        ints = row[1:]
        shp, named = {}, {}
        for o in spec.operands:
            v = ints[o.col - 1] if not o.is_float else 0
            if o.is_buffer and not (-1 if o.role == "opt" else 0) <= v < len(self._bufs):
                raise CompileError(f"op {name}: operand {o.name!r} = {v} is not a buffer "
                                   f"({where or 'no context'})")
            if o.is_buffer and v >= 0:
                shp[o.name] = self.shape(v)
            elif not o.is_float:
                named[o.name] = v
        bad = check_shapes(name, shp, named)
        if bad:
            raise CompileError(f"op {name} ({where or 'no context'}): {bad}")
        return Instr(spec, ints, floats, where)

    def gemm(self, c, a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, where=""):
        """``c = alpha op(a) @ op(b) + beta c`` (buffers are row-major (rows, cols))."""
        return self.op("GEMM", where, c=c, a=a, b=b, trans_a=int(trans_a), trans_b=int(trans_b),
                       alpha=alpha, beta=beta)

    def sub(self, dst, x, y, where=""):
        return self.op("SUB", where, dst=dst, x=x, y=y)

    def mul(self, dst, x, y, where=""):
        return self.op("MUL", where, dst=dst, x=x, y=y)

    def axpy(self, dst, src, scale=1.0, where=""):
        return self.op("AXPY", where, dst=dst, src=src, scale=scale)

    def copy(self, dst, src, where=""):
        return self.op("COPY", where, dst=dst, src=src)

    def scale(self, dst, s, where=""):
        return self.op("SCALE", where, dst=dst, s=s)

    def zero(self, dst, where=""):
        return self.op("ZERO", where, dst=dst)

    def deriv(self, dst, drive, pop, where=""):
        """``dst *= f'(drive)`` with the transfer function of population ``pop``."""
        code = self.circuit.populations[pop].code
        if code == SOFTMAX:
            raise CompileError(f"the derivative of softmax ({pop!r}) is not element-wise")
        if code >= RMS_NORM:
            raise CompileError(f"the derivative of the RMS-normalised population {pop!r} is not "
                               "element-wise")
        return self.op("DERIV", where, dst=dst, drive=drive, code=code)

    # -- array expressions (neurosim.expr) --------------------------------------------------------
    def r(self, pop: str, phase: str) -> Expr:
        """Handle of population ``pop``'s rate held at the end of ``phase`` (batch, size)."""
        return Buf(self, self.rate(pop, phase))

    def a(self, pop: str, phase: str) -> Expr:
        """Handle of population ``pop``'s drive (input) in ``phase``."""
        return Buf(self, self.drive(pop, phase))

    def W(self, proj: str) -> Expr:
        """Handle of projection ``proj``'s weights (post, pre)."""
        self.require_projection(proj, "PlanBuilder.W")
        return Buf(self, self.weight(proj))

    def fprime(self, pop: str, phase: str) -> Expr:
        """Handle of ``f'(drive)`` of ``pop`` in ``phase``, times the trial's dropout mask if the
        population has dropout (``h = mask * f(a)``). Use it as a factor: ``x * pb.fprime(...)``
        becomes an in-place derivative op."""
        self._check_pop(pop)
        code = self.circuit.populations[pop].code
        if code == SOFTMAX or code >= RMS_NORM:
            raise CompileError(f"the derivative of population {pop!r} is not element-wise "
                               "(softmax or RMS-normalised)")
        return FPrime(self, pop, phase)

    def stim(self, name: str) -> Expr:
        """Handle of stimulus ``name`` (``"x"``: the data rows, ``"t"``: the targets)."""
        if f"stim.{name}" not in self._index:
            raise CompileError(f"no stimulus {name!r} in the protocol")
        return Buf(self, self._index[f"stim.{name}"])

    def state(self, name: str, rows: int, cols: int, init=None, kind: str = "rule") -> Expr:
        """Handle of a persistent buffer (rule state kept across trials; reset by
        ``Simulator.reset(rule=True)``)."""
        return Buf(self, self.persistent(name, rows, cols, init=init, kind=kind))

    def const(self, value: float, rows: int = 1, cols: int = 1) -> Expr:
        return Buf(self, self.constant(value, rows, cols))

    def scalar(self, name: str, value: float = 0.0, schedule=None) -> Expr:
        """Handle of a scalar slot as a (1, 1) value, read where it is used (see :meth:`slot`)."""
        s = self.slot(name, value, schedule)
        buf = self.buffer(f"slot.{name}", 1, 1, kind="scratch")
        self.op("LOAD_SCALAR", f"scalar slot {name!r}", dst=buf, slot=s)
        return Buf(self, buf)

    def record_angle(self, monitor: int, a, b, transpose: bool = False) -> None:
        """Record, every ``every`` trials of monitor ``monitor``, the angle (degrees) between
        buffers (or handles) ``a`` and ``b`` (``b.T`` with ``transpose``)."""
        a = a.index if isinstance(a, Buf) else int(a)
        b = b.index if isinstance(b, Buf) else int(b)
        self.op("RECORD_STAT", f"monitor {monitor}", src=a, monitor=monitor, kind=1, other=b,
                transpose=int(transpose))

    def record_norm(self, monitor: int, a) -> None:
        """Record the Frobenius norm of buffer (or handle) ``a`` every ``every`` trials."""
        a = a.index if isinstance(a, Buf) else int(a)
        self.op("RECORD_STAT", f"monitor {monitor}", src=a, monitor=monitor, kind=0)

    def record(self, monitor: int, a, per: str = "trial") -> None:
        """Record the rows of buffer (or handle) ``a`` (the monitor's unit range, sample or
        batch mean) every ``every`` trials (``per="trial"``) or time steps (``"step"``)."""
        a = a.index if isinstance(a, Buf) else int(a)
        self.op("RECORD", f"monitor {monitor}", src=a, monitor=monitor,
                per=0 if per == "step" else 1)

    def let(self, expr, where: str = "") -> Expr:
        """Compute ``expr`` here, once, into a temporary; returns its handle (for a value used
        more than once, e.g. a backpropagated error that feeds both an update and the next
        layer)."""
        expr = _as_expr(self, expr)
        if isinstance(expr, Buf):
            return expr
        dst = self.temp(expr.rows, expr.cols, expr.batch)
        emit_into(dst, expr, where)
        return Buf(self, dst)

    def noise(self, stream: str, cols: int, dist: str = "gaussian", scale: float = 1.0,
              where: str = "") -> Expr:
        """Handle of this trial's fresh random draws, (batch, cols), from the counter-RNG stream
        ``stream`` (a component name of the root seed; counter ``trial*batch*cols + row*cols +
        unit``, the layout of dropout masks): ``dist="gaussian"``: ``scale N(0, 1)``
        (Box-Muller); ``"rademacher"``: ``+-scale`` with probability 1/2 each (one Bernoulli
        draw per entry)."""
        if dist not in ("gaussian", "rademacher"):
            raise CompileError(f"noise {stream!r}: dist {dist!r}, expected 'gaussian' or "
                               "'rademacher'")
        where = where or f"noise {stream!r}"
        dst = self.buffer(f"noise.{stream}", 0, cols, True)
        key = self.key(stream)
        if dist == "gaussian":
            self.op("GAUSS", where, dst=dst, key=key, scale=scale)
        else:
            self.op("MASK", where, dst=dst, key=key, keep=0.5)                # {0, 2}
            self.op("AFFINE", where, dst=dst, s=scale, c=-scale)              # +-scale
        return Buf(self, dst)

    def accumulate(self, target, expr, where: str = "") -> None:
        """Add ``expr`` to ``target`` in place (``target += expr``; a handle or a buffer index):
        matrix products accumulate in their GEMM (beta 1), other terms by AXPY. ``expr`` must
        not read ``target``."""
        self._write(target, expr, where, accumulate=True)

    def update(self, proj: str, expr, where: str | None = None) -> None:
        """Add ``expr`` (post x pre) to projection ``proj``'s summed update ``dW`` (descent
        direction: the optimizer applies ``W -= lr dW / B``). In a ``<phase>:loop`` section the
        update accumulates over the phase's time steps (``dW`` is zeroed before the loop)."""
        where = where or f"projection {proj!r}"
        expr = _as_expr(self, expr)
        post, pre = self.circuit.shape_of(self.require_projection(proj, where))
        if (expr.rows, expr.cols, expr.batch) != (post, pre, False):
            raise CompileError(f"{where}: update of shape {expr.shape}, expected the weights' "
                               f"(post, pre) = {(post, pre)}")
        first = proj not in self._grad_written
        dw, _ = self.grad(proj)
        sec = self._pb.current
        if first and sec.endswith(":loop"):
            with self.at(sec.replace(":loop", ":pre")):
                self.zero(dw, where)
            first = False
        emit_into(dw, expr, where, accumulate=not first)

    def assign(self, target, expr, where: str = "") -> None:
        """Write ``expr`` into ``target`` (a handle of a buffer, or a buffer index)."""
        self._write(target, expr, where, accumulate=False)

    def _write(self, target, expr, where, accumulate):
        dst = target.index if isinstance(target, Buf) else int(target)
        expr = _as_expr(self, expr)
        r, c, b = self.shape(dst)
        if (expr.cols, expr.batch) != (c, b) or (not b and expr.rows != r):
            raise CompileError(f"{where}: cannot {'add' if accumulate else 'assign'} "
                               f"{expr.shape} to buffer {self.name_of(dst)!r} of shape {(r, c)}")
        emit_into(dst, expr, where or self.name_of(dst), accumulate=accumulate)

    def mask(self, pop: str) -> Expr:
        """Handle of population ``pop``'s dropout mask of the trial (batch, size): 0 or
        1 / keep; training programs only."""
        self._check_pop(pop)
        p = self.circuit.populations[pop]
        if not p.dropout > 0:
            raise CompileError(f"population {pop!r} has no dropout, hence no mask")
        return Buf(self, self.buffer(f"{pop}.mask", 0, p.size, True, kind="state"))

    def batch_size(self) -> Expr:
        """Handle of the run-time minibatch size ``nb`` as a (1, 1) value, computed here (the
        last minibatch of an epoch may have fewer rows than the compiled batch B). For a
        per-sample term that reads no row of the minibatch, summed over it: a weight decay
        ``decay * (pb.W(p) * pb.batch_size())``, which the optimizer's ``dW / nb`` turns into
        exactly ``decay * W`` per sample."""
        ones = self.buffer("batch_size.ones", 0, 1, True)
        dst = self.temp(1, 1, False)
        self.op("FILL", "minibatch size", dst=ones, src=self.constant(1.0))
        self.op("COL_SUM", "minibatch size", dst=dst, src=ones, scale=1.0)
        return Buf(self, dst)

    # -- data and label operations (no expression form: they read the trial's labels or draw
    #    from the counter RNG) --------------------------------------------------------------------
    def onehot(self, name: str, size: int, on: float = 1.0, off: float = 0.0) -> Expr:
        """Handle of a (batch, ``size``) scratch buffer ``name`` set here to the one-hot code of
        the trial's integer labels (``on`` at the label, ``off`` elsewhere)."""
        buf = self.scratch(name, size)
        self.op("ONEHOT", f"one-hot labels {name!r}", dst=buf, on=on, off=off)
        return Buf(self, buf)

    def embed_label(self, target, ncls: int, on: float, off: float = 0.0, labels=None,
                    where: str = "") -> None:
        """Overwrite the first ``ncls`` columns of ``target`` (a handle of a batch buffer, e.g. a
        stimulus) with a one-hot code: ``on`` in the column of the trial's label, or, with
        ``labels`` (a (batch, 1) handle of class indices, e.g. from :meth:`wrong_labels`), of
        that label; ``off`` in the other ``ncls - 1`` columns."""
        dst = _handle_index(target, "embed_label.target")
        r, c, b = self.shape(dst)
        if not b or c < ncls:
            raise CompileError(f"embed_label: target {self.name_of(dst)!r} of shape {(r, c)} "
                               f"cannot hold {ncls} label columns (expected a batch buffer)")
        lab = -1 if labels is None else _handle_index(labels, "embed_label.labels")
        if lab >= 0 and self.shape(lab)[1:] != (1, True):
            raise CompileError(f"embed_label: labels {self.name_of(lab)!r} must be a (batch, 1) "
                               "buffer of class indices")
        self.op("EMBED_LABEL", where or f"label of {self.name_of(dst)!r}", dst=dst,
                source=0 if lab < 0 else 1, labels=lab, ncls=ncls, on=on, off=off)

    def wrong_labels(self, name: str, ncls: int, stream: str, probs=None) -> Expr:
        """Handle of a (batch, 1) scratch buffer ``name`` set here to a class index other than
        each row's label: uniform over the ``ncls - 1`` others or, with ``probs`` (a (batch,
        ncls) handle, e.g. a softmax population's rates), in proportion to its entries of the
        other classes (uniform if they carry no mass). The uniform numbers come from the
        counter-RNG stream ``stream`` (row b of trial t: counter ``t * batch + b``)."""
        buf = self.scratch(name, 1)
        where = f"wrong labels {name!r}"
        if probs is None:
            self.op("WRONG_LABEL", where, dst=buf, key=self.key(stream), ncls=ncls)
        else:
            p = _handle_index(probs, "wrong_labels.probs")
            if self.shape(p)[1:] != (ncls, True):
                raise CompileError(f"wrong_labels: probs {self.name_of(p)!r} must be a (batch, "
                                   f"{ncls}) buffer")
            self.op("SAMPLE_WRONG", where, dst=buf, probs=p, key=self.key(stream))
        return Buf(self, buf)

    def count_correct(self, out) -> None:
        """Add to the plan's training-accuracy counter (``stats.correct``: correct rows, rows)
        the rows of ``out`` (a (batch, classes) handle) whose argmax is the trial's label."""
        self.op("COUNT_CORRECT", "training accuracy", out=_handle_index(out, "count_correct.out"),
                stats=self.buffer("stats.correct", 1, 2, kind="stats"))

    # -- checks used by rules -------------------------------------------------------------------
    def require_phase(self, name, where):
        if name not in [p.name for p in self.protocol.phases]:
            raise ValidationError(where, f"no phase {name!r} in the protocol "
                                  f"(has {[p.name for p in self.protocol.phases]}).")

    def require_error(self, name, where) -> ErrorPopulation:
        pop = self.circuit.populations.get(name)
        if not isinstance(pop, ErrorPopulation):
            raise ValidationError(where, f"{name!r} is not an error population of circuit "
                                  f"{self.circuit.name!r}.", "add one with Circuit.error().")
        return pop

    def require_projection(self, name, where):
        proj = self.circuit.projections.get(name)
        if proj is None:
            raise ValidationError(where, f"no projection {name!r} (has "
                                  f"{sorted(self.circuit.projections)}).")
        return proj

    def _check_pop(self, pop):
        if pop not in self.circuit.populations:
            raise ValidationError("PlanBuilder", f"no population {pop!r}.")


# ---------------------------------------------------------------------------------------------
def _active(proj, phase) -> bool:
    if proj.phases is not None and phase.name not in proj.phases:
        return False
    if phase.gates is not None and proj.name not in phase.gates:
        return False
    return True


def _topo(circuit: Circuit, phase, members: list[str]) -> list[str]:
    """Order ``members`` so that every population comes after the live sources it reads."""
    deps = {m: set() for m in members}
    for m in members:
        pop = circuit.populations[m]
        if isinstance(pop, ErrorPopulation):
            if pop.output in deps:
                deps[m].add(pop.output)
            continue
        for p in circuit.incoming(m):
            if _active(p, phase) and p.pre_phase is None and p.pre_population in deps:
                deps[m].add(p.pre_population)
    order, state = [], {}

    def visit(n, path):
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = path[path.index(n):] + [n]
            raise CompileError(
                f"Phase({phase.name!r}): cycle {' -> '.join(reversed(cyc))} among instantaneous "
                "populations. Steady mode evaluates each population once in dependency order, "
                "and tau = 0 populations have no state to break a loop. Give a population in "
                "the loop tau > 0 and run in time mode, or make a projection read a held trace "
                "('pop@phase').")
        state[n] = 1
        for d in sorted(deps[n]):
            visit(d, path + [n])
        state[n] = 2
        order.append(n)

    for m in members:
        visit(m, [])
    return order


def compile_plan(circuit: Circuit, protocol: Protocol, *, rules=(), optimizer: SGD | None = None,
                 monitors=(), batch: int = 1, seed: int = 0, output: str | None = None,
                 fuse: bool = True, targets: str = "onehot", optimize=None) -> Plan:
    """Compile descriptions into a :class:`Plan`.

    Parameters
    ----------
    circuit, protocol
    rules : plasticity rule descriptions
    optimizer : SGD, required if rules are given
    monitors : Monitor specs
    batch : int
        Maximum minibatch size B (the circuit is run as B independent copies).
    seed : int
        Root seed; weight initialisation, dropout and shuffling use streams derived from it.
    output : str, optional
        Population classified by argmax in :meth:`Simulator.predict` (default: the output of
        the error population, if any).
    targets : ``"onehot"`` or ``"values"``
        How the stimulus ``t`` is made from the data: one-hot of the integer labels ``Y``
        (classification), or rows of the float target matrix ``T`` (regression).
    optimize : dict, optional
        The optimisation passes over the op list, by name, on (True, the default for each) or
        off (False); see :data:`PASSES`: ``"drive_reuse"`` (:func:`reuse_drives`: a drive that
        equals an earlier drive plus low-rank terms is computed from it) and
        ``"fuse_momentum"`` (:func:`fuse_momentum`). Each is exact up to float32 rounding; turn
        one off to compare, or for bit-identical results with plans compiled without it.
    fuse : bool
        ``fuse=False`` is ``optimize={"fuse_momentum": False}`` (kept for compatibility): fold
        the momentum update into the GEMM that produces a projection's update when that is exact
        (one GEMM writes dW, no weight decay): ``V = m V + (lr/B) post^T pre`` in one BLAS call,
        saving two passes over the weight-sized arrays. False keeps dW explicit.
    """
    if not isinstance(circuit, Circuit):
        raise ValidationError("compile.circuit", f"got {type(circuit).__name__}, expected Circuit.")
    if not isinstance(protocol, Protocol):
        raise ValidationError("compile.protocol", f"got {type(protocol).__name__}, expected "
                              "Protocol.")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValidationError("compile.batch", f"got {batch!r}, expected an integer >= 1.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValidationError("compile.seed", f"got {seed!r}, expected an integer >= 0.")
    if output is not None and not isinstance(output, str):
        raise ValidationError("compile.output", f"got {type(output).__name__} {output!r}, "
                              "expected a population name.")
    from .monitors import AbstractMonitor

    for i, m in enumerate(monitors):
        if not isinstance(m, (Monitor, AbstractMonitor)):
            raise ValidationError(f"compile.monitors[{i}]", f"got {type(m).__name__} {m!r:.40}, "
                                  "expected a Monitor.")
    if targets not in ("onehot", "values"):
        raise ValidationError("compile.targets", f"got {targets!r}, expected 'onehot' or 'values'.")
    if rules and optimizer is None:
        raise ValidationError("compile.optimizer", "rules were given but no optimizer.",
                              "pass optimizer=SGD(lr=...).")
    opts = resolve_optimize(optimize, fuse)
    _validate_references(circuit, protocol)
    pb = PlanBuilder(circuit, protocol, batch, int(seed))
    pb.optimizer = optimizer  # rules that emit their own optimizer steps read it
    phases = protocol.phases
    time_mode = protocol.mode == "time"
    errors = [p for p in circuit.populations.values() if isinstance(p, ErrorPopulation)]
    err = errors[0] if errors else None
    if output is None and err is not None:
        output = err.output
    if output is not None and output not in circuit.populations:
        raise ValidationError("compile.output", f"no population {output!r}.")
    pb._output = output

    # -- fixed buffers: weights, velocities, biases, masks, stimuli -------------------------------
    for proj in circuit.projections.values():
        shape = circuit.shape_of(proj)
        try:
            w = proj.init.sample(shape, component_rng(seed, f"init:{proj.name}"))
        except ValidationError as e:
            raise ValidationError(f"Projection({proj.name!r}).init", e.message, e.hint) from None
        if w.shape != shape or w.dtype != np.float32:
            raise CompileError(f"Projection({proj.name!r}).init returned {w.shape} {w.dtype}, "
                               f"expected {shape} float32.")
        pb.buffer(f"{proj.name}.W", *shape, init=w, kind="weight")
    for pop in circuit.populations.values():
        if pop.bias is not None:
            pb.buffer(f"{pop.name}.bias", 1, pop.size, init=pop.bias.reshape(1, -1),
                      kind="weight")
        if pop.dropout > 0:
            pb.buffer(f"{pop.name}.mask", 0, pop.size, True, kind="state")
        if time_mode and pop.tau > 0 and pop.code == SOFTMAX:
            pb.buffer(f"{pop.name}.tmp", 0, pop.size, True)
    if optimizer is not None:
        pb.slot("lr", optimizer.lr)
    stimuli = {}
    for ph in phases:
        for pop, stim in ph.clamp.items():
            _stim(pb, stimuli, stim, circuit.populations[pop].size, f"Phase({ph.name!r}).clamp")
    for e in errors:
        _stim(pb, stimuli, e.target, e.size, f"ErrorPopulation({e.name!r}).target")
    pb._stimuli = stimuli

    def build(kind: str, only_phase=None) -> Program:
        sel = [p for p in phases if only_phase is None or p.name == only_phase]
        sections = ["trial_start"]
        for ph in sel:
            sections += [f"{ph.name}:pre", f"{ph.name}:loop", f"{ph.name}:post"]
        sections.append("trial_end")
        prb = _ProgramBuilder(sections)
        pb._pb = prb
        pb._grad_written = set()
        training = kind == "train"
        for idx, ph in enumerate(phases):
            for s in ("pre", "loop", "post"):
                if f"{ph.name}:{s}" in prb.sections:
                    prb.phase_of[f"{ph.name}:{s}"] = idx
        # trial start: masks (training only) and stimuli from the data
        with pb.at("trial_start"):
            if training:
                for pop in circuit.populations.values():
                    if pop.dropout > 0:
                        pb.op("MASK", f"population {pop.name!r} (dropout)",
                              dst=pb._index[f"{pop.name}.mask"], key=pb.key(f"dropout:{pop.name}"),
                              keep=1.0 - pop.dropout)
            if kind in ("train", "infer"):
                if "x" in stimuli:
                    pb.op("GATHER", "stimulus 'x'", dst=stimuli["x"], source=0)
                if "t" in stimuli:
                    if targets == "onehot":
                        pb.op("ONEHOT", "stimulus 't'", dst=stimuli["t"])
                    else:
                        pb.op("GATHER", "stimulus 't'", dst=stimuli["t"], source=1)
        prev = None
        for ph in sel:
            _build_phase(pb, prb, ph, prev if kind != "free" else None, training, kind)
            prev = ph
        if training:
            for rule in rules:
                builder_for(rule)(pb, rule)
            if kind == "train":
                # custom monitors (objects with build(pb, index) -> meta dict) see the rules'
                # updates before the optimizer applies them
                pb._custom_meta = {mi: mon.build(pb, mi) for mi, mon in enumerate(monitors)
                                   if hasattr(mon, "build")}
            if pb.grads:
                with pb.at("trial_end"):
                    for name in pb.grads:
                        proj = circuit.projections[name]
                        if not proj.plastic:
                            raise ValidationError(f"{getattr(rules[0], 'name', 'rule')}.projections",
                                                  f"projection {name!r} is fixed (plastic=False) "
                                                  "but a rule updates it.")
                        emit_sgd(pb, name, pb._index[f"{name}.dW"], optimizer)
        if kind == "train":
            _emit_monitors(pb, prb, monitors, time_mode)
        elif kind == "free" and time_mode:
            _emit_monitors(pb, prb, monitors, time_mode, only_phase=only_phase)
        if kind == "infer" and output is not None:
            with pb.at("trial_end"):
                pb.op("OUTPUT", "prediction", src=pb.rate(output, protocol.inference_phase))
        label = kind if only_phase is None or kind == "infer" else f"{kind}:{only_phase}"
        if opts["drive_reuse"]:
            passes["drive_reuse"][label] = reuse_drives(prb, pb)
        if opts["fuse_momentum"] and optimizer is not None:
            passes["fuse_momentum"][label] = fuse_momentum(prb, pb, optimizer)
        return prb.finish()

    passes = {name: {} for name in PASSES}
    train = build("train")
    plastic = list(pb.grads)
    infer = build("infer", protocol.inference_phase)
    free = {ph.name: build("free", ph.name) for ph in phases} if time_mode else {}

    # -- arena ---------------------------------------------------------------------------------
    offs, total = [], 0
    for name, rows, cols, b in pb._bufs:
        offs.append(total)
        total += -(-rows * cols // _ALIGN) * _ALIGN
    mem = np.zeros(max(total, 1), np.float32)
    bufs = np.array([(o, r, c, int(b)) for o, (_, r, c, b) in zip(offs, pb._bufs)],
                    np.int64).reshape(-1, 4)
    for name in (optimizer.lr_scale if optimizer is not None else {}):
        if name not in plastic:
            raise ValidationError("SGD.lr_scale", f"projection {name!r} is not updated by any rule "
                                  f"(updated: {plastic}).")
    for name, arr in pb._init.items():
        view_of(mem, bufs, pb._index[name], batch)[...] = arr
    scal = np.array(list(pb._scalars.values()) or [0.0], np.float64)
    return Plan(circuit, protocol, batch, int(seed), mem, bufs, dict(pb._index), dict(pb._kind),
                np.array(pb._keys if pb._keys else [0], np.uint64),
                {n: i for i, n in enumerate(pb._scalars)}, scal, train, infer, free,
                tuple(monitors), tuple(getattr(pb, "_monitor_meta", [])), tuple(rules), optimizer,
                tuple(plastic), stimuli, output, err.name if err else None, targets,
                tuple(pb._schedules.items()), fuse=opts["fuse_momentum"], optimize=opts,
                passes=passes)


PASSES = ("drive_reuse", "fuse_momentum")
"""The optimisation passes over the op list, in the order they run (``compile_plan(optimize=
{name: False})`` turns one off)."""


def resolve_optimize(optimize=None, fuse: bool = True) -> dict:
    """``compile_plan``'s ``optimize`` (and legacy ``fuse``) as ``{pass: bool}`` for every pass
    of :data:`PASSES` (unnamed passes on)."""
    if optimize is None:
        optimize = {}
    if not isinstance(optimize, dict):
        raise ValidationError("compile.optimize", f"got {type(optimize).__name__} "
                              f"{optimize!r:.60}, expected a dict of pass names to true/false.",
                              f"e.g. optimize={{'drive_reuse': False}}; passes: {list(PASSES)}.")
    for k, v in optimize.items():
        if k not in PASSES:
            import difflib
            close = difflib.get_close_matches(str(k), PASSES, n=1)
            raise ValidationError("compile.optimize", f"no pass {k!r}; the passes are "
                                  f"{list(PASSES)}.",
                                  f"did you mean {close[0]!r}?" if close else None)
        if not isinstance(v, (bool, np.bool_)):
            raise ValidationError(f"compile.optimize[{k!r}]", f"got {v!r}, expected True or "
                                  "False.")
    if not isinstance(fuse, (bool, np.bool_)):
        raise ValidationError("compile.fuse", f"got {fuse!r}, expected True or False.")
    if not fuse and optimize.get("fuse_momentum", False):
        raise ValidationError("compile.fuse", "fuse=False contradicts optimize={"
                              "'fuse_momentum': True}.", "give only optimize.")
    out = {name: bool(optimize.get(name, True)) for name in PASSES}
    if not fuse:
        out["fuse_momentum"] = False
    return out


def emit_sgd(pb, name, dw, optimizer, *, weight_decay=None, velocity=None, where=None):
    """Emit the optimizer step of projection ``name`` on its summed update buffer ``dw`` (the
    learning rate from the scalar slot ``"lr"`` times ``SGD.lr_scale``); ``velocity``: the name
    of the momentum buffer (default ``<name>.V``; rules that step several times per trial give
    each step its own)."""
    post, pre = pb.circuit.shape_of(pb.circuit.projections[name])
    v = pb.buffer(velocity or f"{name}.V", post, pre, kind="optimizer")
    wd = optimizer.weight_decay if weight_decay is None else weight_decay
    return pb.op("SGD", where or f"projection {name!r}", W=pb.weight(name), V=v, dW=dw,
                 style=optimizer.style_code, lr_slot=pb.slot("lr", optimizer.lr),
                 lr_scale=optimizer.scale_of(name), momentum=optimizer.momentum, wd=wd,
                 limit=optimizer.max_weight)


def fuse_momentum(prb, pb, optimizer) -> int:
    """Fusion pass over the op list (before encoding): for every SGD step whose update ``dW`` is
    written only by GEMMs in the same section before it (the first overwriting, the others
    accumulating) and read by nothing else, rewrite those GEMMs into ``V = m V + alpha sum_i
    post_i^T pre_i`` with ``alpha = lr/nb`` (reference style) or ``1/nb`` (torch) at run time
    and the SGD step into ``W -= V`` (``W -= lr V``), so that no pass over dW remains: PEPITA's
    single product, the two terms of a contrastive rule. Exact up to float32 rounding (bitwise
    for a single GEMM). Not applied with weight decay inside the step. Returns the number of
    steps fused."""
    gemm, sgd_code = OPS["GEMM"].code, OPS["SGD"].code
    instrs = list(prb.instructions())
    order = {id(it): k for k, (_, it) in enumerate(instrs)}
    fused = 0
    for sec, sgd in instrs:
        if sgd.spec.code != sgd_code or sgd["style"] >= 2 or sgd["wd"] != 0.0:
            continue
        dw, v = sgd["dW"], sgd["V"]
        hits = [(s, it) for s, it in instrs if it is not sgd and dw in _buffers_of(it)]
        ok = bool(hits) and all(
            s == sec and it.spec.code == gemm and it["c"] == dw and dw not in (it["a"], it["b"])
            and it["fused"] == 0 and it["beta"] == (0.0 if j == 0 else 1.0)
            and order[id(it)] < order[id(sgd)] for j, (s, it) in enumerate(hits))
        if not ok:
            continue
        reference = optimizer.style == "reference"
        for j, (_, it) in enumerate(hits):
            it["c"] = v
            it["beta"] = optimizer.momentum if j == 0 else 1.0
            it["fused"] = 1
            it["lr_slot"] = sgd["lr_slot"] if reference else -1   # torch: factor 1/nb only
            it["lr_scale"] = sgd["lr_scale"]
        sgd["dW"] = v      # dW is not read any more
        sgd["style"] = sgd["style"] + 2
        fused += 1
    return fused


def _buffers_of(it) -> list:
    return [it.ints[o.col - 1] for o in it.spec.operands if o.is_buffer]


def _written_by(it) -> list:
    """Buffers instruction ``it`` writes (operands of role out or inout)."""
    return [it.ints[o.col - 1] for o in it.spec.operands
            if o.role in ("out", "inout") and it.ints[o.col - 1] >= 0]


# -- linear drive reuse ---------------------------------------------------------------------------
_CHAIN_MAX = 2      # at most x @ op(W1) @ op(W2) is tracked
_REUSE_GAIN = 0.5   # rewrite only if it needs at most this fraction of the GEMM's multiply-adds


class _Linear:
    """Abstract interpretation of one trial's program for :func:`reuse_drives`.

    Every buffer has a version, incremented at each write. Where it is known, a buffer's content
    is a *linear form*: ``{atom: coefficient}``, an atom being ``("v", buf, ver)`` (the content of
    ``buf`` at version ``ver``) or ``("p", buf, ver, chain)`` (that content times ``op(W_1)
    op(W_2)...``, ``chain`` = ((W buffer, its version, transposed), ...)). Only ops whose
    result is exactly linear in their operands make forms (ZERO, COPY, AXPY, SCALE, ADD and SUB
    of equal shapes, the identity TRANSFER without a mask, an unfused GEMM of a batch buffer by a
    fixed-size one); any other write makes the content opaque (an atom of its own)."""

    def __init__(self, pb):
        self.pb = pb
        self.ver: dict = {}
        self.form: dict = {}

    def v(self, b):
        return self.ver.get(b, 0)

    def val(self, b) -> dict:
        f = self.form.get(b)
        return f if f is not None else {("v", b, self.v(b)): 1.0}

    def write(self, b, form=None):
        self.ver[b] = self.v(b) + 1
        if form is None:
            self.form.pop(b, None)
        else:
            self.form[b] = form

    def current(self, atom) -> bool:
        """Whether every buffer the atom reads still holds the version it names."""
        if self.v(atom[1]) != atom[2]:
            return False
        return atom[0] == "v" or all(self.v(w) == wv for w, wv, _ in atom[3])

    def gemm_form(self, it):
        """The linear form of GEMM ``it``'s product ``alpha op(a) @ op(b)``, or None."""
        pb = self.pb
        a, b, c = it["a"], it["b"], it["c"]
        if it["fused"] or it["trans_a"] or c in (a, b):
            return None
        if not pb.shape(a)[2] or pb.shape(b)[2]:
            return None                     # only (batch rows) @ op(fixed matrix)
        out = {}
        link = (b, self.v(b), int(it["trans_b"]))
        for atom, x in self.val(a).items():
            if atom[0] == "v":
                new = ("p", atom[1], atom[2], (link,))
            elif len(atom[3]) < _CHAIN_MAX:
                new = ("p", atom[1], atom[2], atom[3] + (link,))
            else:
                return None
            out[new] = out.get(new, 0.0) + it["alpha"] * x
        return out

    def step(self, it):
        """Update the state for instruction ``it`` (after it ran)."""
        pb, name = self.pb, it.spec.name
        if name == "ZERO":
            return self.write(it["dst"], {})
        if name == "COPY":
            return self.write(it["dst"], self.val(it["src"]))
        if name == "AXPY":
            return self.write(it["dst"], _lin((1.0, self.val(it["dst"])),
                                              (it["scale"], self.val(it["src"]))))
        if name == "SCALE":
            return self.write(it["dst"], _lin((it["s"], self.val(it["dst"]))))
        if name in ("ADD", "SUB") and pb.shape(it["x"]) == pb.shape(it["y"]) == \
                pb.shape(it["dst"]):
            return self.write(it["dst"], _lin((1.0, self.val(it["x"])),
                                              (1.0 if name == "ADD" else -1.0,
                                               self.val(it["y"]))))
        if name == "TRANSFER" and it["code"] == IDENTITY and it["mask"] < 0:
            return self.write(it["r"], self.val(it["drive"]))
        if name == "GEMM":
            prod = self.gemm_form(it)
            if prod is not None and it["beta"] != 0.0:
                prod = _lin((it["beta"], self.val(it["c"])), (1.0, prod))
            return self.write(it["c"], prod)
        for b in _written_by(it):
            self.write(b)


def _lin(*terms) -> dict:
    """sum_i c_i f_i of linear forms (coefficients that cancel exactly are dropped)."""
    out: dict = {}
    for c, f in terms:
        for atom, x in f.items():
            out[atom] = out.get(atom, 0.0) + c * x
    return {a: x for a, x in out.items() if x != 0.0}


def _reuse_plan(st, it):
    """For GEMM ``it`` (``c = alpha op(a) @ op(b)``, beta 0): the cheapest buffer ``d`` whose
    current content differs from the product by low-rank terms ``s e op(W_1) op(W_2)`` computable
    from current buffers, as ``(d, {(W_1, t_1, W_2, t_2): [(e, s), ...]})``; None if there is no
    such buffer or the rewrite would not save at least half of the multiply-adds."""
    pb = st.pb
    c = it["c"]
    if it["beta"] != 0.0:
        return None
    target = st.gemm_form(it)
    if not target:
        return None
    rows, n, _ = pb.shape(c)
    inner = pb.shape(it["a"])[1]
    batch = pb.batch
    full = batch * inner * n
    best = None
    for d, form in st.form.items():
        if d == c or pb.shape(d) != pb.shape(c):
            continue
        rest = _lin((1.0, target), (-1.0, form))
        if len(rest) >= len(target):
            continue                         # d shares no term with the product
        groups: dict = {}
        ok = True
        for atom, x in rest.items():
            if atom[0] != "p" or len(atom[3]) != 2 or \
                    not all(st.v(w) == wv for w, wv, _ in atom[3]):
                ok = False
                break
            (w1, _, t1), (w2, _, t2) = atom[3]
            groups.setdefault((w1, t1, w2, t2), {})[("v", atom[1], atom[2])] = x
        if not ok:
            continue
        # each left factor, once sums held by a buffer are folded back into it, must be a batch
        # buffer that still holds the version the form names
        groups = {k: _refold(st, terms) for k, terms in groups.items()}
        if not all(st.v(e) == ve and pb.shape(e)[2] for terms in groups.values()
                   for e, ve, _ in terms):
            continue
        cost = batch * n                     # the copy
        for (w1, t1, w2, t2), terms in groups.items():
            r1, c1, _ = pb.shape(w1)
            k, mid = (c1, r1) if t1 else (r1, c1)
            cost += k * mid * n + sum(batch * pb.shape(e)[1] * n for e, _, _ in terms)
        if cost <= _REUSE_GAIN * full and (best is None or cost < best[0]):
            best = (cost, d, groups)
    return None if best is None else best[1:]


def _refold(st, terms: dict) -> list:
    """``[(e, version, s), ...]`` for the left factors ``{("v", buf, ver): s}`` of one group of
    terms, where a sum of them that a buffer holds now (``output - target``: the error
    population), or a multiple of a value since overwritten in place (``e *= s``), is replaced
    by that buffer, so that it is multiplied once and from its current version."""
    terms = dict(terms)
    folded = True
    while folded:
        folded = False
        for b, form in sorted(st.form.items(), key=lambda kv: -len(kv[1])):
            if not form or len(form) > len(terms) or \
                    not all(a[0] == "v" and a in terms for a in form):
                continue
            if len(form) == 1 and st.current(next(iter(form))):
                continue                     # a copy of a buffer that still holds it
            a0 = next(iter(form))
            s = terms[a0] / form[a0]
            if all(terms[a] == s * x for a, x in form.items()):
                for a in form:
                    del terms[a]
                key = ("v", b, st.v(b))
                terms[key] = terms.get(key, 0.0) + s
                folded = True
                break
    return [(a[1], a[2], x) for a, x in terms.items()]


def reuse_drives(prb, pb) -> int:
    """Linear drive reuse, a pass over the op list (before encoding): a GEMM ``c = alpha
    op(a) @ op(b)`` whose product equals the current content of another buffer ``d`` plus
    low-rank terms ``s e op(W_1) op(W_2)`` (``e`` with few columns) becomes ``c = d`` plus, per
    term, ``P = op(W_1) op(W_2)`` and ``c += s e P``. PEPITA's modulated pass: the first layer's
    input is ``x + F e`` (a linear, instantaneous input population), so its drive
    ``W1 (x + F e)`` is the clean drive ``W1 x`` plus ``e (W1 F)^T``: a 1024x784x10 and a
    64x10x1024 product instead of a 64x784x1024 one.

    The conditions are read from the op list, not assumed: the forms are built only through
    exactly linear ops (:class:`_Linear`), every buffer a term reads (``e``, the weights) and the
    reused ``d`` must still hold the versions the forms name (no write in between: an optimizer
    step on the weights, a recomputed error, an overwritten clean drive all stop it), and a
    loop section or conditional block forgets what it writes. Exact up to float32 rounding.
    Returns the number of GEMMs rewritten."""
    st = _Linear(pb)
    done = 0

    def run(items):
        nonlocal done
        out = []
        for it in items:
            if isinstance(it, Every):
                it.body[:] = run(it.body)
                for b in _written_in(it.body):   # the body may not have run
                    st.write(b)
                out.append(it)
                continue
            plan = _reuse_plan(st, it) if it.spec.name == "GEMM" else None
            if plan is None:
                st.step(it)
                out.append(it)
                continue
            d, groups = plan
            target = st.gemm_form(it)
            c, where = it["c"], f"{it.where} (drive reuse)"
            out.append(pb.instr("COPY", where, dst=c, src=d))
            for (w1, t1, w2, t2), terms in groups.items():
                r1, c1, _ = pb.shape(w1)
                r2, c2, _ = pb.shape(w2)
                p = pb.buffer(f"scratch.reuse.{pb.name_of(w1)}.{pb.name_of(w2)}",
                              c1 if t1 else r1, r2 if t2 else c2)
                out.append(pb.instr("GEMM", where, c=p, a=w1, b=w2, trans_a=t1, trans_b=t2))
                st.write(p)
                for e, _, s in terms:
                    out.append(pb.instr("GEMM", where, c=c, a=e, b=p, alpha=s, beta=1.0))
            st.write(c, target)
            done += 1
        return out

    for sec, items in prb.sections.items():
        loop = prb.is_loop[sec]
        if loop:        # at each step the buffers the loop writes hold the previous step's values
            for b in _written_in(items):
                st.write(b)
        items[:] = run(items)
        if loop:        # and after it, the last step's (or, with no step, the entry values)
            for b in _written_in(items):
                st.write(b)
    return done


def _written_in(items) -> set:
    out = set()
    for it in items:
        if isinstance(it, Every):
            out |= _written_in(it.body)
        else:
            out.update(_written_by(it))
    return out


def _stim(pb, stimuli, name, size, where):
    if name in stimuli:
        have = pb._bufs[stimuli[name]][2]
        if have != size:
            raise ValidationError(where, f"stimulus {name!r} feeds populations of sizes {have} "
                                  f"and {size}; one stimulus must have one size.")
        return
    stimuli[name] = pb.buffer(f"stim.{name}", 0, size, True)


def _validate_references(circuit, protocol):
    names = [p.name for p in protocol.phases]
    for proj in circuit.projections.values():
        where = f"Projection({proj.name!r})"
        if proj.phases is not None:
            for ph in proj.phases:
                if ph not in names:
                    raise ValidationError(f"{where}.phases", f"no phase {ph!r} in the protocol "
                                          f"(has {names}).")
        if proj.pre_phase is not None:
            if proj.pre_phase not in names:
                raise ValidationError(f"{where}.pre", f"{proj.pre!r} reads phase "
                                      f"{proj.pre_phase!r}, which is not in the protocol {names}.")
            i = names.index(proj.pre_phase)
            for ph in protocol.phases[: i + 1]:
                if _active(proj, ph):
                    raise ValidationError(
                        f"{where}.pre", f"{proj.pre!r} is read in phase {ph.name!r}, which is "
                        f"not after {proj.pre_phase!r}; a held trace exists only after its phase.",
                        f"restrict the projection with phases=({names[-1]!r},).")
    for ph in protocol.phases:
        for pop in ph.clamp:
            if pop not in circuit.populations:
                raise ValidationError(f"Phase({ph.name!r}).clamp", f"no population {pop!r} "
                                      f"(has {sorted(circuit.populations)}).")
            if isinstance(circuit.populations[pop], ErrorPopulation):
                raise ValidationError(f"Phase({ph.name!r}).clamp", f"{pop!r} is an error "
                                      "population; its target is set by ErrorPopulation.target.")
        for g in ph.gates or ():
            if g not in circuit.projections:
                raise ValidationError(f"Phase({ph.name!r}).gates", f"no projection {g!r} "
                                      f"(has {sorted(circuit.projections)}).")


def _emit_drive(pb, ph, pop, stim_of):
    """Emit the drive of ``pop`` in ``ph``: active projections + stimulus + bias."""
    circuit = pb.circuit
    where = f"population {pop.name!r}"
    d = pb.drive(pop.name, ph.name)
    beta = 0.0
    for proj in circuit.incoming(pop.name):
        if not _active(proj, ph):
            continue
        src = pb.rate(proj.pre_population, proj.pre_phase or ph.name)
        pb.gemm(d, src, pb.weight(proj.name), trans_b=True, alpha=proj.gain, beta=beta,
                where=f"projection {proj.name!r}")
        beta = 1.0
    stim = stim_of.get(pop.name)
    if stim is not None:
        if beta == 0.0:
            pb.copy(d, pb._index[f"stim.{stim}"], where)
        else:
            pb.axpy(d, pb._index[f"stim.{stim}"], 1.0, where)
        beta = 1.0
    if beta == 0.0:
        pb.zero(d, where)
    if pop.bias is not None:
        pb.op("BIAS", where, dst=d, bias=pb._index[f"{pop.name}.bias"])
    return d


def _emit_rate(pb, ph, pop, d, dynamic, training, alpha):
    """Emit the rate update of ``pop`` from its drive ``d`` (Euler step or instantaneous)."""
    r = pb.rate(pop.name, ph.name)
    where = f"population {pop.name!r}"
    mask = pb._index[f"{pop.name}.mask"] if (training and pop.dropout > 0) else -1
    if dynamic:
        tmp = pb._index.get(f"{pop.name}.tmp", -1)
        pb.op("EULER", where, r=r, drive=d, code=pop.code, mask=mask, tmp=tmp, alpha=alpha)
    else:
        pb.op("TRANSFER", where, r=r, drive=d, code=pop.code, mask=mask)


def _eval_inst(pb, ph, pop, training, stim_of):
    """Evaluate an instantaneous population (or an error population) in ``ph``."""
    if isinstance(pop, ErrorPopulation):
        pb.sub(pb.rate(pop.name, ph.name), pb.rate(pop.output, ph.name),
               pb._index[f"stim.{pop.target}"], f"population {pop.name!r}")
        return
    _emit_rate(pb, ph, pop, _emit_drive(pb, ph, pop, stim_of), False, training, 0.0)


def _alpha(protocol, pop):
    """Per-step relaxation factor: dt/tau (Euler) or 1 - exp(-dt/tau) (exponential Euler)."""
    a = (protocol.dt / pop.tau if protocol.method == "euler"
         else -math.expm1(-protocol.dt / pop.tau))
    if a > 1.0:
        raise ValidationError("Protocol.dt", f"dt = {protocol.dt} s exceeds tau = {pop.tau} s of "
                              f"population {pop.name!r}; forward Euler overshoots for dt > tau.",
                              "lower dt or use method='exp_euler'.")
    return a


def _invariant(circuit, ph, dyn_names, stim_of) -> set:
    """Populations whose rate cannot change during the phase's time loop: instantaneous ones
    fed only by stimuli, held traces and other invariant populations."""
    inv = set()
    changed = True
    while changed:
        changed = False
        for name, pop in circuit.populations.items():
            if name in inv or name in dyn_names:
                continue
            if isinstance(pop, ErrorPopulation):
                ok = pop.output in inv
            else:
                ok = all(p.pre_phase is not None or p.pre_population in inv
                         for p in circuit.incoming(name) if _active(p, ph))
            if ok:
                inv.add(name)
                changed = True
    return inv


def _build_phase(pb, prb, ph, prev, training, kind):
    circuit, protocol = pb.circuit, pb.protocol
    time_mode = protocol.mode == "time"
    pops = list(circuit.populations.values())
    dyn = [p for p in pops if time_mode and p.tau > 0]
    inst = [p.name for p in pops if p not in dyn]
    inst_order = _topo(circuit, ph, inst)
    stim_of = dict(ph.clamp)
    reset = ph.reset if ph.reset is not None else prev is None
    inv = _invariant(circuit, ph, {p.name for p in dyn}, stim_of) if time_mode else set()
    # loop-invariant drives of dynamic populations are computed once, before the loop
    dyn_const = [p for p in dyn if all(q.pre_phase is not None or q.pre_population in inv
                                       for q in circuit.incoming(p.name) if _active(q, ph))]
    if time_mode:
        # a free-run program holds one step; Simulator.run sets the number of repeats
        prb.repeat[f"{ph.name}:loop"] = 1 if kind == "free" else protocol.n_steps(ph)
        prb.is_loop[f"{ph.name}:loop"] = True
    with pb.at(f"{ph.name}:pre"):
        if kind != "free":  # a free run continues the phase's own state
            # reset=False on the first phase continues from the previous trial's last phase
            src = prev if prev is not None else (protocol.phases[-1] if kind == "train" else ph)
            for p in dyn:
                r = pb.rate(p.name, ph.name)
                if reset:
                    pb.zero(r, f"population {p.name!r} (reset)")
                elif src.name != ph.name:
                    pb.copy(r, pb.rate(p.name, src.name), f"population {p.name!r} (continue)")
        for name in inst_order:
            _eval_inst(pb, ph, circuit.populations[name], training, stim_of)
        for p in dyn_const:
            _emit_drive(pb, ph, p, stim_of)
    if time_mode:
        with pb.at(f"{ph.name}:loop"):
            # explicit (Jacobi) step: every drive from the state at t, then every rate to t + dt,
            # then the instantaneous populations at t + dt (invariant ones are not recomputed)
            drives = [pb.drive(p.name, ph.name) if p in dyn_const else
                      _emit_drive(pb, ph, p, stim_of) for p in dyn]
            for p, d in zip(dyn, drives):
                _emit_rate(pb, ph, p, d, True, training, _alpha(protocol, p))
            for name in inst_order:
                if name not in inv:
                    _eval_inst(pb, ph, circuit.populations[name], training, stim_of)
    if training and kind == "train" and ph.name == protocol.inference_phase and \
            pb._output is not None and "t" in pb._stimuli:
        with pb.at(f"{ph.name}:post"):
            pb.op("COUNT_CORRECT", "training accuracy", out=pb.rate(pb._output, ph.name),
                  stats=pb.buffer("stats.correct", 1, 2, kind="stats"))


def _emit_monitors(pb, prb, monitors, time_mode, only_phase=None):
    """Emit RECORD / RECORD_STAT instructions and describe each monitor's layout.

    With ``only_phase`` (free-run programs) only step monitors of that phase are emitted."""
    circuit, protocol = pb.circuit, pb.protocol
    meta = []
    for mi, mon in enumerate(monitors):
        if hasattr(mon, "build"):  # custom monitor, emitted before the optimizer step
            if only_phase is None:
                meta.append(pb._custom_meta[mi])
            continue
        where = f"Monitor({mon.target!r})"
        if only_phase is not None:
            if (mon.target.endswith((".r", ".drive")) and (mon.per or "step") == "step"
                    and (mon.phase or protocol.phases[0].name) == only_phase):
                obj, var = mon.target.rsplit(".", 1)
                buf = pb.rate(obj, only_phase) if var == "r" else pb.drive(obj, only_phase)
                with pb.at(f"{only_phase}:loop"):
                    pb.op("RECORD", where, src=buf, monitor=mi, per=0)
            continue
        if mon.target.startswith("angle:"):
            fname = mon.target.split(":", 1)[1]
            proj = pb.require_projection(fname, f"{where}.target")
            chain = _forward_chain(circuit, proj)
            with pb.at("trial_end"):
                prod = pb.weight(chain[0])
                with pb.every(mon.every, where):
                    for k, name in enumerate(chain[1:]):
                        post, _ = circuit.shape_of(circuit.projections[name])
                        nxt = pb.persistent(f"monitor{mi}.chain{k}", post,
                                            circuit.shape_of(circuit.projections[chain[0]])[1])
                        pb.gemm(nxt, pb.weight(name), prod, where=where)
                        prod = nxt
                pb.op("RECORD_STAT", where, src=pb.weight(fname), monitor=mi, kind=1, other=prod,
                      transpose=1)
            meta.append(dict(key=mon.key, kind="stat", size=1, per="trial", every=mon.every))
            continue
        obj, var = mon.target.rsplit(".", 1)
        if obj in circuit.projections and var in ("w", "dw"):
            meta.append(_emit_weight_monitor(pb, mon, mi, obj, var, where))
            continue
        if mon.synapses is not None:
            raise ValidationError(f"{where}.synapses", "synapses select entries of a weight "
                                  "matrix: use them with a 'projection.w' or 'projection.dw' "
                                  "target.")
        if obj in circuit.projections:
            if var not in ("norm", "update_norm"):
                raise ValidationError(f"{where}.target", f"projection variable {var!r} unknown; "
                                      "expected 'w', 'dw', 'norm' or 'update_norm'.")
            if var == "update_norm" and obj not in pb.grads:
                raise ValidationError(f"{where}.target", f"projection {obj!r} is not updated by "
                                      "any rule, so it has no update to measure.")
            buf = pb.weight(obj) if var == "norm" else pb._index[f"{obj}.V"]
            with pb.at("trial_end"):
                pb.op("RECORD_STAT", where, src=buf, monitor=mi, kind=0)
            meta.append(dict(key=mon.key, kind="stat", size=1, per="trial", every=mon.every,
                             update_scale=(var == "update_norm"),
                             lr_scale=pb.optimizer.scale_of(obj) if pb.optimizer else 1.0))
            continue
        if obj not in circuit.populations:
            raise ValidationError(f"{where}.target", f"no population or projection {obj!r} "
                                  f"(populations {sorted(circuit.populations)}, projections "
                                  f"{sorted(circuit.projections)}).")
        if var not in ("r", "drive"):
            raise ValidationError(f"{where}.target", f"population variable {var!r} unknown; "
                                  "expected 'r' or 'drive'.")
        if var == "drive" and isinstance(circuit.populations[obj], ErrorPopulation):
            raise ValidationError(f"{where}.target", f"error population {obj!r} has no drive.")
        phase = mon.phase or protocol.phases[0].name
        pb.require_phase(phase, f"{where}.phase")
        size = circuit.populations[obj].size
        u0, u1 = mon.units or (0, size)
        if u1 > size:
            raise ValidationError(f"{where}.units", f"({u0}, {u1}) exceeds population size {size}.")
        if mon.sample != "mean" and mon.sample >= pb.batch:
            raise ValidationError(f"{where}.sample", f"row {mon.sample} but the batch has "
                                  f"{pb.batch} rows.")
        per = mon.per or ("step" if time_mode else "trial")
        if per == "step" and not time_mode:
            raise ValidationError(f"{where}.per", "'step' needs a time-mode protocol.")
        buf = pb.rate(obj, phase) if var == "r" else pb.drive(obj, phase)
        section = f"{phase}:loop" if per == "step" else f"{phase}:post"
        with pb.at(section):
            pb.op("RECORD", where, src=buf, monitor=mi, per=0 if per == "step" else 1)
        meta.append(dict(key=mon.key, kind="var", size=u1 - u0, per=per, every=mon.every,
                         u0=u0, sample=-1 if mon.sample == "mean" else mon.sample, phase=phase))
    if only_phase is None:
        pb._monitor_meta = meta


def _emit_weight_monitor(pb, mon, mi, proj, var, where) -> dict:
    """``proj.w`` (the weights after the trial's optimizer step) or ``proj.dw`` (the rules' summed
    update of the trial, descent direction, before the optimizer's lr/B and momentum), the whole
    matrix or the chosen ``synapses`` (post, pre), every ``every`` trials."""
    post, pre = pb.circuit.shape_of(pb.circuit.projections[proj])
    if var == "dw":
        if proj not in pb.grads:
            raise ValidationError(f"{where}.target", f"projection {proj!r} has no end-of-trial "
                                  f"update (updated: {list(pb.grads)}).",
                                  "record its weights ('.w') instead.")
        buf = pb._index[f"{proj}.dW"]     # read here, so the momentum step is not fused into it
    else:
        buf = pb.weight(proj)
    if (mon.per or "trial") != "trial":
        raise ValidationError(f"{where}.per", "weights are recorded per trial.")
    with pb.at("trial_end"):
        if mon.synapses is None:
            pb.op("RECORD", where, src=buf, monitor=mi, per=1)
            return dict(key=mon.key, kind="var", size=post * pre, per="trial",
                        every=mon.every, u0=0, sample=-2, shape=(post, pre))
        flat = []
        for k, (i, j) in enumerate(mon.synapses):
            if not (0 <= i < post and 0 <= j < pre):
                raise ValidationError(f"{where}.synapses[{k}]", f"({i}, {j}) is outside the "
                                      f"(post, pre) = ({post}, {pre}) matrix of {proj!r}.")
            flat.append(i * pre + j)
        if post * pre > 1 << 24:
            raise ValidationError(f"{where}.synapses", f"{proj!r} has {post * pre} entries; "
                                  "flat indices above 2^24 are not exact in float32.")
        idx = pb.buffer(f"monitor{mi}.synapses", 1, len(flat), init=[flat], kind="constant")
        picked = pb.buffer(f"monitor{mi}.picked", 1, len(flat))
        with pb.every(mon.every, where):
            pb.op("PICK", where, dst=picked, src=buf, idx=idx)
        pb.op("RECORD", where, src=picked, monitor=mi, per=1)
    return dict(key=mon.key, kind="var", size=len(flat), per="trial", every=mon.every, u0=0,
                sample=0, synapses=tuple(mon.synapses))


def _forward_chain(circuit, fb):
    """Feedforward projections from the feedback projection's target to the error's output."""
    err = circuit.populations[fb.pre_population]
    target = err.output if isinstance(err, ErrorPopulation) else err.name
    chain, pop = [], fb.post
    seen = set()
    while pop != target:
        nxt = [p for p in circuit.projections.values()
               if p.role == "feedforward" and p.pre_population == pop and p.pre_phase is None]
        if len(nxt) != 1 or pop in seen:
            raise ValidationError(f"Monitor('angle:{fb.name}').target", "the angle needs a single "
                                  f"feedforward chain from {fb.post!r} to {target!r}.")
        seen.add(pop)
        chain.append(nxt[0].name)
        pop = nxt[0].post
    if not chain:
        raise ValidationError(f"Monitor('angle:{fb.name}').target", f"{fb.name!r} projects into "
                              f"{fb.post!r}, the output itself: there is no feedforward chain to "
                              "compare it with.")
    return chain
