"""Backprop and the feedback-alignment family as plasticity rules: BP, FA, DFA and AFA.

All four read one phase (default ``"clean"``): the rates ``h_l`` and drives ``a_l`` held at its
end and the output error ``e = h_L - t`` (the cross-entropy gradient w.r.t. the softmax logits).
Updates are summed over the batch (the optimizer divides by B), descent direction:

* output layer: ``dW_L = e^T h_{L-1}``;
* hidden layers: ``dW_l = delta_l^T h_{l-1}`` with
  - BP:  ``delta_l = (delta_{l+1} W_{l+1}) * f'(a_l)`` (exact gradient; **non-local**: it needs
    the forward weights downstream, the "weight transport" no brain can do);
  - FA:  ``delta_l = (delta_{l+1} B_{l+1}) * f'(a_l)``, fixed random ``B_{l+1}`` shaped like
    ``W_{l+1}`` (Lillicrap et al. 2016);
  - DFA: ``delta_l = (e D_l) * f'(a_l)``, fixed random ``D_l`` (n_out x n_l) (Nokland 2016);
  - AFA: the first-order expansion of PEPITA: ``u_0 = s e F^T``,
    ``u_l = (u_{l-1} W_l^T) * f'(a_l)``, ``delta_l = -u_l`` — for one hidden layer DFA with the
    adaptive feedback ``B_1 = -s W_1 F`` (recomputed every step as W_1 learns).

With dropout, ``f'`` includes the trial's mask (``h = mask * f(a)``). A projection gain g
(``drive = g W h``) enters as the chain rule says: BP/FA/DFA updates are ``g delta^T h`` and BP
propagates through ``g W``; AFA propagates its perturbation through ``g W`` and, like the PEPITA
update it approximates, applies no gain to its own update.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError
from ..init import HeUniform, as_init
from ..rng import component_rng
from .base import PlasticityRule, register_builder


@dataclass(frozen=True)
class _Chain(PlasticityRule):
    phase: str = "clean"
    error: str = "error"
    name: str = "rule"

    def modifies(self, pb):
        return list(_chain(pb, self)[0])

    def reads(self, pb):
        return []


@dataclass(frozen=True)
class BP(_Chain):
    """Exact gradient of the cross-entropy (non-local: uses W^T downstream)."""

    name: str = "bp"


@dataclass(frozen=True)
class FA(_Chain):
    """Feedback alignment: fixed random B_l in place of W_l^T."""

    feedback_init: object = None
    name: str = "fa"

    def __post_init__(self):
        object.__setattr__(self, "feedback_init",
                           as_init(self.feedback_init or HeUniform(), "FA.feedback_init"))


@dataclass(frozen=True)
class DFA(_Chain):
    """Direct feedback alignment: the output error reaches each hidden layer through a fixed
    random matrix D_l (n_out x n_l); default He-uniform on that shape, U(+-sqrt(6 / n_l))."""

    feedback_init: object = None
    name: str = "dfa"

    def __post_init__(self):
        object.__setattr__(self, "feedback_init",
                           as_init(self.feedback_init or HeUniform(), "DFA.feedback_init"))


@dataclass(frozen=True)
class AFA(_Chain):
    """Adaptive feedback alignment, the rule PEPITA approximates (see module docstring).

    ``feedback`` names the top-down projection F (error -> input) whose gain is the sign s.
    """

    feedback: str = "F"
    name: str = "afa"


def _chain(pb, rule):
    """Feedforward plastic projections from the input to the error's output, input side first,
    and the populations along the way."""
    c = pb.circuit
    err = pb.require_error(rule.error, f"{type(rule).__name__}.error")
    pb.require_phase(rule.phase, f"{type(rule).__name__}.phase")
    projs, pops = [], [err.output]
    pop = err.output
    while True:
        inc = [p for p in c.projections.values()
               if p.post == pop and p.role == "feedforward" and p.pre_phase is None]
        if not inc:
            break
        if len(inc) > 1:
            raise ValidationError(f"{type(rule).__name__}", f"population {pop!r} has several "
                                  f"feedforward inputs {[p.name for p in inc]}; the rule needs a "
                                  "layered chain.")
        projs.append(inc[0].name)
        pop = inc[0].pre_population
        pops.append(pop)
    if not projs:
        raise ValidationError(f"{type(rule).__name__}", f"no feedforward projection into "
                              f"{err.output!r}.")
    return projs[::-1], pops[::-1]


@register_builder(BP)
@register_builder(FA)
@register_builder(DFA)
@register_builder(AFA)
def build_feedback_alignment(pb, rule):
    c = pb.circuit
    projs, pops = _chain(pb, rule)
    ph = rule.phase
    L = len(projs)
    kind = type(rule).__name__
    gain = [c.projections[p].gain for p in projs]
    with pb.at("trial_end"):
        e = pb.r(rule.error, ph)
        # delta[l]: the error signal at the output of projs[l] (pops[l + 1]); h_l = pb.r(pops[l])
        delta = {L - 1: e}
        if kind == "AFA":
            fb = pb.require_projection(rule.feedback, "AFA.feedback")
            if fb.post != pops[0]:
                raise ValidationError("AFA.feedback", f"{fb.name!r} projects to {fb.post!r}, "
                                      f"expected the input population {pops[0]!r}.")
            # u_0 = s e F^T; u_l = (g_l u_{l-1} W_l^T) f'(a_l); delta_l = -u_l (sign in update)
            u = pb.let(fb.gain * (e @ pb.W(fb.name).T))
            for l in range(L - 1):
                u = delta[l] = pb.let(gain[l] * (u @ pb.W(projs[l]).T) * pb.fprime(pops[l + 1], ph))
        else:
            for l in range(L - 2, -1, -1):
                fp = pb.fprime(pops[l + 1], ph)
                if kind == "BP":      # delta_l = g_{l+1} (delta_{l+1} W_{l+1}) f'(a_l)
                    back = gain[l + 1] * (delta[l + 1] @ pb.W(projs[l + 1]))
                elif kind == "FA":    # a fixed random B_{l+1} in place of W_{l+1}
                    back = delta[l + 1] @ _fixed(pb, rule, f"{rule.name}.{projs[l + 1]}.B",
                                                 f"{rule.name}:B:{projs[l + 1]}",
                                                 c.shape_of(c.projections[projs[l + 1]]))
                else:                 # DFA: the output error through a fixed random D_l
                    back = e @ _fixed(pb, rule, f"{rule.name}.{pops[l + 1]}.D",
                                      f"{rule.name}:D:{pops[l + 1]}",
                                      (c.populations[pops[-1]].size, c.populations[pops[l + 1]].size))
                delta[l] = pb.let(back * fp)
        for l in range(L):
            # AFA: PEPITA's update to first order (no gain factor); else d drive / dW = g pre
            alpha = (-1.0 if l < L - 1 else 1.0) if kind == "AFA" else gain[l]
            pb.update(projs[l], alpha * (delta[l].T @ pb.r(pops[l], ph)))


def _fixed(pb, rule, name, stream, shape):
    """A fixed random feedback matrix (rule state), drawn from the seed's stream ``stream``."""
    return pb.state(name, *shape, init=rule.feedback_init.sample(shape,
                                                                 component_rng(pb.seed, stream)))
