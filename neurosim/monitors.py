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
        ``"pop.r"`` or ``"pop.drive"``; ``"proj.w"`` (the weights, after each trial's update),
        ``"proj.dw"`` (the rules' summed update of the trial, descent direction, before the
        optimizer's lr/B and momentum; recording it keeps the update explicit, so the momentum
        step is not fused into its GEMM), ``"proj.norm"``, ``"proj.update_norm"``;
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
    synapses : sequence of (post, pre) pairs, optional
        With ``"proj.w"`` / ``"proj.dw"``: record only these entries of the matrix (default: the
        whole matrix, values of shape (records, post, pre)).
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
    synapses: tuple | None = None

    def __post_init__(self):
        where = f"Monitor({self.target!r})"
        if self.synapses is not None:
            syn = self.synapses
            ok = isinstance(syn, (tuple, list)) and len(syn) > 0 and all(
                isinstance(p, (tuple, list)) and len(p) == 2 and
                all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0
                    for v in p) for p in syn)
            if not ok:
                raise ValidationError(f"{where}.synapses", f"got {syn!r}, expected a non-empty "
                                      "list of (post, pre) index pairs.")
            object.__setattr__(self, "synapses", tuple((int(i), int(j)) for i, j in syn))
        if not isinstance(self.target, str) or not (
                "." in self.target or self.target.startswith("angle:")):
            raise ValidationError(f"{where}.target", f"got {self.target!r}, expected "
                                  "'population.r', 'population.drive', 'projection.w', "
                                  "'projection.dw', 'projection.norm', "
                                  "'projection.update_norm' or 'angle:F'.")
        if isinstance(self.every, str):
            raise ValidationError(f"{where}.every", f"got {self.every!r}, expected a whole number "
                                  "of trials or time steps.",
                                  "intervals in epochs are resolved by scenarios; in Python give "
                                  "trials, e.g. every = max(1, round(0.1 * ceil(n_train / batch))) "
                                  "for ten records per epoch.")
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

    Per-trial views (time-mode recordings hold many records per trial)::

        tr = sim.traces["E.r"]          # short key of "E.r@stim"
        tr.trials                       # the trials that have records, ascending
        tr.in_trial(3)                  # a Trace of trial 3's records only
        tr.in_trial(-1)                 # ... of the last recorded trial
        t, v = tr.by_trial()            # t: (k,) time since each trial's first record,
                                        # v: (trials, k, units), when every trial has k records
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

    @property
    def trials(self) -> np.ndarray:
        """The trial indices that have at least one record, ascending."""
        return np.unique(self.trial)

    def in_trial(self, k: int) -> "Trace":
        """The records of trial ``k`` as a Trace (same time axis). ``k`` is a trial index as in
        :attr:`trial`; a negative ``k`` counts from the last recorded trial (-1: the last)."""
        trials = self.trials
        where = f"Trace({self.name!r}).in_trial"
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise ValidationError(where, f"got {type(k).__name__} {k!r}, expected a trial index.")
        if k < 0:
            if -k > len(trials):
                raise ValidationError(where, f"got {k}, but only {len(trials)} trials have "
                                      "records.")
            k = int(trials[k])
        if k not in set(trials.tolist()):
            shown = (f"{trials[:3].tolist()} ... {trials[-3:].tolist()}" if len(trials) > 6
                     else f"{trials.tolist()}")
            raise ValidationError(where, f"trial {k} has no records; recorded trials: {shown}.",
                                  "monitors with every > 1 record only every k-th trial.")
        sel = self.trial == k
        return Trace(self.name, self.values[sel], self.t[sel], self.t_unit, self.trial[sel],
                     self.step[sel])

    def by_trial(self):
        """``(t, values)`` with one row per recorded trial: ``values`` has shape (trials,
        records per trial, ...) and ``t`` (records per trial,) is the time since each trial's
        first record, in :attr:`t_unit`. Refused (ValidationError) when the trials hold
        different numbers of records (e.g. ``every`` does not divide the steps of a trial);
        :meth:`in_trial` works in every case."""
        trials, first, counts = np.unique(self.trial, return_index=True, return_counts=True)
        if len(trials) == 0:
            return np.zeros(0), self.values[:0][None]
        if np.any(counts != counts[0]):
            raise ValidationError(f"Trace({self.name!r}).by_trial", f"the trials hold between "
                                  f"{counts.min()} and {counts.max()} records, expected the same "
                                  "number in every trial.",
                                  "use in_trial(k) per trial, or make every divide the number of "
                                  "time steps per trial.")
        order = np.argsort(self.trial, kind="stable")
        values = self.values[order].reshape((len(trials), int(counts[0])) + self.values.shape[1:])
        t = self.t[order][: counts[0]] - self.t[order][0]
        return _ro(np.ascontiguousarray(t)), _ro(np.ascontiguousarray(values))


class Traces(dict):
    """The traces of a simulator, by key (``"hidden.r@clean"``, ``"angle:F"``).

    A key may be shortened when the short form names one trace only: ``traces["E.r"]`` is
    ``traces["E.r@stim"]`` if no other phase of ``E.r`` was recorded. An ambiguous or unknown key
    raises a KeyError that lists the candidates. Iteration, ``len`` and ``keys()`` use the full
    keys; ``in`` and :meth:`get` accept short keys like ``[]``.
    """

    def resolve(self, key) -> str:
        """The full key that ``key`` names (itself, or the unique trace whose key is ``key``
        followed by ``@phase``)."""
        if dict.__contains__(self, key):
            return key
        if not isinstance(key, str):
            raise KeyError(f"no trace {key!r}; traces: {sorted(self)}")
        hits = [k for k in self if k.split("@", 1)[0] == key]
        if len(hits) == 1:
            return hits[0]
        if hits:
            raise KeyError(f"{key!r} is ambiguous: it names the traces {sorted(hits)}; give the "
                           "full key")
        close = [k for k in self if key in k]
        raise KeyError(f"no trace {key!r}; traces: {sorted(close or self)}")

    def __getitem__(self, key) -> Trace:
        return dict.__getitem__(self, self.resolve(key))

    def __contains__(self, key) -> bool:
        try:
            self.resolve(key)
        except KeyError:
            return False
        return True

    def get(self, key, default=None):
        return self[key] if key in self else default


def _ro(a):
    a = a.view()
    a.setflags(write=False)
    return a
