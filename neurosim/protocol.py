"""Trials and phases: what is presented, which projections are on, how each phase is run.

A :class:`Protocol` is a sequence of :class:`Phase` objects forming one trial. In the
steady-state mode every population is treated as instantaneous and evaluated once per phase in
dependency order; in the time mode populations with tau > 0 are integrated for
``duration / dt`` steps (Euler or exponential Euler) while instantaneous ones follow at once.
Each phase's end state is held as ``pop@phase``, which rules, monitors and projections read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ValidationError
from .params import check_choice, check_name
from .units import to_seconds

MODES = ("steady", "time")
METHODS = ("euler", "exp_euler")


@dataclass(frozen=True)
class Phase:
    """One phase of a trial.

    Parameters
    ----------
    name : str
    clamp : dict
        ``{population: stimulus}``: the stimulus (``"x"`` = input rows, ``"t"`` = one-hot
        target, or a name set with ``Simulator.set_stimulus``) is added to the population's
        drive during the phase.
    duration : float, brian2 quantity or str, optional
        Required in time mode (seconds).
    gates : tuple of str, optional
        If given, only these projections may be active in the phase (in addition to each
        projection's own ``phases``).
    reset : bool or None
        Start the phase from zero rates (True) or from the previous phase's end state (False;
        for the first phase: the previous trial's last phase). None (default): reset for the
        first phase of a trial, continue otherwise.
    """

    name: str
    clamp: dict = field(default_factory=dict)
    duration: object = None
    gates: tuple | None = None
    reset: bool | None = None

    def __post_init__(self):
        check_name("Phase", self.name)
        where = f"Phase({self.name!r})"
        if not isinstance(self.clamp, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.clamp.items()):
            raise ValidationError(f"{where}.clamp", f"got {self.clamp!r}, expected a dict "
                                  "{population: stimulus name}.")
        if self.duration is not None:
            object.__setattr__(self, "duration",
                               to_seconds(self.duration, f"{where}.duration", allow_zero=False,
                                          warn_bare=True))
        if self.gates is not None:
            if not isinstance(self.gates, (tuple, list)) or \
                    not all(isinstance(g, str) for g in self.gates):
                raise ValidationError(f"{where}.gates", f"got {self.gates!r}, expected a tuple "
                                      "of projection names.")
            object.__setattr__(self, "gates", tuple(self.gates))
        if self.reset is not None and not isinstance(self.reset, bool):
            raise ValidationError(f"{where}.reset", f"got {self.reset!r}, expected True, False "
                                  "or None.")


@dataclass(frozen=True)
class Protocol:
    """A trial: phases run in order, in one simulation mode.

    Parameters
    ----------
    phases : tuple of Phase
    mode : ``"steady"`` or ``"time"``
    dt : float, quantity or str
        Time step (time mode), seconds.
    method : ``"euler"`` (alpha = dt/tau) or ``"exp_euler"`` (alpha = 1 - exp(-dt/tau))
    inference_phase : str
        The phase run (without dropout or plasticity) to classify; default the first phase.
    """

    phases: tuple
    mode: str = "steady"
    dt: object = 1e-3
    method: str = "euler"
    inference_phase: str | None = None

    def __post_init__(self):
        phases = tuple(self.phases) if isinstance(self.phases, (tuple, list)) else ()
        if not phases or not all(isinstance(p, Phase) for p in phases):
            raise ValidationError("Protocol.phases", f"got {self.phases!r}, expected a non-empty "
                                  "sequence of Phase objects.")
        names = [p.name for p in phases]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValidationError("Protocol.phases", f"duplicate phase names {sorted(dup)}.")
        object.__setattr__(self, "phases", phases)
        check_choice("Protocol.mode", self.mode, MODES)
        check_choice("Protocol.method", self.method, METHODS)
        object.__setattr__(self, "dt", to_seconds(self.dt, "Protocol.dt", allow_zero=False,
                                                  warn_bare=True))
        if self.mode == "time":
            for p in phases:
                if p.duration is None:
                    raise ValidationError(f"Phase({p.name!r}).duration", "missing; a phase in "
                                          "time mode needs a duration.", "e.g. duration='50 ms'.")
                if p.duration < self.dt:
                    raise ValidationError(f"Phase({p.name!r}).duration", f"{p.duration} s is "
                                          f"shorter than dt = {self.dt} s.")
        inf = self.inference_phase or phases[0].name
        check_choice("Protocol.inference_phase", inf, names)
        object.__setattr__(self, "inference_phase", inf)

    def phase(self, name) -> Phase:
        for p in self.phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def index(self, name) -> int:
        return [p.name for p in self.phases].index(name)

    def n_steps(self, phase: Phase) -> int:
        """Time steps of a phase: round(duration / dt)."""
        return max(1, int(round(phase.duration / self.dt)))
