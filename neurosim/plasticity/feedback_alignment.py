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


def _fprime(pb, dst, pop, phase):
    """dst *= f'(a_pop) [* mask]."""
    pb.deriv(dst, pb.drive(pop, phase), pop)
    if pb.circuit.populations[pop].dropout > 0:
        pb.mul(dst, dst, pb.buffer(f"{pop}.mask", 0, pb.circuit.populations[pop].size, True,
                                   kind="state"))


@register_builder(BP)
@register_builder(FA)
@register_builder(DFA)
@register_builder(AFA)
def build_feedback_alignment(pb, rule):
    c = pb.circuit
    projs, pops = _chain(pb, rule)
    ph = rule.phase
    L = len(projs)
    err = pb.rate(rule.error, ph)
    kind = type(rule).__name__
    with pb.at("trial_end"):
        # deltas[l] for layer index l (0-based: projs[l] maps pops[l] -> pops[l+1])
        delta = {L - 1: err}
        if kind == "AFA":
            fb = pb.require_projection(rule.feedback, "AFA.feedback")
            if fb.post != pops[0]:
                raise ValidationError("AFA.feedback", f"{fb.name!r} projects to {fb.post!r}, "
                                      f"expected the input population {pops[0]!r}.")
            u = pb.scratch(f"{rule.name}.u0", c.populations[pops[0]].size)
            # u_0 = s e F^T   (F is (d_in, n_out)); u_l = (u_{l-1} W_l^T) * f'(a_l);
            # delta_l = -u_l, applied as alpha = -1 in the update GEMM below
            pb.gemm(u, err, pb.weight(fb.name), trans_b=True, alpha=fb.gain)
            for l in range(L - 1):
                nxt = pb.scratch(f"{rule.name}.u{l + 1}", c.populations[pops[l + 1]].size)
                pb.gemm(nxt, u, pb.weight(projs[l]), trans_b=True,
                        alpha=c.projections[projs[l]].gain)
                _fprime(pb, nxt, pops[l + 1], ph)
                delta[l] = nxt
                u = nxt
        else:
            for l in range(L - 2, -1, -1):
                d = pb.scratch(f"{rule.name}.delta{l}", c.populations[pops[l + 1]].size)
                if kind == "BP":
                    pb.gemm(d, delta[l + 1], pb.weight(projs[l + 1]),
                            alpha=c.projections[projs[l + 1]].gain)
                elif kind == "FA":
                    post, pre = c.shape_of(c.projections[projs[l + 1]])
                    B = rule.feedback_init.sample((post, pre),
                                                  component_rng(pb.seed, f"{rule.name}:B:{projs[l + 1]}"))
                    Bi = pb.persistent(f"{rule.name}.{projs[l + 1]}.B", post, pre, init=B)
                    pb.gemm(d, delta[l + 1], Bi)
                else:  # DFA
                    n_out, n_l = c.populations[pops[-1]].size, c.populations[pops[l + 1]].size
                    D = rule.feedback_init.sample((n_out, n_l),
                                                  component_rng(pb.seed, f"{rule.name}:D:{pops[l + 1]}"))
                    Di = pb.persistent(f"{rule.name}.{pops[l + 1]}.D", n_out, n_l, init=D)
                    pb.gemm(d, err, Di)
                _fprime(pb, d, pops[l + 1], ph)
                delta[l] = d
        for l in range(L):
            dW, beta = pb.grad(projs[l])
            if kind == "AFA":   # PEPITA's update, to first order: no gain factor
                alpha = -1.0 if l < L - 1 else 1.0
            else:               # d drive / dW = gain * pre
                alpha = c.projections[projs[l]].gain
            pb.gemm(dW, delta[l], pb.rate(pops[l], ph), trans_a=True, alpha=alpha, beta=beta)
