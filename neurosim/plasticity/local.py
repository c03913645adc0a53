"""Local plasticity rules for any circuit, written as array expressions.

Each rule changes one projection ``W`` (post x pre) from the rates of its own pre- and
postsynaptic populations in one phase (``phase``; default the first), either once at the end of
the phase (``timing="end"``) or at every time step of it (``timing="continuous"``, time mode:
the update is the time average over the phase's steps). Updates are summed over the minibatch
and written in the descent direction the optimizer applies (``W <- W - lr dW / B``), so the
learning rate is the optimizer's.

:class:`Oja` is the worked example of docs/engine.md ("Writing a rule").
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError
from ..params import check_choice
from .base import PlasticityRule, register_builder


@dataclass(frozen=True)
class Oja(PlasticityRule):
    """Oja's rule (Oja 1982): ``dW/dt = y (x - W^T y)^T`` per sample, ``y`` the post- and ``x``
    the presynaptic rate. For a linear neuron it converges to the unit-norm first principal
    component of the input's (uncentred) second-moment matrix."""

    projection: str
    phase: str | None = None
    timing: str = "end"
    name: str = "oja"

    def __post_init__(self):
        check_choice("Oja.timing", self.timing, ("end", "continuous"))

    def modifies(self, pb):
        return [self.projection]

    def reads(self, pb):
        return []


@register_builder(Oja)
def build_oja(pb, rule: Oja):
    proj = pb.require_projection(rule.projection, "Oja.projection")
    phase, section, avg = local_timing(pb, rule, "Oja")
    with pb.at(section):
        x, y, W = pb.r(proj.pre_population, phase), pb.r(proj.post, phase), pb.W(proj.name)
        # sum_b y_b (x_b - W^T y_b)^T = Y^T X - (Y^T Y) W; ascent, so the update is its negative
        pb.update(proj.name, avg * ((y.T @ y) @ W - y.T @ x))


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
