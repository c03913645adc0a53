"""Feedforward networks trained by BP, FA, DFA or AFA: the baselines PEPITA is compared with.

The circuit is PEPITA's (:func:`models.pepita.build_pepita_network`) without the modulated
pass: input -> hidden layers (ReLU, dropout) -> softmax output, an error population ``e = h_L -
t``, one phase ``clean``. Projection names (``W1``, ``W2``, ..., ``F``) and initialisers are the
same as PEPITA's, so with the same seed a BP/FA/DFA/AFA network starts from exactly the weights a
PEPITA network starts from (and draws the same dropout masks). For AFA the fixed top-down matrix
``F`` (input <- error, gain = the modulation sign s) is in the circuit but active in no phase: the
AFA rule reads it to form its adaptive feedback ``B_1 = -s W_1 F``.

Built only from neurosim's public API; usable in steady-state and time modes (in time mode the
rules read the rates and drives held at the end of the ``clean`` phase).

Rule summary (see :mod:`neurosim.plasticity.feedback_alignment`):

* ``bp``  exact gradient of the cross-entropy (**non-local**: needs W_{l+1}^T downstream);
* ``fa``  fixed random B_{l+1} in place of W_{l+1}^T (Lillicrap et al. 2016);
* ``dfa`` the output error reaches each hidden layer through a fixed random D_l (Nokland 2016);
* ``afa`` adaptive feedback alignment, the rule PEPITA approximates (algorithms.md 1.3).
"""

from __future__ import annotations

from dataclasses import dataclass

from .layers import layered_classifier
from neurosim import (AFA, BP, CONVENTIONS, DFA, FA, Circuit, FanInUniform, Phase,
                      Protocol, ValidationError)

RULES = {"bp": BP, "fa": FA, "dfa": DFA, "afa": AFA}


@dataclass(frozen=True)
class FeedforwardNetwork:
    """What :func:`build_feedforward_network` returns."""

    circuit: Circuit
    protocol: Protocol
    rule: object
    layers: tuple          # feedforward projection names, input side first
    feedback: str | None   # "F" for AFA, else None


def build_feedforward_network(sizes=(784, 1024, 10), rule="bp", *, dropout=0.1, hidden="relu",
                              mode="steady", tau=0.01, dt=0.001, phase_duration=0.1,
                              method="euler", f_scale=0.05, convention="icml2022",
                              with_feedback=None) -> FeedforwardNetwork:
    """Build circuit, protocol and rule of a layered network trained by ``rule``.

    Parameters
    ----------
    sizes : (d_in, h_1, ..., n_out), at least one hidden layer.
    rule : ``"bp"``, ``"fa"``, ``"dfa"`` or ``"afa"``.
    dropout : hidden-layer dropout (one mask per trial), as in the PEPITA reference setup.
    mode, tau, dt, phase_duration, method : as in :func:`models.pepita.build_pepita_network`.
    f_scale, convention : AFA's F ~ U(+-f_scale sqrt(6/d_in)) and its sign s
        (``icml2022``: +1, ``iclr2024``: -1), exactly PEPITA's F.
    with_feedback : include the (inactive) projection F; default: only for AFA.
    """
    sizes = tuple(sizes)
    if len(sizes) < 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in sizes):
        raise ValidationError("build_feedforward_network.sizes", f"got {sizes!r}, expected "
                              "(d_in, hidden..., n_out) with at least one hidden layer.")
    if rule not in RULES:
        raise ValidationError("build_feedforward_network.rule", f"got {rule!r}, expected one of "
                              f"{sorted(RULES)}.")
    if convention not in CONVENTIONS:
        raise ValidationError("build_feedforward_network.convention", f"got {convention!r}, "
                              f"expected one of {sorted(CONVENTIONS)}.")
    t = tau if mode == "time" else 0.0
    c, layers = layered_classifier(f"{rule}-{'-'.join(map(str, sizes))}", sizes,
                                   hidden=hidden, dropout=dropout, tau=t)
    fb = None
    if with_feedback is None:
        with_feedback = rule == "afa"
    if with_feedback:
        fb = "F"
        c.feedback("error@clean", "input", name="F", init=FanInUniform(f_scale, fan=sizes[0]),
                   gain=CONVENTIONS[convention]["sign"], phases=())
    kw = dict(duration=phase_duration) if mode == "time" else {}
    protocol = Protocol((Phase("clean", clamp={"input": "x"}, **kw),), mode=mode, dt=dt,
                        method=method)
    r = AFA(feedback="F") if rule == "afa" else RULES[rule]()
    return FeedforwardNetwork(c, protocol, r, tuple(layers), fb)


# -- scenario registration ------------------------------------------------------------------------
FEEDFORWARD_SCHEMA = {
    "sizes": ("list[int]", [784, 1024, 10]),
    "dropout": ("prob", 0.1),
    "hidden": (("relu", "tanh", "sigmoid", "erf", "identity"), "relu"),
}
AFA_SCHEMA = dict(FEEDFORWARD_SCHEMA, f_scale=("float+", 0.05),
                  convention=(("icml2022", "iclr2024"), "icml2022"))


def _builder(rule):
    def build(s):
        m, sim = s["model"], s["simulation"]
        if len(m["sizes"]) < 3 or min(m["sizes"]) < 1:
            raise ValidationError("model.sizes", f"got {m['sizes']}, expected [d_in, hidden..., "
                                  "n_out] with at least one hidden layer and sizes >= 1.")
        extra = dict(f_scale=m["f_scale"], convention=m["convention"]) if rule == "afa" else {}
        net = build_feedforward_network(tuple(m["sizes"]), rule, dropout=m["dropout"],
                                        hidden=m["hidden"], mode=sim["mode"], tau=sim["tau"],
                                        dt=sim["dt"], phase_duration=sim["phase_duration"],
                                        method=sim["method"], **extra)
        return net.circuit, net.protocol, [net.rule], "output"

    return build


def _register():
    from neurosim.scenario import register_model

    for rule in RULES:
        register_model(rule, AFA_SCHEMA if rule == "afa" else FEEDFORWARD_SCHEMA, _builder(rule))


_register()
