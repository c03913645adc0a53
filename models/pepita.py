"""A PEPITA network of any depth: input -> hidden layers -> output, an error population, and a
fixed top-down projection F from the error (held at the end of the clean pass) to the input.

Built only from neurosim's public API; usable in steady-state and time modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .layers import layered_classifier
from neurosim import (CONVENTIONS, PEPITA, Circuit, FanInUniform, Phase, Protocol,
                      ValidationError)


@dataclass(frozen=True)
class PepitaNetwork:
    """What :func:`build_pepita_network` returns."""

    circuit: Circuit
    protocol: Protocol
    rule: PEPITA
    layers: tuple          # names of the feedforward projections, input side first
    feedback: str          # name of F


def build_pepita_network(sizes=(784, 1024, 10), *, convention="icml2022", f_scale=0.05,
                         dropout=0.1, hidden="relu", mode="steady", tau=0.01, dt=0.001,
                         phase_duration=0.1, method="euler", presynaptic="modulated",
                         last_layer_error=None) -> PepitaNetwork:
    """Build circuit, protocol and rule for PEPITA.

    Parameters
    ----------
    sizes : (d_in, h_1, ..., h_{L-1}, n_out)
        At least one hidden layer.
    convention : ``"icml2022"`` (s = +1, modulated last-layer error; default) or ``"iclr2024"``
        (s = -1, clean error).
    f_scale : float
        F ~ U(+-f_scale * sqrt(6 / d_in)) (reference 0.05).
    dropout : float
        Hidden-layer dropout (one mask per trial, shared by both passes).
    mode : ``"steady"`` or ``"time"``
        In time mode, hidden and output populations have time constant ``tau`` and each phase
        lasts ``phase_duration`` at step ``dt``; the input and error are instantaneous.
    """
    sizes = tuple(sizes)
    if len(sizes) < 3 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValidationError("build_pepita_network.sizes", f"got {sizes!r}, expected (d_in, "
                              "hidden..., n_out) with at least one hidden layer, positive ints.")
    if convention not in CONVENTIONS:
        raise ValidationError("build_pepita_network.convention", f"got {convention!r}, expected "
                              f"one of {sorted(CONVENTIONS)}.")
    sign = CONVENTIONS[convention]["sign"]
    t = tau if mode == "time" else 0.0
    c, layers = layered_classifier(f"pepita-{'-'.join(map(str, sizes))}", sizes,
                                   hidden=hidden, dropout=dropout, tau=t)
    c.feedback("error@clean", "input", name="F", init=FanInUniform(f_scale, fan=sizes[0]),
               gain=sign, phases=("modulated",))
    kw = dict(duration=phase_duration) if mode == "time" else {}
    protocol = Protocol((Phase("clean", clamp={"input": "x"}, **kw),
                         Phase("modulated", clamp={"input": "x"}, **kw)),
                        mode=mode, dt=dt, method=method)
    rule = PEPITA(convention=convention, presynaptic=presynaptic,
                  last_layer_error=last_layer_error, feedback="F")
    return PepitaNetwork(c, protocol, rule, tuple(layers), "F")


def f_limit(d_in: int, f_scale: float = 0.05) -> float:
    """Half-width of F's uniform distribution: f_scale * sqrt(6 / d_in)."""
    return f_scale * math.sqrt(6.0 / d_in)


# -- scenario registration ------------------------------------------------------------------------
PEPITA_SCHEMA = {
    "sizes": ("list[int]", [784, 1024, 10]),
    "convention": (("icml2022", "iclr2024"), "icml2022"),
    "f_scale": ("float+", 0.05),
    "dropout": ("prob", 0.1),
    "hidden": (("relu", "tanh", "sigmoid", "erf", "identity"), "relu"),
    "presynaptic": (("modulated", "clean"), "modulated"),
    "last_layer_error": (("modulated", "clean", None), None),
}


def _from_settings(s):
    m, sim = s["model"], s["simulation"]
    if len(m["sizes"]) < 3 or min(m["sizes"]) < 1:
        raise ValidationError("model.sizes", f"got {m['sizes']}, expected [d_in, hidden..., "
                              "n_out] with at least one hidden layer and sizes >= 1.")
    net = build_pepita_network(tuple(m["sizes"]), convention=m["convention"],
                               f_scale=m["f_scale"], dropout=m["dropout"], hidden=m["hidden"],
                               mode=sim["mode"], tau=sim["tau"], dt=sim["dt"],
                               phase_duration=sim["phase_duration"], method=sim["method"],
                               presynaptic=m["presynaptic"],
                               last_layer_error=m["last_layer_error"])
    return net.circuit, net.protocol, [net.rule], "output"


def _register():
    from neurosim.scenario import register_model

    register_model("pepita", PEPITA_SCHEMA, _from_settings)


_register()
