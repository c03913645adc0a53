"""The layered classifier every ready-made network starts from."""

from __future__ import annotations

from neurosim import Circuit, HeUniform


def layered_classifier(name: str, sizes, *, hidden="relu", dropout=0.0, tau=0.0):
    """``input -> hidden... -> output (softmax) -> error``, projections ``W1..WL`` (He-uniform).

    Hidden and output populations get time constant ``tau`` (0 = instantaneous); hidden layers
    are ``hidden`` (one layer) or ``hidden1..`` (several). Returns ``(circuit, layer names)``.
    """
    c = Circuit(name)
    c.population("input", sizes[0], transfer="identity")
    names = ["input"]
    for i, h in enumerate(sizes[1:-1], start=1):
        names.append(f"hidden{i}" if len(sizes) > 3 else "hidden")
        c.population(names[-1], h, tau=tau, transfer=hidden, dropout=dropout)
    c.population("output", sizes[-1], tau=tau, transfer="softmax")
    names.append("output")
    c.error("error", "output", target="t")
    layers = []
    for i, (pre, post) in enumerate(zip(names[:-1], names[1:]), start=1):
        layers.append(f"W{i}")
        c.project(pre, post, name=f"W{i}", init=HeUniform())
    return c, layers
