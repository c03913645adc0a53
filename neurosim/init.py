"""Weight initialisers: frozen specs with ``sample(shape, rng)``. numpy only.

Shapes are (post, pre) = (fan_out, fan_in), as stored by projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import ValidationError
from .params import check_float


class AbstractInit:
    """Base class: ``sample(shape, rng) -> float32 array``."""

    def sample(self, shape, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class HeUniform(AbstractInit):
    """U(-g*sqrt(6/fan_in), +g*sqrt(6/fan_in)), the PEPITA reference forward init (g = 1)."""

    gain: float = 1.0

    def __post_init__(self):
        check_float("HeUniform.gain", self.gain, low=0.0)

    def sample(self, shape, rng):
        lim = self.gain * math.sqrt(6.0 / shape[1])
        return rng.uniform(-lim, lim, size=shape).astype(np.float32)


@dataclass(frozen=True)
class FanInUniform(AbstractInit):
    """U(-s*sqrt(6/fan), +s*sqrt(6/fan)) with fan = ``fan`` if given, else the post size.

    PEPITA's F (input x output) uses s = 0.05 and fan = d_in: ``FanInUniform(0.05, fan=784)``
    (``fan`` is keyword-only).
    """

    scale: float = 0.05
    fan: int | None = field(default=None, kw_only=True)

    def __post_init__(self):
        check_float("FanInUniform.scale", self.scale, low=0.0)

    def sample(self, shape, rng):
        fan = self.fan if self.fan is not None else shape[0]
        lim = self.scale * math.sqrt(6.0 / fan)
        return rng.uniform(-lim, lim, size=shape).astype(np.float32)


@dataclass(frozen=True)
class Uniform(AbstractInit):
    """U(-limit, +limit)."""

    limit: float = 0.1

    def __post_init__(self):
        check_float("Uniform.limit", self.limit, low=0.0)

    def sample(self, shape, rng):
        return rng.uniform(-self.limit, self.limit, size=shape).astype(np.float32)


@dataclass(frozen=True, init=False)
class Normal(AbstractInit):
    """N(mean, std^2), as numpy's ``normal(loc=mean, scale=std)``: ``Normal(mean=0.0, std=0.3)``.

    Both parameters are keyword-only: ``Normal(0.0, 0.3)`` is refused, because it reads as
    (mean, std) in numpy's order but meant (std, mean) in neurosim 0.1.
    """

    mean: float = 0.0
    std: float = 0.1

    def __init__(self, *args, mean: float = 0.0, std: float = 0.1):
        if args:
            raise ValidationError("Normal", f"got the positional arguments {args!r}; mean and std "
                                  "are keyword-only.",
                                  f"write Normal(mean=..., std=...), e.g. Normal(std={args[0]!r}) "
                                  "if you meant the old Normal(std, mean) order.")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        self.__post_init__()

    def __post_init__(self):
        check_float("Normal.std", self.std, low=0.0)
        check_float("Normal.mean", self.mean)

    def sample(self, shape, rng):
        return (self.mean + self.std * rng.standard_normal(size=shape)).astype(np.float32)


@dataclass(frozen=True)
class Zeros(AbstractInit):
    def sample(self, shape, rng):
        return np.zeros(shape, np.float32)


@dataclass(frozen=True, eq=False)
class Given(AbstractInit):
    """A fixed array (copied); its shape must match the projection."""

    array: np.ndarray

    def sample(self, shape, rng):
        a = np.asarray(self.array, dtype=np.float32)
        if a.shape != tuple(shape):
            raise ValidationError("Projection.init", f"given array has shape {a.shape}, expected "
                                  f"(post, pre) = {tuple(shape)}.", "did you pass W.T?")
        return a.copy()


_NAMED = {"he_uniform": HeUniform, "uniform": Uniform, "normal": Normal, "zeros": Zeros,
          "fan_in_uniform": FanInUniform}


def as_init(value, where: str) -> AbstractInit:
    """Accept an initialiser spec, a name (``"he_uniform"``), or an array."""
    if isinstance(value, AbstractInit):
        return value
    if isinstance(value, str):
        if value not in _NAMED:
            raise ValidationError(where, f"unknown initialiser {value!r}, expected one of "
                                  f"{sorted(_NAMED)} or an AbstractInit instance.")
        return _NAMED[value]()
    if isinstance(value, np.ndarray):
        return Given(value)
    raise ValidationError(where, f"got {type(value).__name__}, expected an initialiser "
                          "(e.g. HeUniform()), a name, or an array.")
