"""A small three-population circuit for cross-checking neurosim against Brian2.

``input`` (instantaneous, clamped to the stimulus ``x``) -> ``hidden`` (tau > 0) -> ``output``
(tau > 0), plus a top-down projection ``B`` from ``output`` back to ``hidden`` that is active only
in the second phase. The trial has two phases: ``forward`` (bottom-up only) and ``feedback``
(top-down on and, with ``nudge = true``, the target ``t`` added to the output's drive), the
second continuing from the first one's end state. No plasticity: the circuit exists to check
the dynamics (``neurosim crosscheck scenarios/crosscheck_small.toml``).
"""

from __future__ import annotations

from neurosim import Circuit, HeUniform, Phase, Protocol, Uniform, ValidationError

CROSSCHECK_SCHEMA = {
    "sizes": ("list[int]", [12, 16, 4]),
    "hidden": (("identity", "relu", "tanh", "sigmoid"), "tanh"),
    "output": (("identity", "relu", "tanh", "sigmoid"), "sigmoid"),
    "output_tau": ("time", 0.02),
    "feedback_gain": ("float+", 0.5),
    "feedback_scale": ("float+", 0.5),
    "bias": ("float0", 0.1),
    "nudge": ("bool", True),
}


def build_crosscheck_circuit(sizes=(12, 16, 4), *, hidden="tanh", output="sigmoid", tau=0.01,
                             output_tau=0.02, feedback_gain=0.5, feedback_scale=0.5, bias=0.1,
                             nudge=True, dt=1e-4, phase_duration=0.02, method="euler"):
    """Build ``(circuit, protocol)``; times accept floats (s), brian2 quantities or strings."""
    sizes = tuple(sizes)
    if len(sizes) != 3 or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValidationError("model.sizes", f"got {list(sizes)}, expected [inputs, hidden, "
                              "outputs], three positive integers.")
    n_in, n_hid, n_out = sizes
    c = Circuit(f"crosscheck-{n_in}-{n_hid}-{n_out}")
    c.population("input", n_in, transfer="identity")
    c.population("hidden", n_hid, tau=tau, transfer=hidden, bias=bias if bias else None)
    c.population("output", n_out, tau=output_tau, transfer=output)
    c.project("input", "hidden", name="W1", init=HeUniform(), plastic=False)
    c.project("hidden", "output", name="W2", init=HeUniform(), plastic=False)
    c.feedback("output", "hidden", name="B", init=Uniform(feedback_scale), gain=feedback_gain,
               phases=("feedback",))
    clamp2 = {"input": "x", "output": "t"} if nudge else {"input": "x"}
    protocol = Protocol((Phase("forward", clamp={"input": "x"}, duration=phase_duration),
                         Phase("feedback", clamp=clamp2, duration=phase_duration)),
                        mode="time", dt=dt, method=method)
    return c, protocol


def _from_settings(s):
    m, sim = s["model"], s["simulation"]
    if sim["mode"] != "time":
        raise ValidationError("simulation.mode", f"got {sim['mode']!r}; the crosscheck circuit "
                              "has a hidden <-> output loop and needs mode = \"time\".")
    c, p = build_crosscheck_circuit(tuple(m["sizes"]), hidden=m["hidden"], output=m["output"],
                                    tau=sim["tau"], output_tau=m["output_tau"],
                                    feedback_gain=m["feedback_gain"],
                                    feedback_scale=m["feedback_scale"], bias=m["bias"],
                                    nudge=m["nudge"], dt=sim["dt"],
                                    phase_duration=sim["phase_duration"], method=sim["method"])
    return c, p, [], "output"


def _register():
    from neurosim.scenario import register_model

    register_model("crosscheck", CROSSCHECK_SCHEMA, _from_settings)


_register()
