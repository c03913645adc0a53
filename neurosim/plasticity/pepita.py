"""PEPITA (Dellaferrera & Kreiman 2022; Srinivasan et al. 2024) as a plasticity rule.

Two passes per trial: ``clean`` (x) and ``modulated`` (x + s F e, with e the clean-pass output
error held at the end of the clean phase and s the gain of the top-down projection F). Updates
(summed over the batch; the optimizer divides by B):

* hidden layer l < L: ``dW_l = (h_l - h~_l)^T h~_{l-1}``   (``presynaptic="modulated"``)
  or ``(h_l - h~_l)^T h_{l-1}`` (the "forward" variant, ``presynaptic="clean"``);
* last layer: ``dW_L = e~^T h~_{L-1}`` (``last_layer_error="modulated"``, ICML 2022) or
  ``e^T h~_{L-1}`` (``"clean"``, ICLR 2024).

The two published conventions are :data:`CONVENTIONS`: ``icml2022`` (s = +1, modulated error,
the default) and ``iclr2024`` (s = -1, clean error). The sign s is the gain of the feedback
projection (see :func:`neurosim.models.pepita.build`); the rule checks that they agree.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ..errors import CompileError, NeurosimWarning, ValidationError
from ..params import check_choice
from .base import PlasticityRule, register_builder

CONVENTIONS = {
    "icml2022": {"sign": +1.0, "last_layer_error": "modulated"},
    "iclr2024": {"sign": -1.0, "last_layer_error": "clean"},
}


@dataclass(frozen=True)
class PEPITA(PlasticityRule):
    """PEPITA plasticity on every plastic feedforward projection (or ``projections``).

    Parameters
    ----------
    convention : ``"icml2022"`` or ``"iclr2024"``
        Sets the default ``last_layer_error``; also checked against the sign of F.
    last_layer_error : ``"modulated"``, ``"clean"`` or None (from the convention)
    presynaptic : ``"modulated"`` (standard) or ``"clean"`` (the "forward" variant)
    clean, modulated : phase names
    error : name of the error population
    feedback : name of the top-down projection (for the sign check); None = any feedback
        projection into the input.
    projections : projection names, or None for all plastic feedforward projections
    timing : ``"end"`` or ``"continuous"``
        ``end`` (default): one update from the activities held at the phase ends.
        ``continuous`` (time mode only): the update is accumulated at every time step of the
        modulated phase from the live modulated activities, ``dW = (1/n) sum_t
        (h_l - h~_l(t))^T h~_{l-1}(t)``, i.e. its time average; it tends to the ``end`` update
        as the phase grows long compared with tau.
    """

    convention: str = "icml2022"
    last_layer_error: str | None = None
    presynaptic: str = "modulated"
    clean: str = "clean"
    modulated: str = "modulated"
    error: str = "error"
    feedback: str | None = None
    projections: tuple | None = None
    timing: str = "end"
    name: str = "pepita"

    def __post_init__(self):
        check_choice("PEPITA.convention", self.convention, tuple(CONVENTIONS))
        if self.last_layer_error is None:
            object.__setattr__(self, "last_layer_error",
                               CONVENTIONS[self.convention]["last_layer_error"])
        check_choice("PEPITA.last_layer_error", self.last_layer_error, ("modulated", "clean"))
        check_choice("PEPITA.presynaptic", self.presynaptic, ("modulated", "clean"))
        check_choice("PEPITA.timing", self.timing, ("end", "continuous"))
        if self.projections is not None:
            object.__setattr__(self, "projections", tuple(self.projections))

    def modifies(self, pb):
        if self.projections is not None:
            return list(self.projections)
        return [p.name for p in pb.circuit.projections.values()
                if p.plastic and p.role == "feedforward"]

    def reads(self, pb):
        return []


@register_builder(PEPITA)
def build_pepita(pb, rule: PEPITA):
    """Emit PEPITA's updates at the end of the trial (or at every step of the modulated phase)."""
    c = pb.circuit
    for ph in (rule.clean, rule.modulated):
        pb.require_phase(ph, f"PEPITA.{'clean' if ph == rule.clean else 'modulated'}")
    err = pb.require_error(rule.error, "PEPITA.error")
    _check_sign(pb, rule, err)
    pre_phase = rule.modulated if rule.presynaptic == "modulated" else rule.clean
    err_phase = rule.modulated if rule.last_layer_error == "modulated" else rule.clean
    if rule.timing == "continuous":
        if pb.protocol.mode != "time":
            raise ValidationError("PEPITA.timing", "'continuous' needs a time-mode protocol.",
                                  "use timing='end' in steady mode.")
        # the time average of the live modulated-pass update over the phase's steps
        section = f"{rule.modulated}:loop"
        alpha = 1.0 / pb.protocol.n_steps(pb.protocol.phase(rule.modulated))
    else:
        section, alpha = "trial_end", 1.0
    with pb.at(section):
        for name in rule.modifies(pb):
            proj = pb.require_projection(name, "PEPITA.projections")
            x = pb.r(proj.pre_population, pre_phase)
            if proj.post == err.output:     # e^T x  (e: modulated or clean output error)
                post = pb.r(err.name, err_phase)
            else:                           # (h - h~)^T x
                post = pb.r(proj.post, rule.clean) - pb.r(proj.post, rule.modulated)
            pb.update(name, alpha * (post.T @ x))


def _check_sign(pb, rule, err):
    fbs = [p for p in pb.circuit.projections.values()
           if p.role == "feedback" and p.pre_population == err.name
           and (rule.feedback is None or p.name == rule.feedback)]
    if rule.feedback is not None and not fbs:
        raise CompileError(f"PEPITA.feedback: no feedback projection {rule.feedback!r} from the "
                           f"error population {err.name!r}.")
    want = CONVENTIONS[rule.convention]["sign"]
    for p in fbs:
        if p.gain * want < 0:
            warnings.warn(f"PEPITA convention {rule.convention!r} expects modulation sign "
                          f"{want:+.0f} but projection {p.name!r} has gain {p.gain:+g}; the run "
                          "mixes the two published conventions.", NeurosimWarning, stacklevel=3)
