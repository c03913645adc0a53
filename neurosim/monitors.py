"""Monitor specs and the read-only Trace results.

A monitor records a population variable (``"hidden.r"``, ``"hidden.drive"``) in a given
phase, or a projection statistic (``"W1.norm"``, ``"W1.update_norm"``, ``"angle:F"`` = angle
between a feedback projection F and ``(W_L ... W_1)^T`` in degrees), either every ``every``
time steps (time-mode phases) or every ``every`` trials.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ValidationError
from .params import check_int


@dataclass(frozen=True)
class Monitor:
    """What to record.

    Parameters
    ----------
    target : str
        ``"pop.r"`` or ``"pop.drive"``; ``"proj.norm"``, ``"proj.update_norm"``;
        ``"angle:F"`` (angle of F with the transposed product of the feedforward chain from F's
        post population to the error's output).
    phase : str, optional
        For population variables: the phase recorded (default: the first).
    every : int
        Record every ``every`` steps (time mode, population variables) or trials (otherwise).
    per : ``"step"`` or ``"trial"``
        Counter that ``every`` refers to. Defaults to ``"step"`` for population variables in
        time mode, else ``"trial"``.
    units : tuple (start, stop), optional
        Unit range for population variables (default all units).
    sample : int or ``"mean"``
        Batch row recorded, or the mean over the batch.
    name : str, optional
        Key of the trace (default: target, with ``@phase`` for population variables).
    """

    target: str
    phase: str | None = None
    every: int = 1
    per: str | None = None
    units: tuple | None = None
    sample: object = 0
    name: str | None = None

    def __post_init__(self):
        where = f"Monitor({self.target!r})"
        if not isinstance(self.target, str) or not (
                "." in self.target or self.target.startswith("angle:")):
            raise ValidationError(f"{where}.target", f"got {self.target!r}, expected "
                                  "'population.r', 'population.drive', 'projection.norm', "
                                  "'projection.update_norm' or 'angle:F'.")
        check_int(f"{where}.every", self.every, low=1)
        if self.per not in (None, "step", "trial"):
            raise ValidationError(f"{where}.per", f"got {self.per!r}, expected 'step' or 'trial'.")
        if self.sample != "mean":
            check_int(f"{where}.sample", self.sample, low=0)
        for attr in ("phase", "name"):
            v = getattr(self, attr)
            if v is not None and not isinstance(v, str):
                raise ValidationError(f"{where}.{attr}", f"got {type(v).__name__} {v!r}, expected "
                                      "a string or None.")
        if self.units is not None:
            u = tuple(self.units) if isinstance(self.units, (tuple, list)) else ()
            if len(u) != 2 or not all(isinstance(x, int) for x in u) or not 0 <= u[0] < u[1]:
                raise ValidationError(f"{where}.units", f"got {self.units!r}, expected (start, "
                                      "stop) with 0 <= start < stop.")
            object.__setattr__(self, "units", u)

    @property
    def key(self) -> str:
        if self.name:
            return self.name
        if self.phase and self.target.endswith((".r", ".drive")):
            return f"{self.target}@{self.phase}"
        return self.target


class AbstractMonitor:
    """Base of custom monitors: ``build(pb, index) -> meta`` computes what it records with array
    expressions through the :class:`~neurosim.compiler.PlanBuilder` (``pb.let``, ``pb.assign``,
    usually inside ``with pb.at("trial_end"), pb.every(n):``, i.e. after the rules' updates,
    before the optimizer step), records with ``pb.record(index, handle)`` (rows),
    ``pb.record_norm(index, handle)`` or ``pb.record_angle(index, a, b)`` (degrees), and returns
    the layout dict ``{"key", "kind": "stat" | "var", "size", "per": "trial", "every"}``.
    """

    def build(self, pb, index: int) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class Trace:
    """Recorded values with an explicit time axis; arrays are read-only views.

    Attributes
    ----------
    name : str
    values : ndarray (n, units) or (n,) for scalar statistics
    t : ndarray (n,)
        Simulated time in seconds (``t_unit == "s"``) or trial index (``t_unit == "trial"``).
    t_unit : str
    trial, step : ndarray (n,) int64
        Trial index and global time-step index of each record.
    """

    def __init__(self, name, values, t, t_unit, trial, step):
        self.name = name
        self.values = _ro(np.asarray(values))
        self.t = _ro(np.asarray(t, dtype=np.float64))
        self.t_unit = t_unit
        self.trial = _ro(np.asarray(trial, dtype=np.int64))
        self.step = _ro(np.asarray(step, dtype=np.int64))

    def __len__(self):
        return len(self.t)

    def __repr__(self):
        return f"Trace({self.name!r}, n={len(self)}, shape={self.values.shape}, t in {self.t_unit})"

    def to_dict(self) -> dict:
        return {"values": np.asarray(self.values), "t": np.asarray(self.t),
                "trial": np.asarray(self.trial), "step": np.asarray(self.step)}


def _ro(a):
    a = a.view()
    a.setflags(write=False)
    return a
