"""Export a time-mode neurosim circuit to the equivalent Brian2 network.

Each population becomes a ``NeuronGroup``, each projection a ``Synapses`` object whose summed
variable writes the projection's contribution into its own input variable of the target group
(``I_ff`` for a feedforward and ``I_fb`` for a top-down projection; ``I_ff_<name>`` /
``I_fb_<name>`` when a group receives several of one role, since Brian2 allows one summed source
per variable). The phases of a trial become successive ``Network.run`` calls; between them the
exporter applies what the neurosim protocol says: clamped stimuli (``I_ext``), projection gating
(an inactive projection's ``Synapses`` is switched off and its input variable zeroed), resets,
and the copies of held traces (``pop@phase``).

Equations (``F`` = the population's transfer function, ``drive = I_ff + I_fb + I_ext + b``)::

    tau > 0:            dr/dt = (-r + F(drive)) / tau      (method euler or exponential_euler)
    tau = 0:            r = F(drive)                        (a subexpression: always current)
    ErrorPopulation:    r = o - target,  o linked to the output population's r
    held trace p@ph:    r (a parameter) copied from p at the end of every step of phase ph

Scheduling within one Brian2 time step reproduces neurosim's explicit (Jacobi) step exactly:
first the summed inputs of instantaneous populations (in dependency order), then those of the
dynamic populations, all from the state at ``t``; then the state updaters move the dynamic rates
to ``t + dt``. Monitors read at the ``end`` slot, so row ``k`` of a phase holds the state after
``k + 1`` steps, as neurosim's step monitors do.

Not exported (clear :class:`ExportError`): ``softmax`` (non-local) and ``erf`` populations,
dropout, steady-state protocols, and plasticity (rules stay neurosim-only: copy the learned
weights with :meth:`Brian2Network.set_weights`).

brian2 is imported only inside :func:`export_brian2`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..circuit import Circuit, ErrorPopulation
from ..compiler import _active, _alpha, _invariant, _validate_references
from ..errors import ValidationError
from ..protocol import Protocol
from ..rng import component_rng


class ExportError(ValidationError):
    """The circuit or protocol uses a feature that the Brian2 export does not cover."""


TRANSFER_EXPRESSIONS = {
    "identity": "{x}",
    "linear": "{x}",
    "relu": "clip({x}, 0, inf)",
    "tanh": "tanh({x})",
    "sigmoid": "1 / (1 + exp(-({x})))",
}
"""Brian2 expressions of the exportable transfer functions."""

# scheduling orders inside Brian2's ``groups`` and ``end`` slots
_ORDER_INST = -1000   # + dependency rank: summed inputs of instantaneous populations
_ORDER_DYN = -500     # summed inputs of dynamic populations
_ORDER_LAG_MON = -100  # monitors of populations that are not current at the end of a step
_ORDER_HOLD = 0       # copies into held traces (end slot)
_ORDER_MON = 10       # monitors (end slot)


def transfer_expression(transfer: str, x: str = "drive", where: str = "transfer") -> str:
    """The Brian2 expression of ``F(x)``; raises :class:`ExportError` for softmax and erf."""
    if transfer == "softmax":
        raise ExportError(where, "softmax is not exported to Brian2: it is non-local (each "
                          "unit's rate depends on every unit's drive), which a NeuronGroup "
                          "equation cannot express.", "export circuits whose populations use "
                          "identity, relu, tanh or sigmoid; keep softmax circuits neurosim-only.")
    if transfer not in TRANSFER_EXPRESSIONS:
        raise ExportError(where, f"transfer {transfer!r} is not exported to Brian2 (no built-in "
                          "function).", f"use one of {sorted(TRANSFER_EXPRESSIONS)}.")
    return TRANSFER_EXPRESSIONS[transfer].format(x=x)


def exportable_copy(circuit: Circuit, *, transfers: dict | None = None,
                    dropout: float | None = None) -> Circuit:
    """A copy of ``circuit`` with some populations' transfer functions replaced (e.g.
    ``{"output": "sigmoid"}`` for a softmax output) and/or every dropout set to ``dropout``;
    projections and initialisers are unchanged, so the same seed gives the same weights."""
    import dataclasses

    transfers = dict(transfers or {})
    for name in transfers:
        if name not in circuit.populations:
            raise ValidationError("exportable_copy.transfers", f"no population {name!r}.")
    out = Circuit(circuit.name)
    for name, pop in circuit.populations.items():
        if isinstance(pop, ErrorPopulation):
            out.add(pop)
            continue
        kw = {}
        if name in transfers:
            kw["transfer"] = transfers[name]
        if dropout is not None:
            kw["dropout"] = dropout
        out.add(dataclasses.replace(pop, **kw) if kw else pop)
    for proj in circuit.projections.values():
        out.add(proj)
    return out


def _ident(name: str) -> str:
    return re.sub(r"\W", "_", name)


@dataclass
class _PhaseInfo:
    name: str
    steps: int
    active: set          # projection names active in the phase
    fresh: set           # populations whose r/drive are current at the end of a step
    dyn: list            # dynamic population names


@dataclass
class Segment:
    """One phase of one trial: rows ``[start, start + steps)`` of the phase's traces."""

    trial: int
    phase: str
    steps: int
    rows: dict = field(default_factory=dict)   # monitor name -> first row in that monitor


class Brian2Network:
    """A Brian2 network equivalent to a neurosim circuit run in time mode.

    Attributes
    ----------
    net : brian2.Network
    groups : dict population name -> NeuronGroup
    synapses : dict projection name -> Synapses
    holds : dict ``"pop@phase"`` -> NeuronGroup holding that trace
    input_vars : dict projection name -> (population, input variable it writes)
    equations : dict population name -> the group's equations (text)
    """

    def __init__(self, circuit, protocol, b2, net, groups, synapses, holds, hold_copies,
                 monitors, lag_monitors, phase_info, input_vars, equations, clamped):
        self.circuit = circuit
        self.protocol = protocol
        self._b2 = b2
        self.net = net
        self.groups = groups
        self.synapses = synapses
        self.holds = holds
        self._hold_copies = hold_copies
        self._monitors = monitors
        self._lag_monitors = lag_monitors
        self._phase = phase_info
        self.input_vars = input_vars
        self.equations = equations
        self._clamped = clamped
        self.segments: list[Segment] = []
        self.trials = 0
        self._rows = {k: 0 for k in list(monitors) + [f"lag:{k}" for k in lag_monitors]}

    # -- weights ----------------------------------------------------------------------------------
    def set_weights(self, name: str, value) -> None:
        """Copy a projection's weights, shape (post, pre) as neurosim holds them (the gain is
        folded in: Brian2's ``w[i, j] = gain * W[j, i]``)."""
        if name not in self.synapses:
            raise ValidationError("Brian2Network.set_weights", f"no projection {name!r} (has "
                                  f"{sorted(self.synapses)}).")
        proj = self.circuit.projections[name]
        shape = self.circuit.shape_of(proj)
        w = np.asarray(value, dtype=np.float64)
        if w.shape != shape:
            raise ValidationError(f"Brian2Network.set_weights({name!r})", f"shape {w.shape}, "
                                  f"expected (post, pre) = {shape}.")
        self.synapses[name].w[:] = (proj.gain * w).T.ravel()

    def set_all_weights(self, weights: dict) -> None:
        for name, w in weights.items():
            self.set_weights(name, w)

    # -- running ----------------------------------------------------------------------------------
    def run_trial(self, stimuli: dict | None = None, *, steps: int | None = None,
                  report=None) -> None:
        """Run one trial: every phase of the protocol, as successive ``Network.run`` calls.

        ``stimuli`` maps stimulus names (``"x"``, ``"t"``, ...) to arrays of the clamped
        population's size; missing stimuli are zero. ``steps`` (optional) runs every phase for
        that many steps instead of its duration (warm-ups, short benchmarks). ``report`` is
        passed to ``Network.run``."""
        b2 = self._b2
        stimuli = dict(stimuli or {})
        circuit, protocol = self.circuit, self.protocol
        for idx, ph in enumerate(protocol.phases):
            info = self._phase[ph.name]
            reset = ph.reset if ph.reset is not None else idx == 0
            if reset:
                for name in info.dyn:
                    self.groups[name].r = 0.0
            for name, pop in circuit.populations.items():
                if isinstance(pop, ErrorPopulation):
                    self.groups[name].target = self._stim(stimuli, pop.target, pop.size)
                elif name in self._clamped:
                    stim = ph.clamp.get(name)
                    self.groups[name].I_ext = (self._stim(stimuli, stim, pop.size)
                                               if stim is not None else 0.0)
            for pname, syn in self.synapses.items():
                on = pname in info.active
                syn.active = on
                if not on:
                    post, var = self.input_vars[pname]
                    setattr(self.groups[post], var, 0.0)
            for key, syn in self._hold_copies.items():
                syn.active = key.endswith(f"@{ph.name}")
            n_steps = info.steps if steps is None else int(steps)
            seg = Segment(self.trials, ph.name, n_steps)
            for name, mon in self._monitors.items():
                mon.active = name in info.fresh
                if mon.active:
                    seg.rows[name] = self._rows[name]
                    self._rows[name] += n_steps
            for name, mon in self._lag_monitors.items():
                mon.active = name not in info.fresh
                if mon.active:
                    seg.rows[f"lag:{name}"] = self._rows[f"lag:{name}"]
                    self._rows[f"lag:{name}"] += n_steps
            self.net.run(n_steps * protocol.dt * b2.second, report=report, namespace={})
            self.segments.append(seg)
        self.trials += 1

    @staticmethod
    def _stim(stimuli, name, size):
        if name not in stimuli or stimuli[name] is None:
            return np.zeros(size)
        v = np.asarray(stimuli[name], dtype=np.float64).reshape(-1)
        if v.shape != (size,):
            raise ValidationError(f"Brian2Network.run_trial({name!r})", f"shape {v.shape}, "
                                  f"expected ({size},).")
        return v

    # -- results ----------------------------------------------------------------------------------
    def trace(self, pop: str, var: str = "r", phase: str | None = None) -> np.ndarray:
        """Recorded ``var`` of ``pop`` in ``phase`` over all trials run, shape (rows, units).

        Rows line up with neurosim's step monitor of the same phase: row ``k`` of a trial's
        phase is the state after ``k + 1`` steps. For an instantaneous population that depends
        on dynamic ones through projections (its summed inputs are refreshed at the start of
        the next step), the last row of each phase is NaN."""
        phase = phase or self.protocol.phases[0].name
        if pop not in self._monitors:
            raise ValidationError("Brian2Network.trace", f"population {pop!r} is not recorded "
                                  f"(recorded: {sorted(self._monitors)}).")
        if var not in ("r", "drive") or (var == "drive" and isinstance(
                self.circuit.populations[pop], ErrorPopulation)):
            raise ValidationError("Brian2Network.trace", f"variable {var!r} of {pop!r} is not "
                                  "recorded; populations record 'r' and 'drive' (error "
                                  "populations: 'r').")
        size = self.circuit.populations[pop].size
        out = []
        for seg in self.segments:
            if seg.phase != phase:
                continue
            if pop in seg.rows:
                vals = getattr(self._monitors[pop], var)     # (units, samples)
                s = seg.rows[pop]
                out.append(np.asarray(vals[:, s:s + seg.steps]).T)
            else:
                vals = getattr(self._lag_monitors[pop], var)
                s = seg.rows[f"lag:{pop}"]
                rows = np.full((seg.steps, size), np.nan)
                rows[:-1] = np.asarray(vals[:, s + 1:s + seg.steps]).T
                out.append(rows)
        if not out:
            return np.zeros((0, size))
        return np.concatenate(out)

    def describe(self) -> str:
        """The Brian2 equations of every group, as text."""
        return "\n\n".join(f"# {name}\n{eq}" for name, eq in self.equations.items())


# -------------------------------------------------------------------------------------------------
def export_brian2(circuit, protocol: Protocol | None = None, *, weights: dict | None = None,
                  seed: int = 0, target: str | None = None, record=True,
                  prefix: str = "") -> Brian2Network:
    """Build the Brian2 network equivalent to ``circuit`` run with the time-mode ``protocol``.

    Parameters
    ----------
    circuit : Circuit, or a Simulator / Plan (then ``protocol`` and the current weights come
        from it)
    protocol : Protocol in time mode
    weights : dict name -> (post, pre) array, optional
        Weights to copy (default: each projection's initialiser sampled exactly as
        :func:`neurosim.compile_plan` does with ``seed``).
    target : ``None`` (brian2's preference or device), ``"numpy"`` or ``"cython"``
        Runtime code-generation target of every object.
    record : bool or iterable of population names
        Which populations get state monitors (``r`` and ``drive``).
    prefix : str
        Prefix of the Brian2 object names.
    """
    from ..compiler import Plan
    from ..simulator import Simulator

    if isinstance(circuit, Simulator):
        sim = circuit
        weights = dict(sim.weights) if weights is None else weights
        circuit, protocol = sim.plan.circuit, sim.plan.protocol
    elif isinstance(circuit, Plan):
        plan = circuit
        if weights is None:
            weights = {n: plan.view(f"{n}.W").copy() for n in plan.circuit.projections}
        circuit, protocol = plan.circuit, plan.protocol
    if not isinstance(circuit, Circuit):
        raise ValidationError("export_brian2.circuit", f"got {type(circuit).__name__}, expected "
                              "a Circuit, Plan or Simulator.")
    if not isinstance(protocol, Protocol):
        raise ValidationError("export_brian2.protocol", f"got {type(protocol).__name__}, "
                              "expected a Protocol.")
    if protocol.mode != "time":
        raise ExportError("Protocol.mode", f"got {protocol.mode!r}; only time-mode protocols are "
                          "exported (Brian2 integrates ODEs in time).",
                          "use Protocol(mode='time', dt=..., phases with durations).")
    if target not in (None, "numpy", "cython"):
        raise ValidationError("export_brian2.target", f"got {target!r}, expected None, 'numpy' "
                              "or 'cython'.")

    _validate_references(circuit, protocol)   # the checks compile_plan makes
    pops = circuit.populations
    if record is True:
        rec = list(pops)
    elif record is False or record is None:
        rec = []
    else:
        rec = list(record)
        for n in rec:
            if n not in pops:
                raise ValidationError("export_brian2.record", f"no population {n!r}.")
    for name, pop in pops.items():
        if isinstance(pop, ErrorPopulation):
            continue
        if pop.tau > 0:
            _alpha(protocol, pop)                # dt > tau with Euler: refused as in neurosim
        where = f"Population({name!r})"
        transfer_expression(pop.transfer, where=f"{where}.transfer")
        if getattr(pop, "normalize", None):
            raise ExportError(f"{where}.normalize", f"got {pop.normalize!r}; the per-sample "
                              "normalisation couples the units of a population (like softmax) "
                              "and is not exported.", "export a copy with normalize=None.")
        if pop.dropout > 0:
            raise ExportError(f"{where}.dropout", f"got {pop.dropout}; dropout masks are drawn "
                              "per training trial and are not exported.",
                              "export the circuit with dropout=0.")
    dyn_names = [n for n, p in pops.items() if p.tau > 0]

    # -- per-phase structure ------------------------------------------------------------------------
    phase_info = {}
    for ph in protocol.phases:
        stim_of = dict(ph.clamp)
        inv = _invariant(circuit, ph, set(dyn_names), stim_of)
        fresh = set(dyn_names) | inv
        changed = True
        while changed:
            changed = False
            for n, p in pops.items():
                if isinstance(p, ErrorPopulation) and n not in fresh and p.output in fresh:
                    fresh.add(n)
                    changed = True
        active = {p.name for p in circuit.projections.values() if _active(p, ph)}
        phase_info[ph.name] = _PhaseInfo(ph.name, protocol.n_steps(ph), active, fresh,
                                         list(dyn_names))

    held = sorted({p.pre for p in circuit.projections.values() if p.pre_phase is not None})
    for key in held:
        pop, ph = key.split("@", 1)
        if pop not in phase_info[ph].fresh:
            raise ExportError(f"Projection(pre={key!r})", f"the held trace of instantaneous "
                              f"population {pop!r} depends on dynamic populations through "
                              "projections; Brian2 refreshes its summed inputs only at the next "
                              "step, so the value at the end of the phase is not available.",
                              "hold a dynamic population, or an instantaneous one fed only by "
                              "stimuli and held traces.")

    # dependency rank of instantaneous populations (summed inputs computed in this order)
    inst = [n for n in pops if n not in dyn_names]
    deps = {n: set() for n in inst}
    for proj in circuit.projections.values():
        if proj.pre_phase is None and proj.post in deps:
            src = proj.pre_population
            if src in deps:
                deps[proj.post].add(src)
    for n, p in pops.items():
        if isinstance(p, ErrorPopulation) and p.output in deps:
            deps[n].add(p.output)
    rank, state = {}, {}

    def visit(n, path):
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ExportError("Circuit", "instantaneous populations "
                              f"{' -> '.join(path[path.index(n):] + [n])} form a loop over the "
                              "union of all phases; the export needs one evaluation order for "
                              "every phase.", "give a population in the loop tau > 0.")
        state[n] = 1
        for d in sorted(deps[n]):
            visit(d, path + [n])
        state[n] = 2
        rank[n] = len(rank)

    for n in inst:
        visit(n, [])

    try:
        import brian2 as b2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ExportError("export_brian2", f"brian2 is not installed ({e}).",
                          "pip install brian2 (and cython for the cython target).") from None

    codeobj = None
    if target == "numpy":
        from brian2.codegen.runtime.numpy_rt import NumpyCodeObject as codeobj
    elif target == "cython":
        from brian2.codegen.runtime.cython_rt import CythonCodeObject as codeobj
    dt = protocol.dt * b2.second
    method = "euler" if protocol.method == "euler" else "exponential_euler"
    pfx = _ident(prefix) + "_" if prefix else ""

    # -- input variables --------------------------------------------------------------------------
    input_vars = {}
    for name in pops:
        incoming = circuit.incoming(name)
        for role, short in (("feedforward", "ff"), ("feedback", "fb")):
            of_role = [p for p in incoming if p.role == role]
            for p in of_role:
                var = f"I_{short}" if len(of_role) == 1 else f"I_{short}_{_ident(p.name)}"
                input_vars[p.name] = (name, var)
    clamped = {pop for ph in protocol.phases for pop in ph.clamp}

    # -- groups -----------------------------------------------------------------------------------
    groups, equations, objects = {}, {}, []
    for name, pop in pops.items():
        if isinstance(pop, ErrorPopulation):
            eq = "r = o - target : 1\no : 1 (linked)\ntarget : 1"
            g = b2.NeuronGroup(pop.size, eq, dt=dt, codeobj_class=codeobj,
                               name=f"{pfx}{_ident(name)}*")
        else:
            terms = [v for p, (post, v) in input_vars.items() if post == name]
            lines = [f"{v} : 1" for v in terms]
            if name in clamped:
                terms.append("I_ext")
                lines.append("I_ext : 1")
            if pop.bias is not None:
                terms.append("b")
                lines.append("b : 1 (constant)")
            f_expr = transfer_expression(pop.transfer, "drive")
            drive = " + ".join(terms) if terms else "0"
            if pop.tau > 0:
                head = [f"dr/dt = (-r + {f_expr}) / tau : 1", f"drive = {drive} : 1",
                        "tau : second (constant, shared)"]
            else:
                head = [f"r = {f_expr} : 1", f"drive = {drive} : 1"]
            eq = "\n".join(head + lines)
            kw = {"method": method} if pop.tau > 0 else {}
            g = b2.NeuronGroup(pop.size, eq, dt=dt, codeobj_class=codeobj,
                               name=f"{pfx}{_ident(name)}*", **kw)
            if pop.tau > 0:
                g.tau = pop.tau * b2.second
            if pop.bias is not None:
                g.b = np.asarray(pop.bias, dtype=np.float64)
        groups[name] = g
        equations[name] = eq
        objects.append(g)
    for name, pop in pops.items():
        if isinstance(pop, ErrorPopulation):
            groups[name].o = b2.linked_var(groups[pop.output], "r")

    # -- held traces ------------------------------------------------------------------------------
    holds, hold_copies = {}, {}
    for key in held:
        pop, ph = key.split("@", 1)
        size = pops[pop].size
        h = b2.NeuronGroup(size, "r : 1", dt=dt, codeobj_class=codeobj,
                           name=f"{pfx}hold_{_ident(pop)}_{_ident(ph)}*")
        c = b2.Synapses(groups[pop], h, "r_post = r_pre : 1 (summed)", dt=dt,
                        codeobj_class=codeobj, name=f"{pfx}copy_{_ident(pop)}_{_ident(ph)}*")
        c.connect(j="i")
        u = c.summed_updaters["r_post"]
        u.when, u.order = "end", _ORDER_HOLD
        holds[key], hold_copies[key] = h, c
        equations[f"{pop}@{ph} (held)"] = "r : 1  # copied from " + pop + " during " + ph
        objects += [h, c]

    # -- projections ------------------------------------------------------------------------------
    synapses = {}
    rng_weights = weights or {}
    for pname, proj in circuit.projections.items():
        post, var = input_vars[pname]
        src = holds[proj.pre] if proj.pre_phase is not None else groups[proj.pre_population]
        n_post, n_pre = circuit.shape_of(proj)
        s = b2.Synapses(src, groups[post], f"w : 1 (constant)\n{var}_post = w * r_pre : 1 (summed)",
                        dt=dt, codeobj_class=codeobj, name=f"{pfx}{_ident(pname)}*")
        s.connect(i=np.repeat(np.arange(n_pre), n_post), j=np.tile(np.arange(n_post), n_pre))
        u = s.summed_updaters[f"{var}_post"]
        u.when = "groups"
        u.order = _ORDER_DYN if post in dyn_names else _ORDER_INST + rank[post]
        synapses[pname] = s
        objects.append(s)

    # -- monitors ---------------------------------------------------------------------------------
    monitors, lag_monitors = {}, {}
    for name in rec:
        vars_ = ["r"] if isinstance(pops[name], ErrorPopulation) else ["r", "drive"]
        m = b2.StateMonitor(groups[name], vars_, record=True, when="end", order=_ORDER_MON,
                            dt=dt, codeobj_class=codeobj, name=f"{pfx}mon_{_ident(name)}*")
        monitors[name] = m
        objects.append(m)
        if any(name not in info.fresh for info in phase_info.values()):
            lm = b2.StateMonitor(groups[name], vars_, record=True, when="groups",
                                 order=_ORDER_LAG_MON, dt=dt, codeobj_class=codeobj,
                                 name=f"{pfx}lagmon_{_ident(name)}*")
            lag_monitors[name] = lm
            objects.append(lm)

    net = b2.Network(*objects)
    bn = Brian2Network(circuit, protocol, b2, net, groups, synapses, holds, hold_copies,
                       monitors, lag_monitors, phase_info, input_vars, equations, clamped)
    for pname, proj in circuit.projections.items():
        w = rng_weights.get(pname)
        if w is None:
            w = proj.init.sample(circuit.shape_of(proj), component_rng(seed, f"init:{pname}"))
        bn.set_weights(pname, w)
    return bn
