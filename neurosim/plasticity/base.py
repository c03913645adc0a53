"""The plasticity-rule interface.

A rule is a frozen description (hyperparameters only). Its executable side is a *build
function* registered with :func:`register_builder`; at compile time it receives the
:class:`neurosim.compiler.PlanBuilder` and emits operations that write the summed-over-batch
update ``dW`` of each projection it modifies (descent direction: the optimizer applies
``W <- W - lr * dW / B`` with momentum). The rule reads traces ``pop@phase`` (rates and drives
held at phase ends) through the builder; the optimizer is separate (:mod:`.optim`).
Adding a rule means one description, one build function; nothing in the simulator changes.
"""

from __future__ import annotations

from ..errors import CompileError

_BUILDERS: dict[type, object] = {}


class PlasticityRule:
    """Abstract base of rule descriptions.

    Subclasses are frozen dataclasses with a ``name`` and declare what they touch through
    :meth:`modifies` and :meth:`reads` (both may depend on the circuit and protocol, passed as
    the builder ``pb``).
    """

    name: str = "rule"

    def modifies(self, pb) -> list[str]:  # pragma: no cover - abstract
        """Names of the projections whose ``dW`` this rule writes."""
        raise NotImplementedError

    def reads(self, pb) -> list[str]:  # pragma: no cover - abstract
        """Traces (``"pop@phase"``, ``"pop.drive@phase"``) the rule reads."""
        raise NotImplementedError


def register_builder(rule_type):
    """Decorator: ``@register_builder(MyRule) def build_myrule(pb, rule): ...``."""

    def deco(fn):
        _BUILDERS[rule_type] = fn
        return fn

    return deco


def builder_for(rule) -> object:
    for cls in type(rule).__mro__:
        if cls in _BUILDERS:
            return _BUILDERS[cls]
    raise CompileError(f"no build function registered for rule type {type(rule).__name__}; "
                       "decorate one with neurosim.plasticity.register_builder.")
