"""Exception and warning types of neurosim.

Every error a user can trigger by bad input is a :class:`ValidationError`, which is also a
``ValueError`` so that existing ``except ValueError`` code keeps working. Messages follow one
pattern: ``object.attribute: what was given; what was expected. Hint.``
"""

from __future__ import annotations


class NeurosimError(Exception):
    """Base class of every exception raised by neurosim."""


class _Located:
    """The ``where`` / ``message`` / ``hint`` pattern shared by the error types."""

    def __init__(self, where: str, message: str, hint: str | None = None):
        self.where = where
        self.message = message
        self.hint = hint
        text = f"{where}: {message}"
        if hint:
            text += f" Hint: {hint}"
        Exception.__init__(self, text)


class ValidationError(_Located, NeurosimError, ValueError):
    """Bad input: a description, a scenario key, a file. Raised before anything is written.

    Parameters
    ----------
    where
        The object.attribute or key path that was wrong, e.g. ``"Population.tau"`` or
        ``"training.lr"``.
    message
        What was given and what was expected.
    hint
        A likely fix (optional).
    """


class ResourceError(_Located, NeurosimError):
    """The file system or the machine refused: a full disk, a read-only or unreadable folder, a
    path blocked by a file, too little memory, or a run directory locked by another process.

    Same ``where`` / ``message`` / ``hint`` pattern as :class:`ValidationError`; ``where`` is the
    path concerned. Not an ``OSError``, so that generic ``except OSError`` fallbacks do not
    swallow it.
    """


class FolderLockedError(ResourceError):
    """A run or sweep folder is held by another live process (``pid``, None when unknown)."""

    def __init__(self, where: str, message: str, hint: str | None = None, pid: int | None = None):
        self.pid = pid
        super().__init__(where, message, hint)


class DataError(ValidationError):
    """A dataset file is missing, truncated or fails its checksum."""


class CompileError(NeurosimError):
    """A circuit and protocol cannot be turned into a plan (inconsistent descriptions)."""


class SimulationError(NeurosimError, RuntimeError):
    """A compiled kernel reported a failure (NaN/inf, runaway weights).

    Attributes name where it happened: ``phase``, ``step``, ``population`` or ``projection``.
    """

    def __init__(self, message: str, *, phase=None, step=None, population=None,
                 projection=None, hint=None):
        self.phase = phase
        self.step = step
        self.population = population
        self.projection = projection
        self.hint = hint
        parts = [message]
        loc = []
        if phase is not None:
            loc.append(f"phase {phase!r}")
        if step is not None:
            loc.append(f"step {step}")
        if population is not None:
            loc.append(f"population {population!r}")
        if projection is not None:
            loc.append(f"projection {projection!r}")
        if loc:
            parts.append("(" + ", ".join(loc) + ")")
        if hint:
            parts.append(f"Hint: {hint}")
        super().__init__(" ".join(parts))


class NeurosimWarning(UserWarning):
    """Category of every warning neurosim emits; filter it with ``warnings.filterwarnings``."""


class BareTimeWarning(NeurosimWarning):
    """A time constant or duration given as a bare number of 1 s or more (``tau=10`` is ten
    seconds, not ten milliseconds). Give a unit (``"10 ms"``, ``10*ms``, ``"10 s"``) to silence
    it."""
