"""Local plasticity rules for any circuit, written as array expressions.

Each rule changes one projection ``W`` (post x pre; feedforward, recurrent or feedback) from
two rate traces: the presynaptic ``pre`` and the postsynaptic ``post`` (PES: the ``error``).
They default to the projection's own source (its held trace ``pop@phase`` if it reads one) and
target, read in the rule's ``phase`` (default: the first); any population of the right size
can be named instead, as ``"pop"`` (in the rule's phase) or ``"pop@phase"`` (held at the end of
that phase; a phase that comes later in the trial holds the previous trial's value). Nothing
assumes a population or phase name.

The update is made once at the end of the phase (``timing="end"``, steady or time mode) or at
every time step of it (``timing="continuous"``, time mode: the update is the time average over
the phase's steps, so one learning rate means the same in both timings; a trace named without
a phase is then the live rate of that step). Updates are summed over the minibatch and written
in the descent direction the optimizer applies (``W <- W - lr dW / nb``, ``nb`` the minibatch
size), so the learning rate (eta, Nengo's kappa) is the optimizer's: ``SGD(lr=eta,
momentum=0)`` gives ``W <- W + eta * mean_b(ascent)``; ``SGD.lr_scale`` sets it per
projection when several rules share one optimizer.

=============== =========================================================================
:class:`Hebbian` ``dW/dt = y x^T - decay W`` (Hebb with passive decay)
:class:`Oja`     ``dW/dt = y (x - W^T y)^T`` (Oja 1982: first principal component)
:class:`BCM`     ``dW/dt = y (y - theta) x^T``, ``theta`` a running mean of ``y^2``
:class:`PES`     ``dW/dt = -e x^T`` (Nengo's prescribed error sensitivity)
=============== =========================================================================

:class:`Oja` is the worked example of docs/engine.md ("Writing a rule").
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

import numpy as np

from ..errors import ValidationError
from ..params import check_choice, check_float
from ..units import is_bare_number, to_seconds
from .base import PlasticityRule, register_builder


@dataclass(frozen=True)
class LocalRule(PlasticityRule):
    """What every local rule has: the projection it changes, where its traces come from and
    when it updates (see the module docstring). Not a rule by itself."""

    projection: str
    _: KW_ONLY
    phase: str | None = None
    timing: str = "end"
    pre: str | None = None
    post: str | None = None
    name: str = "local"

    def __post_init__(self):
        cls = type(self).__name__
        if not isinstance(self.projection, str) or not self.projection:
            raise ValidationError(f"{cls}.projection", f"got {self.projection!r}, expected a "
                                  "projection name.")
        for attr in ("phase", "pre", "post"):
            v = getattr(self, attr)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValidationError(f"{cls}.{attr}", f"got {v!r}, expected a name or None "
                                      "(the default).")
        check_choice(f"{cls}.timing", self.timing, ("end", "continuous"))

    def modifies(self, pb):
        return [self.projection]

    def reads(self, pb):
        proj = pb.require_projection(self.projection, f"{type(self).__name__}.projection")
        phase = self.phase or pb.protocol.phases[0].name
        return [_qualified(s, phase) for s in (self.pre or proj.pre, self.post or proj.post)]


@dataclass(frozen=True)
class Hebbian(LocalRule):
    """Hebb's rule with passive decay: ``dW/dt = y x^T - decay W`` per sample, ``y`` the post-
    and ``x`` the presynaptic rate. With the post rate clamped (independent of ``W``) the fixed
    point is ``W* = E[y x^T] / decay``; without decay the weights grow without bound."""

    _: KW_ONLY
    decay: float = 0.0
    name: str = "hebbian"

    def __post_init__(self):
        super().__post_init__()
        check_float("Hebbian.decay", self.decay, low=0.0)


@dataclass(frozen=True)
class Oja(LocalRule):
    """Oja's rule (Oja 1982): ``dW/dt = y (x - W^T y)^T`` per sample, ``y`` the post- and ``x``
    the presynaptic rate. For a linear neuron it converges to the unit-norm first principal
    component of the input's (uncentred) second-moment matrix."""

    _: KW_ONLY
    name: str = "oja"


@dataclass(frozen=True)
class BCM(LocalRule):
    """The BCM rule (Bienenstock, Cooper & Munro 1982, with the threshold of Intrator & Cooper
    1992): ``dW/dt = y (y - theta) x^T`` per sample, with a sliding threshold per
    postsynaptic unit, ``theta`` = a running average of ``y^2``, kept as rule state (kind
    ``rule``: it persists across trials and ``Simulator.reset(rule=True)`` restores
    ``theta_init``).

    The threshold is updated after the weight update of the same step, from the minibatch mean:
    ``theta <- theta + (mean_b y^2 - theta) / n``, ``n`` = ``theta_tau``, its time constant in
    threshold updates: trials with ``timing="end"``, time steps with ``"continuous"``. A time
    with a unit (``"200 ms"``, a brian2 quantity) is accepted with ``"continuous"`` and divided
    by the protocol's ``dt``. A bare number counts updates; it is not in seconds. ``theta`` must
    follow ``y^2`` faster than the weights change for the rule to be stable."""

    _: KW_ONLY
    theta_tau: object = 10.0
    theta_init: float = 0.0
    name: str = "bcm"

    def __post_init__(self):
        super().__post_init__()
        check_float("BCM.theta_init", self.theta_init, low=0.0)
        if is_bare_number(self.theta_tau):
            check_float("BCM.theta_tau", self.theta_tau, low=1.0)
        else:
            if self.timing != "continuous":
                raise ValidationError("BCM.theta_tau", f"got the time {self.theta_tau!r}, but "
                                      "with timing='end' the threshold is updated once per "
                                      "trial; its time constant is a number of trials.",
                                      "give a number of trials, e.g. theta_tau=10, or use "
                                      "timing='continuous'.")
            to_seconds(self.theta_tau, "BCM.theta_tau", allow_zero=False)


@dataclass(frozen=True)
class PES(LocalRule):
    """Nengo's prescribed error sensitivity (MacNeil & Eliasmith 2011): ``dW/dt = -k e x^T`` per
    sample, ``e`` the rate of the population named by ``error`` (for instance an
    ``ErrorPopulation``, ``r = output - target``, or a population that computes an error
    through projections) and ``x`` the presynaptic rate. ``k`` is the optimizer's learning rate.
    ``error`` is ``"pop"`` (in the rule's phase) or ``"pop@phase"``; its size must be the
    projection's post size. ``post`` is not read."""

    error: str
    _: KW_ONLY
    name: str = "pes"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.error, str) or not self.error:
            raise ValidationError("PES.error", f"got {self.error!r}, expected the name of the "
                                  "population whose rate is the error (e.g. 'err' or "
                                  "'err@stim').")
        if self.post is not None:
            raise ValidationError("PES.post", f"got {self.post!r}; PES reads the error, not the "
                                  "postsynaptic rate.", "name the error population with "
                                  "error=...")

    def reads(self, pb):
        proj = pb.require_projection(self.projection, "PES.projection")
        phase = self.phase or pb.protocol.phases[0].name
        return [_qualified(s, phase) for s in (self.pre or proj.pre, self.error)]


# ---- build functions ---------------------------------------------------------------------------
@register_builder(Hebbian)
def build_hebbian(pb, rule: Hebbian):
    proj, phase, section, avg = _setup(pb, rule)
    with pb.at(section):
        x, y = _pre(pb, rule, proj, phase), _post(pb, rule, proj, phase)
        pb.update(proj.name, -avg * (y.T @ x))
    if rule.decay > 0.0:
        # W does not change within a trial: the decay's time average is its value at the end
        with pb.at(f"{phase}:post"):
            pb.update(proj.name, rule.decay * (pb.W(proj.name) * pb.batch_size()))


@register_builder(Oja)
def build_oja(pb, rule: Oja):
    proj, phase, section, avg = _setup(pb, rule)
    with pb.at(section):
        x, y, W = _pre(pb, rule, proj, phase), _post(pb, rule, proj, phase), pb.W(proj.name)
        # sum_b y_b (x_b - W^T y_b)^T = Y^T X - (Y^T Y) W; ascent, so the update is its negative
        pb.update(proj.name, avg * ((y.T @ y) @ W - y.T @ x))


@register_builder(BCM)
def build_bcm(pb, rule: BCM):
    proj, phase, section, avg = _setup(pb, rule)
    post_size = pb.circuit.shape_of(proj)[0]
    a = 1.0 / _theta_updates(pb, rule)
    theta = pb.state(f"{rule.name}.{proj.name}.theta", 1, post_size,
                     init=np.full((1, post_size), rule.theta_init, np.float32))
    with pb.at(section):
        x, y = _pre(pb, rule, proj, phase), _post(pb, rule, proj, phase)
        pb.update(proj.name, -avg * ((y * (y - theta)).T @ x))
        pb.assign(theta, (1.0 - a) * theta + a * (y ** 2).mean(0))


@register_builder(PES)
def build_pes(pb, rule: PES):
    proj, phase, section, avg = _setup(pb, rule)
    with pb.at(section):
        x = _pre(pb, rule, proj, phase)
        e = _trace(pb, rule.error, phase, "PES.error", pb.circuit.shape_of(proj)[0], "post")
        pb.update(proj.name, avg * (e.T @ x))


# ---- helpers -------------------------------------------------------------------------------------
def local_timing(pb, rule, cls: str):
    """(phase, section, averaging factor) of a local rule: the phase's end, or every time step
    of it with the update averaged over the steps."""
    names = [p.name for p in pb.protocol.phases]
    phase = rule.phase or names[0]
    pb.require_phase(phase, f"{cls}.phase")
    if rule.timing == "end":
        return phase, f"{phase}:post", 1.0
    if pb.protocol.mode != "time":
        raise ValidationError(f"{cls}.timing", "'continuous' needs a time-mode protocol.",
                              "use timing='end' in steady mode.")
    return phase, f"{phase}:loop", 1.0 / pb.protocol.n_steps(pb.protocol.phase(phase))


def _setup(pb, rule):
    cls = type(rule).__name__
    proj = pb.require_projection(rule.projection, f"{cls}.projection")
    phase, section, avg = local_timing(pb, rule, cls)
    return proj, phase, section, avg


def _qualified(spec: str, phase: str) -> str:
    return spec if "@" in spec else f"{spec}@{phase}"


def _pre(pb, rule, proj, phase):
    return _trace(pb, rule.pre or proj.pre, phase, f"{type(rule).__name__}.pre",
                  pb.circuit.shape_of(proj)[1], "pre")


def _post(pb, rule, proj, phase):
    return _trace(pb, rule.post or proj.post, phase, f"{type(rule).__name__}.post",
                  pb.circuit.shape_of(proj)[0], "post")


def _trace(pb, spec, phase, where, size, side):
    """Handle of the rate trace ``"pop"`` (in ``phase``) or ``"pop@phase"``, checked against the
    size of the projection's ``side``."""
    pop, _, ph = spec.partition("@")
    if pop not in pb.circuit.populations:
        raise ValidationError(where, f"got {spec!r}: no population {pop!r} (has "
                              f"{sorted(pb.circuit.populations)}).")
    pb.require_phase(ph or phase, where)
    n = pb.circuit.populations[pop].size
    if n != size:
        raise ValidationError(where, f"got {spec!r} with {n} units, but the projection's {side} "
                              f"side has {size}.", f"name a population of {size} units.")
    return pb.r(pop, ph or phase)


def _theta_updates(pb, rule: BCM) -> float:
    """BCM's threshold time constant in updates (trials or time steps)."""
    if is_bare_number(rule.theta_tau):
        return float(rule.theta_tau)
    n = to_seconds(rule.theta_tau, "BCM.theta_tau", allow_zero=False) / pb.protocol.dt
    if n < 1.0:
        raise ValidationError("BCM.theta_tau", f"got {rule.theta_tau!r}, shorter than the time "
                              f"step dt = {pb.protocol.dt} s.", "give at least one time step.")
    return n
