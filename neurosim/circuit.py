"""Circuit descriptions: populations of rate neurons and the projections between them.

Descriptions are frozen and validated when created; they hold no state. Learned weights live
in the compiled plan (see :mod:`neurosim.simulator`).

A population follows ``tau dr/dt = -r + mask * f(drive)`` (tau > 0) or ``r = mask * f(drive)``
(tau = 0, instantaneous), where ``drive = sum of active projections + stimulus + bias``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ValidationError
from .init import AbstractInit, HeUniform, as_init
from .optable import ERF, IDENTITY, RELU, RMS_NORM, SIGMOID, SOFTMAX, TANH
from .params import check_choice, check_float, check_int, check_name
from .units import to_seconds

TRANSFERS = {"identity": IDENTITY, "linear": IDENTITY, "relu": RELU, "tanh": TANH,
             "sigmoid": SIGMOID, "erf": ERF, "softmax": SOFTMAX}
"""Transfer functions by name; ``erf`` is erf(x / sqrt(2)) (the teacher-student activation)."""

ROLES = ("feedforward", "feedback")


@dataclass(frozen=True)
class Population:
    """A named group of rate neurons.

    Parameters
    ----------
    name : str
        Unique within the circuit.
    size : int
        Number of units (> 0).
    tau : float, brian2 quantity or str
        Time constant in seconds; 0 means instantaneous (``r = f(drive)``).
    transfer : str
        One of ``identity``, ``relu``, ``tanh``, ``sigmoid``, ``erf`` (erf(x/sqrt 2)),
        ``softmax`` (row-wise, for an output layer).
    bias : float or array of shape (size,), optional
        Fixed offset added to the drive.
    dropout : float
        Drop probability during training trials (inverted dropout; one mask per trial shared by
        all its phases). 0 disables it.
    normalize : None or ``"rms"``
        ``"rms"``: the output is normalised per sample to unit root mean square,
        ``r = f(drive) / (eps + sqrt(mean_j f(drive)_j^2))`` (steady state) or
        ``tau dr/dt = -r + that`` (time mode), ``eps = 1e-8``
        (:data:`neurosim.kernels.ops.RMS_EPS`); Forward-Forward's layers. Projections from it
        transmit the normalised rate; the un-normalised activity ``f(drive)`` stays available
        from the held drive. With dropout the mask multiplies the normalised rate. Not for
        softmax; the derivative is not element-wise, so rules that need ``f'`` (BP, FA, DFA,
        AFA) refuse such a population.
    """

    name: str
    size: int
    tau: float = 0.0
    transfer: str = "identity"
    bias: object = None
    dropout: float = 0.0
    normalize: str | None = None

    def __post_init__(self):
        check_name("Population", self.name)
        where = f"Population({self.name!r})"
        check_int(f"{where}.size", self.size, low=1)
        object.__setattr__(self, "tau", to_seconds(self.tau, f"{where}.tau", warn_bare=True))
        check_choice(f"{where}.transfer", self.transfer, tuple(TRANSFERS))
        check_float(f"{where}.dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if self.dropout and self.transfer == "softmax":
            raise ValidationError(f"{where}.dropout", "dropout on a softmax population is not "
                                  "supported (the output layer has no dropout).")
        if self.normalize is not None:
            check_choice(f"{where}.normalize", self.normalize, ("rms",))
            if self.transfer == "softmax":
                raise ValidationError(f"{where}.transfer", "softmax output is already "
                                      "normalised; an RMS-normalised population needs an "
                                      "element-wise transfer.", "use transfer='relu' or "
                                      "'identity'.")
        if self.bias is not None:
            try:
                b = np.asarray(self.bias, dtype=np.float32)
            except (TypeError, ValueError):
                raise ValidationError(f"{where}.bias", f"got {type(self.bias).__name__} "
                                      f"{self.bias!r:.60}, expected a number or an array of "
                                      f"{self.size} numbers.") from None
            if b.ndim == 0:
                b = np.full(self.size, float(b), np.float32)
            if b.shape != (self.size,):
                raise ValidationError(f"{where}.bias", f"shape {b.shape}, expected ({self.size},).")
            if not np.all(np.isfinite(b)):
                raise ValidationError(f"{where}.bias", "contains NaN or inf.")
            b.setflags(write=False)
            object.__setattr__(self, "bias", b)

    @property
    def code(self) -> int:
        """Transfer code of the kernels (``RMS_NORM`` added for a normalised population)."""
        return TRANSFERS[self.transfer] + (RMS_NORM if self.normalize else 0)

    @property
    def base_code(self) -> int:
        """Transfer code of ``f`` alone."""
        return TRANSFERS[self.transfer]


@dataclass(frozen=True)
class ErrorPopulation:
    """``r = output - target``: the output population's rate minus a target stimulus.

    Instantaneous by construction. ``target`` names the stimulus (e.g. ``"t"``) that each
    phase supplies through ``Phase.clamp``.
    """

    name: str
    output: str
    size: int
    target: str = "t"

    def __post_init__(self):
        check_name("ErrorPopulation", self.name)
        check_int(f"ErrorPopulation({self.name!r}).size", self.size, low=1)

    tau = 0.0
    transfer = "identity"
    bias = None
    dropout = 0.0
    code = IDENTITY


@dataclass(frozen=True)
class Projection:
    """Weights ``W`` (post x pre) adding ``gain * W @ r_pre`` to the drive of ``post``.

    Parameters
    ----------
    name : str
    pre : str
        Source population; ``"pop@phase"`` reads the rate that population held at the end of
        that phase (PEPITA's top-down projection reads ``"error@clean"``).
    post : str
    init : initialiser, name or array
    role : ``"feedforward"`` or ``"feedback"`` (top-down)
    phases : tuple of str or None
        Phases in which the projection is active; None = all phases.
    plastic : bool
        Whether plasticity rules may change it.
    gain : float
        Fixed multiplier (PEPITA's modulation sign s = +-1 lives here).
    """

    name: str
    pre: str
    post: str
    init: object = field(default_factory=HeUniform)
    role: str = "feedforward"
    phases: tuple | None = None
    plastic: bool = True
    gain: float = 1.0

    def __post_init__(self):
        check_name("Projection", self.name)
        where = f"Projection({self.name!r})"
        for attr in ("pre", "post"):
            v = getattr(self, attr)
            if not isinstance(v, str) or not v:
                raise ValidationError(f"{where}.{attr}", f"got {v!r}, expected a population name.")
        if "@" in self.post:
            raise ValidationError(f"{where}.post", f"got {self.post!r}; a held trace cannot "
                                  "receive input, expected a population name.")
        object.__setattr__(self, "init", as_init(self.init, f"{where}.init"))
        check_choice(f"{where}.role", self.role, ROLES)
        if self.phases is not None:
            if not isinstance(self.phases, (tuple, list)) or \
                    not all(isinstance(p, str) for p in self.phases):
                raise ValidationError(f"{where}.phases", f"got {self.phases!r}, expected a tuple "
                                      "of phase names or None (all phases).")
            object.__setattr__(self, "phases", tuple(self.phases))
        if not isinstance(self.plastic, bool):
            raise ValidationError(f"{where}.plastic", f"got {self.plastic!r}, expected True/False.")
        check_float(f"{where}.gain", self.gain)

    @property
    def pre_population(self) -> str:
        return self.pre.split("@", 1)[0]

    @property
    def pre_phase(self) -> str | None:
        return self.pre.split("@", 1)[1] if "@" in self.pre else None


class Circuit:
    """A named container of populations and projections, validated as they are added.

    Example
    -------
    >>> c = Circuit("tiny")
    >>> _ = c.population("x", 4)
    >>> _ = c.population("h", 3, transfer="relu", tau=0.01)
    >>> _ = c.project("x", "h", name="W1")
    >>> sorted(c.populations)
    ['h', 'x']
    """

    def __init__(self, name: str = "circuit"):
        self.name = check_name("Circuit", name)
        self.populations: dict[str, Population | ErrorPopulation] = {}
        self.projections: dict[str, Projection] = {}

    # -- building -------------------------------------------------------------------------------
    def add(self, obj):
        """Add a Population, ErrorPopulation or Projection; names are unique across both."""
        if isinstance(obj, (Population, ErrorPopulation)):
            self._check_free(obj.name)
            if isinstance(obj, ErrorPopulation):
                out = self._pop(obj.output, f"ErrorPopulation({obj.name!r}).output")
                if out.size != obj.size:
                    raise ValidationError(f"ErrorPopulation({obj.name!r}).size",
                                          f"got {obj.size}, expected the output size {out.size}.")
            self.populations[obj.name] = obj
        elif isinstance(obj, Projection):
            self._check_free(obj.name)
            where = f"Projection({obj.name!r})"
            self._pop(obj.pre_population, f"{where}.pre")
            post = self._pop(obj.post, f"{where}.post")
            if isinstance(post, ErrorPopulation):
                raise ValidationError(f"{where}.post", f"{obj.post!r} is an error population; its "
                                      "rate is output - target and takes no projections.")
            self.projections[obj.name] = obj
        else:
            raise ValidationError("Circuit.add", f"got {type(obj).__name__}, expected a "
                                  "Population, ErrorPopulation or Projection.")
        return obj

    def population(self, name, size, **kw) -> Population:
        return self.add(Population(name, size, **kw))

    def error(self, name, output, target="t") -> ErrorPopulation:
        out = self._pop(output, f"ErrorPopulation({name!r}).output")
        return self.add(ErrorPopulation(name, output, out.size, target))

    def project(self, pre, post, name=None, **kw) -> Projection:
        name = name or f"{pre.split('@')[0]}_to_{post}"
        return self.add(Projection(name, pre, post, **kw))

    def feedback(self, pre, post, name=None, **kw) -> Projection:
        """A top-down projection (role="feedback"), fixed unless ``plastic=True``."""
        kw.setdefault("plastic", False)
        kw.setdefault("role", "feedback")
        return self.project(pre, post, name=name, **kw)

    # -- queries --------------------------------------------------------------------------------
    def __getitem__(self, name):
        if name in self.populations:
            return self.populations[name]
        if name in self.projections:
            return self.projections[name]
        raise KeyError(f"Circuit {self.name!r} has no population or projection {name!r}")

    def shape_of(self, proj: Projection) -> tuple[int, int]:
        return (self.populations[proj.post].size, self.populations[proj.pre_population].size)

    def incoming(self, pop: str):
        return [p for p in self.projections.values() if p.post == pop]

    def _pop(self, name, where):
        if name not in self.populations:
            import difflib

            close = difflib.get_close_matches(name, list(self.populations), n=1)
            raise ValidationError(where, f"no population {name!r} in circuit {self.name!r} "
                                  f"(has {sorted(self.populations)}).",
                                  f"did you mean {close[0]!r}?" if close else
                                  "add the population before projections that use it.")
        return self.populations[name]

    def _check_free(self, name):
        if name in self.populations or name in self.projections:
            raise ValidationError(f"Circuit({self.name!r})", f"the name {name!r} is already used; "
                                  "population and projection names must be unique.")

    def __repr__(self):
        return (f"Circuit({self.name!r}, populations={list(self.populations)}, "
                f"projections={list(self.projections)})")
