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
from .kernels import ops as K
from .monitors import Monitor
from .plasticity.base import builder_for
from .plasticity.optim import SGD
from .protocol import Protocol
from .rng import component_key, component_rng

_ALIGN = 16  # floats (64 bytes) between buffers


@dataclass
class Program:
    """Instructions + blocks of one kind of run (train, infer, free-run of a phase)."""

    prog: np.ndarray          # int64 (n, 8): op, a, b, c, d, e, f, g
    fprm: np.ndarray          # float64 (n, 6)
    blocks: np.ndarray        # int64 (k, 5): start, end, repeat, phase index (-1), is-loop
    where: list               # per instruction: (section, description of the object)
    lr_slots: list = field(default_factory=list)   # instruction indices whose fprm[:,0] is lr
    records: list = field(default_factory=list)    # (monitor index, section) recorded here
    steps_per_trial: int = 0
    block_sections: list = field(default_factory=list)
    lr2_slots: list = field(default_factory=list)  # fused GEMMs: fprm[:, 2] is lr


@dataclass
class Plan:
    """Everything the simulator needs, as arrays plus name tables."""

    circuit: Circuit
    protocol: Protocol
    batch: int
    seed: int
    mem: np.ndarray
    bufs: np.ndarray
    buffer_index: dict
    keys: np.ndarray
    train: Program
    infer: Program
    free: dict               # phase -> Program (one time step of that phase, for Simulator.run)
    monitors: list
    monitor_meta: list       # per monitor: dict(buffer, size, per, every, units, sample, phase)
    rules: list
    optimizer: SGD | None
    plastic: list            # projection names updated by the optimizer
    stimuli: dict            # stimulus name -> buffer id
    output: str | None       # population whose argmax classifies
    error: str | None
    targets: str = "onehot"  # how stimulus t is made: one-hot of Y, or rows of T

    def view(self, name: str, nb: int | None = None) -> np.ndarray:
        i = self.buffer_index[name]
        off, rows, cols, batch = (int(v) for v in self.bufs[i])
        if batch:
            rows = self.batch if nb is None else nb
        return self.mem[off:off + rows * cols].reshape(rows, cols)


class _ProgramBuilder:
    def __init__(self, sections):
        self.sections = {s: [] for s in sections}
        self.repeat = {s: 1 for s in sections}
        self.is_loop = {s: False for s in sections}
        self.phase_of = {s: -1 for s in sections}
        self.current = None

    def emit(self, op, ints=(), floats=(), where=""):
        if self.current is None:
            raise CompileError("internal: operation emitted outside a section")
        iv = [op] + list(ints) + [0] * (7 - len(ints))
        fv = list(floats) + [0.0] * (6 - len(floats))
        self.sections[self.current].append((iv, fv, where))
        return len(self.sections[self.current]) - 1

    def finish(self) -> Program:
        prog, fprm, blocks, where, lr_slots, records = [], [], [], [], [], []
        names, lr2_slots = [], []
        for s, items in self.sections.items():
            start = len(prog)
            for iv, fv, w in items:
                if isinstance(w, tuple) and w and w[0] == "lr":
                    lr_slots.append(len(prog))
                    w = w[1]
                elif isinstance(w, tuple) and w and w[0] == "lr2":
                    lr2_slots.append(len(prog))
                    w = w[1]
                prog.append(iv)
                fprm.append(fv)
                where.append((s, w))
            if len(prog) > start or self.is_loop[s]:
                blocks.append((start, len(prog), self.repeat[s], self.phase_of[s],
                               int(self.is_loop[s])))
                names.append(s)
        steps = sum(b[2] for b in blocks if b[4])
        return Program(np.asarray(prog, np.int64).reshape(-1, 8),
                       np.asarray(fprm, np.float64).reshape(-1, 6),
                       np.asarray(blocks, np.int64).reshape(-1, 5), where, lr_slots, records,
                       steps, names, lr2_slots)


class PlanBuilder:
    """The compile-time context handed to rule build functions.

    Rules use: :meth:`rate`, :meth:`drive`, :meth:`weight`, :meth:`grad`, :meth:`scratch`,
    :meth:`persistent`, the operations (:meth:`gemm`, :meth:`sub`, :meth:`mul`, :meth:`axpy`,
    :meth:`copy`, :meth:`scale`, :meth:`deriv`, :meth:`zero`), and :meth:`at` to choose where
    the operations run.
    """

    def __init__(self, circuit: Circuit, protocol: Protocol, batch: int, seed: int):
        self.circuit = circuit
        self.protocol = protocol
        self.batch = batch
        self.seed = seed
        self._bufs: list[tuple[str, int, int, bool]] = []
        self._index: dict[str, int] = {}
        self._init: dict[str, np.ndarray] = {}
        self._grad_written: set[str] = set()
        self.grads: list[str] = []
        self._keys: list[np.uint64] = []
        self._key_index: dict[str, int] = {}
        self._pb: _ProgramBuilder | None = None

    # -- buffers --------------------------------------------------------------------------------
    def buffer(self, name, rows, cols, batch=False, init=None) -> int:
        """Declare (or fetch) a named buffer; batch=True means ``rows`` = the minibatch size."""
        if name in self._index:
            i = self._index[name]
            _, r, c, b = self._bufs[i]
            if (c != cols) or (b != batch) or (not batch and r != rows):
                raise CompileError(f"buffer {name!r} redeclared with another shape")
            return i
        self._index[name] = len(self._bufs)
        self._bufs.append((name, self.batch if batch else rows, cols, batch))
        if init is not None:
            self._init[name] = np.asarray(init, np.float32).reshape(rows, cols)
        return self._index[name]

    def rate(self, pop: str, phase: str) -> int:
        """Buffer of population ``pop``'s rate in (and at the end of) ``phase``."""
        self._check_pop(pop)
        return self.buffer(f"{pop}.r@{phase}", 0, self.circuit.populations[pop].size, True)

    def drive(self, pop: str, phase: str) -> int:
        self._check_pop(pop)
        return self.buffer(f"{pop}.drive@{phase}", 0, self.circuit.populations[pop].size, True)

    def weight(self, proj: str) -> int:
        return self._index[f"{proj}.W"]

    def grad(self, proj: str) -> tuple[int, float]:
        """The summed update buffer of ``proj`` and the beta to use: 0.0 for the first write in
        the trial, 1.0 for later ones (so no zeroing pass is needed)."""
        self.require_projection(proj, "grad")
        post, pre = self.circuit.shape_of(self.circuit.projections[proj])
        i = self.buffer(f"{proj}.dW", post, pre)
        if proj not in self.grads:
            self.grads.append(proj)
        beta = 1.0 if proj in self._grad_written else 0.0
        self._grad_written.add(proj)
        return i, beta

    def scratch(self, name: str, cols: int, rows: int | None = None) -> int:
        """A scratch buffer; batch-shaped unless ``rows`` is given."""
        return self.buffer(f"scratch.{name}", rows or 0, cols, rows is None)

    def persistent(self, name: str, rows: int, cols: int, init=None) -> int:
        """A buffer that keeps its value across trials (e.g. a learned feedback matrix)."""
        return self.buffer(name, rows, cols, False, init=init)

    def key(self, name: str) -> int:
        """Index of a counter-RNG key for component ``name`` (seeded from the root seed)."""
        if name not in self._key_index:
            self._key_index[name] = len(self._keys)
            self._keys.append(component_key(self.seed, name))
        return self._key_index[name]

    # -- sections -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def at(self, section: str):
        """Emit into ``section``: ``trial_start``, ``trial_end``, ``<phase>:pre``,
        ``<phase>:loop`` (every time step) or ``<phase>:post`` (phase end)."""
        if section not in self._pb.sections:
            raise CompileError(f"unknown section {section!r}; expected one of "
                               f"{list(self._pb.sections)}")
        prev = self._pb.current
        self._pb.current = section
        try:
            yield
        finally:
            self._pb.current = prev

    # -- operations -----------------------------------------------------------------------------
    def gemm(self, c, a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, where=""):
        """``c = alpha op(a) @ op(b) + beta c`` (buffers are row-major (rows, cols))."""
        self._pb.emit(K.GEMM, (c, a, b, int(trans_a), int(trans_b)), (alpha, beta), where)

    def sub(self, dst, x, y, where=""):
        self._pb.emit(K.SUB, (dst, x, y), (), where)

    def mul(self, dst, x, y, where=""):
        self._pb.emit(K.MUL, (dst, x, y), (), where)

    def axpy(self, dst, src, scale=1.0, where=""):
        self._pb.emit(K.AXPY, (dst, src), (scale,), where)

    def copy(self, dst, src, where=""):
        self._pb.emit(K.COPY, (dst, src), (), where)

    def scale(self, dst, s, where=""):
        self._pb.emit(K.SCALE, (dst,), (s,), where)

    def zero(self, dst, where=""):
        self._pb.emit(K.ZERO, (dst,), (), where)

    def deriv(self, dst, drive, pop, where=""):
        """``dst *= f'(drive)`` with the transfer function of population ``pop``."""
        code = self.circuit.populations[pop].code
        if code == K.SOFTMAX:
            raise CompileError(f"the derivative of softmax ({pop!r}) is not element-wise")
        if code >= K.RMS_NORM:
            raise CompileError(f"the derivative of the RMS-normalised population {pop!r} is not "
                               "element-wise")
        self._pb.emit(K.DERIV, (dst, drive, code), (), where)

    def emit(self, op, ints=(), floats=(), where=""):
        """Low-level: append a raw instruction (see :mod:`neurosim.kernels.ops`)."""
        return self._pb.emit(op, ints, floats, where)

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
                 fuse: bool = True, targets: str = "onehot") -> Plan:
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
    fuse : bool
        Fold the momentum update into the GEMM that produces a projection's update when that
        is exact (one GEMM writes dW, no weight decay): ``V = m V + (lr/B) post^T pre`` in one
        BLAS call, saving two passes over the weight-sized arrays. False keeps dW explicit.
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
        pb.buffer(f"{proj.name}.W", *shape, init=w)
    for pop in circuit.populations.values():
        if pop.bias is not None:
            pb.buffer(f"{pop.name}.bias", 1, pop.size, init=pop.bias.reshape(1, -1))
        if pop.dropout > 0:
            pb.buffer(f"{pop.name}.mask", 0, pop.size, True)
        if time_mode and pop.tau > 0 and pop.code == K.SOFTMAX:
            pb.buffer(f"{pop.name}.tmp", 0, pop.size, True)
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
                        pb.emit(K.MASK, (pb._index[f"{pop.name}.mask"],
                                         pb.key(f"dropout:{pop.name}")),
                                (1.0 - pop.dropout,), f"population {pop.name!r} (dropout)")
            if kind in ("train", "infer"):
                if "x" in stimuli:
                    pb.emit(K.GATHER, (stimuli["x"], 0), (), "stimulus 'x'")
                if "t" in stimuli:
                    if targets == "onehot":
                        pb.emit(K.ONEHOT, (stimuli["t"],), (1.0, 0.0), "stimulus 't'")
                    else:
                        pb.emit(K.GATHER, (stimuli["t"], 1), (), "stimulus 't'")
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
                        post, pre = circuit.shape_of(proj)
                        v = pb.buffer(f"{name}.V", post, pre)
                        style = optimizer.style_code
                        if fuse and _fuse_momentum(prb, pb, name, v, optimizer):
                            style += 2
                        pb.emit(K.SGD, (pb.weight(name), v, pb._index[f"{name}.dW"], style),
                                (optimizer.lr * optimizer.scale_of(name), optimizer.momentum,
                                 optimizer.weight_decay, optimizer.max_weight,
                                 optimizer.scale_of(name)),
                                ("lr", f"projection {name!r}"))
        if kind == "train":
            _emit_monitors(pb, prb, monitors, time_mode)
        elif kind == "free" and time_mode:
            _emit_monitors(pb, prb, monitors, time_mode, only_phase=only_phase)
        return prb.finish()

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
    plan = Plan(circuit, protocol, batch, int(seed), mem, bufs, dict(pb._index),
                np.array(pb._keys if pb._keys else [0], np.uint64), train, infer, free,
                list(monitors), getattr(pb, "_monitor_meta", []), list(rules), optimizer,
                plastic, stimuli, output, err.name if err else None, targets)
    for name, arr in pb._init.items():
        plan.view(name)[...] = arr
    return plan


def _fuse_momentum(prb, pb, name, v, optimizer) -> bool:
    """Rewrite ``dW = sum_i post_i^T pre_i`` (GEMMs that are the only accesses to dW in the
    trial: the first overwrites it, the others accumulate) into ``V = m V + alpha sum_i post_i^T
    pre_i``, alpha = lr/nb (reference) or 1/nb (torch) at run time, so that no pass over dW
    remains: PEPITA's single product, the two terms of a contrastive rule."""
    if optimizer.weight_decay != 0.0:
        return False
    dw = pb._index[f"{name}.dW"]
    hits = []
    for sec, items in prb.sections.items():
        for k, (iv, fv, w) in enumerate(items):
            if dw in iv[1:6]:
                hits.append((sec, k, iv, fv))
    if not hits:
        return False
    for j, (sec, k, iv, fv) in enumerate(hits):
        if sec != "trial_end" or iv[0] != K.GEMM or iv[1] != dw or dw in (iv[2], iv[3]) or \
                iv[6] == 1 or fv[1] != (0.0 if j == 0 else 1.0):
            return False
    lr = optimizer.lr * optimizer.scale_of(name) if optimizer.style == "reference" else 1.0
    for j, (sec, k, iv, fv) in enumerate(hits):
        iv[1] = v
        fv[1] = optimizer.momentum if j == 0 else 1.0
        iv[6] = 1
        fv[2] = lr
        fv[3] = optimizer.scale_of(name)  # set_lr keeps the per-projection scale
        w = prb.sections[sec][k][2]
        prb.sections[sec][k] = (iv, fv, ("lr2", w) if optimizer.style == "reference" else w)
    return True


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
        pb.emit(K.BIAS, (d, pb._index[f"{pop.name}.bias"]), (), where)
    return d


def _emit_rate(pb, ph, pop, d, dynamic, training, alpha):
    """Emit the rate update of ``pop`` from its drive ``d`` (Euler step or instantaneous)."""
    r = pb.rate(pop.name, ph.name)
    where = f"population {pop.name!r}"
    mask = pb._index[f"{pop.name}.mask"] if (training and pop.dropout > 0) else -1
    if dynamic:
        tmp = pb._index.get(f"{pop.name}.tmp", -1)
        pb.emit(K.EULER, (r, d, pop.code, mask, tmp), (alpha,), where)
    else:
        pb.emit(K.TRANSFER, (r, d, pop.code, mask), (), where)


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
            pb.emit(K.COUNT_CORRECT, (pb.rate(pb._output, ph.name), pb.buffer("stats.correct", 1, 2)),
                    (), "training accuracy")


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
                    pb.emit(K.RECORD, (buf, mi, 0), (), where)
            continue
        if mon.target.startswith("angle:"):
            fname = mon.target.split(":", 1)[1]
            proj = pb.require_projection(fname, f"{where}.target")
            chain = _forward_chain(circuit, proj)
            with pb.at("trial_end"):
                guard = pb.emit(K.GUARD, (mon.every, 0), (), where)
                prod = pb.weight(chain[0])
                for k, name in enumerate(chain[1:]):
                    post, _ = circuit.shape_of(circuit.projections[name])
                    nxt = pb.persistent(f"monitor{mi}.chain{k}", post,
                                        circuit.shape_of(circuit.projections[chain[0]])[1])
                    pb.gemm(nxt, pb.weight(name), prod, where=where)
                    prod = nxt
                prb.sections["trial_end"][guard][0][2] = len(chain) - 1
                pb.emit(K.RECORD_STAT, (pb.weight(fname), mi, 1, prod, 1), (), where)
            meta.append(dict(key=mon.key, kind="stat", size=1, per="trial", every=mon.every))
            continue
        obj, var = mon.target.rsplit(".", 1)
        if obj in circuit.projections:
            if var not in ("norm", "update_norm"):
                raise ValidationError(f"{where}.target", f"projection variable {var!r} unknown; "
                                      "expected 'norm' or 'update_norm'.")
            if var == "update_norm" and obj not in pb.grads:
                raise ValidationError(f"{where}.target", f"projection {obj!r} is not updated by "
                                      "any rule, so it has no update to measure.")
            buf = pb.weight(obj) if var == "norm" else pb._index[f"{obj}.V"]
            with pb.at("trial_end"):
                pb.emit(K.RECORD_STAT, (buf, mi, 0, 0, 0), (), where)
            meta.append(dict(key=mon.key, kind="stat", size=1, per="trial", every=mon.every,
                             update_scale=(var == "update_norm")))
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
            pb.emit(K.RECORD, (buf, mi, 0 if per == "step" else 1), (), where)
        meta.append(dict(key=mon.key, kind="var", size=u1 - u0, per=per, every=mon.every,
                         u0=u0, sample=-1 if mon.sample == "mean" else mon.sample, phase=phase))
    if only_phase is None:
        pb._monitor_meta = meta


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
