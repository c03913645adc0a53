"""Diagnostics of learning rules, computed inside the compiled program.

* :class:`GradientAlignment` -- custom monitor: the angle (degrees) between a rule's update of
  one projection and the exact backprop gradient of the cross-entropy at the same state and
  minibatch, recorded every ``every`` trials (the standard gradient-alignment diagnostic; 0 =
  the rule follows the gradient, 90 = orthogonal).
* :class:`PepitaAfaAngle` -- custom monitor for PEPITA plans: the angle between PEPITA's update
  of a hidden projection and the update AFA (adaptive feedback alignment, algorithms.md 1.3)
  would make at the same state and minibatch (same dropout mask).
* :func:`pepita_afa_cosine` -- PEPITA-AFA cosine of the first-layer update as a function of the
  F scale, for fixed weights and samples.
* :func:`pepita_afa_cosine_reference` -- the same cosine in float64 numpy.
* :func:`alignment_angles` -- the weight-alignment angles of a simulator's current state
  (F vs (W_L ... W_1)^T, and the factors B_l vs W_l^T when F is factorized), in numpy.

The monitors follow :class:`neurosim.monitors.AbstractMonitor`: they are emitted into
``trial_end`` after the rules' updates and before the optimizer step, and skip their work
(a GUARD instruction) except every ``every`` trials. Reading a rule's update buffer disables
the compiler's fusion of the momentum step into that update's GEMM (the update then exists
explicitly), which costs a little throughput on monitored runs only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ValidationError
from .monitors import AbstractMonitor
from .params import check_int


def _chain(pb, error, where):
    from .plasticity.pepita_variants import _layered_chain

    return _layered_chain(pb, error, where)


def _update_buffer(pb, projection, where, update=None):
    if update is not None:
        if update not in pb._index:
            raise ValidationError(f"{where}.update", f"no buffer {update!r} in the plan (e.g. "
                                  "PEPITATimeLocal(record_update=True) writes "
                                  "'<rule>.<projection>.update').")
        return pb._index[update]
    if projection not in pb.grads:
        recorded = [k for k in pb._index if k.endswith(f".{projection}.update")]
        if len(recorded) == 1:    # a rule that steps inside the phases and records its update
            return pb._index[recorded[0]]
        raise ValidationError(f"{where}.projection", f"no rule writes an end-of-trial update of "
                              f"{projection!r} (updated: {list(pb.grads)}); for rules that step "
                              "inside the phases (PEPITA-TL) give update='<buffer>' (see "
                              "PEPITATimeLocal.record_update).")
    return pb._index[f"{projection}.dW"]


@dataclass(frozen=True)
class GradientAlignment(AbstractMonitor):
    """Angle between a rule's update of ``projection`` and the exact BP gradient.

    The gradient is that of the summed cross-entropy of the circuit's ``phase`` pass (held
    rates and drives, the trial's dropout masks), with the error recomputed from the output
    population and the target (so rules that rewrite the held error, e.g. normalized PEPITA,
    are compared with the plain network's gradient). Key: ``name`` or
    ``"grad_angle:<projection>"``.

    ``update``: the buffer holding the rule's update, for rules without an end-of-trial update
    (``"pepita_tl.W1.update"`` with ``PEPITATimeLocal(record_update=True)``; there the gradient is
    taken with the weights after the trial's two steps, a difference of order lr).
    """

    projection: str
    every: int = 1
    phase: str = "clean"
    error: str = "error"
    name: str | None = None
    update: str | None = None

    def __post_init__(self):
        check_int("GradientAlignment.every", self.every, low=1)

    @property
    def key(self):
        return self.name or f"grad_angle:{self.projection}"

    def build(self, pb, index):
        where = f"GradientAlignment({self.projection!r})"
        c = pb.circuit
        pb.require_phase(self.phase, f"{where}.phase")
        projs, pops = _chain(pb, self.error, where)
        if self.projection not in projs:
            raise ValidationError(f"{where}.projection", f"not on the feedforward chain {projs}.")
        dW = _update_buffer(pb, self.projection, where, self.update)
        err = pb.require_error(self.error, where)
        li = projs.index(self.projection)
        L = len(projs)
        ph = self.phase
        G = pb.state(f"monitor{index}.bpgrad", *c.shape_of(c.projections[self.projection]))
        gain = [c.projections[p].gain for p in projs]
        with pb.at("trial_end"):
            with pb.every(self.every, where):
                # a_{l+1} = g_{l+1} W_{l+1} h_l (g: the projection's gain):
                # delta_l = g_{l+1} (delta_{l+1} W_{l+1}) f'(a_l); dL/dW_l = g_l delta_l^T h_{l-1}
                delta = pb.let(pb.r(err.output, ph) - pb.stim(err.target), where)
                for l in range(L - 2, li - 1, -1):
                    delta = pb.let(gain[l + 1] * (delta @ pb.W(projs[l + 1]))
                                   * pb.fprime(pops[l + 1], ph), where)
                pb.assign(G, gain[li] * (delta.T @ pb.r(pops[li], ph)), where)
            pb.record_angle(index, dW, G)
        return dict(key=self.key, kind="stat", size=1, per="trial", every=self.every)


@dataclass(frozen=True)
class PepitaAfaAngle(AbstractMonitor):
    """Angle between PEPITA's update of hidden projection ``projection`` and AFA's update at the
    same state and minibatch: ``dW_AFA = -u_l^T h_{l-1}`` with ``u_0 = s e F^T``,
    ``u_l = (u_{l-1} W_l^T) f'(a_l)`` on the clean pass (algorithms.md 1.3). ``cos(angle)`` is
    the PEPITA-AFA cosine; it tends to 1 as |F e| / |x| -> 0."""

    projection: str = "W1"
    feedback: str = "F"
    every: int = 1
    clean: str = "clean"
    error: str = "error"
    name: str | None = None

    def __post_init__(self):
        check_int("PepitaAfaAngle.every", self.every, low=1)

    @property
    def key(self):
        return self.name or f"pepita_afa_angle:{self.projection}"

    def build(self, pb, index):
        where = f"PepitaAfaAngle({self.projection!r})"
        c = pb.circuit
        projs, pops = _chain(pb, self.error, where)
        if self.projection not in projs[:-1]:
            raise ValidationError(f"{where}.projection", f"expected a hidden-layer projection of "
                                  f"{projs[:-1]}.")
        fb = pb.require_projection(self.feedback, f"{where}.feedback")
        dW = _update_buffer(pb, self.projection, where)
        err = pb.require_error(self.error, where)
        li = projs.index(self.projection)
        ph = self.clean
        A = pb.state(f"monitor{index}.afa", *c.shape_of(c.projections[self.projection]))
        with pb.at("trial_end"):
            with pb.every(self.every, where):
                # u_0 = s e F^T, u_l = (g_l u_{l-1} W_l^T) f'(a_l), dW_AFA = -u_l^T h_{l-1}
                e = pb.r(err.output, ph) - pb.stim(err.target)
                u = pb.let(fb.gain * (pb.let(e, where) @ pb.W(fb.name).T), where)
                for l in range(li + 1):
                    u = pb.let(c.projections[projs[l]].gain * (u @ pb.W(projs[l]).T)
                               * pb.fprime(pops[l + 1], ph), where)
                pb.assign(A, -1.0 * (u.T @ pb.r(pops[li], ph)), where)
            pb.record_angle(index, dW, A)
        return dict(key=self.key, kind="stat", size=1, per="trial", every=self.every)


def pepita_afa_cosine(X, Y, f_scales, *, sizes=None, weights=None, seed=0, batch=1,
                      dropout=0.0, convention="icml2022", projection="W1"):
    """PEPITA-AFA cosine of ``projection``'s update for each F scale, same weights and samples.

    For every scale, a PEPITA network with ``F ~ U(+-f_scale sqrt(6/d_in))`` (the same draw up
    to the factor: F is proportional to f_scale for a given seed) is compiled with a
    :class:`PepitaAfaAngle` monitor; ``weights`` (dict name -> (post, pre) array; default the
    seed's initial weights) are loaded before every minibatch so that every update is taken at
    the same state. ``batch=1`` gives per-sample cosines. Returns ``(f_scales, cos)`` with
    ``cos`` of shape (len(f_scales), number of minibatches).
    """
    from .compiler import compile_plan
    from .plasticity.optim import SGD
    from .simulator import Simulator
    from neurosim.models import build_pepita_network

    X = np.ascontiguousarray(X, np.float32)
    Y = np.asarray(Y, np.int64)
    if sizes is None:
        raise ValidationError("pepita_afa_cosine.sizes", "give the layer sizes (d_in, ..., n_out).")
    out = []
    for fs in f_scales:
        net = build_pepita_network(tuple(sizes), f_scale=float(fs), dropout=dropout,
                                   convention=convention)
        plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                            optimizer=SGD(lr=1e-30, momentum=0.0),
                            monitors=[PepitaAfaAngle(projection)], batch=batch, seed=seed)
        sim = Simulator(plan)
        w = weights if weights is not None else {n: sim.weights[n].copy() for n in net.layers}
        n_batches = -(-len(X) // batch)
        for j in range(n_batches):
            for name, v in w.items():
                sim.set_weights(name, v)
            sim.train(X, Y, np.arange(j * batch, min((j + 1) * batch, len(X))))
        ang = np.asarray(sim.traces[f"pepita_afa_angle:{projection}"].values, np.float64)
        out.append(np.cos(np.radians(ang)))
    return np.asarray(f_scales, np.float64), np.asarray(out)


def pepita_afa_cosine_reference(W, F, X, Y, *, sign=1.0, batch=1):
    """float64 numpy twin of :func:`pepita_afa_cosine` (no dropout, one hidden layer or more):
    cosines of the first-layer updates of PEPITA (``(h_1 - h~_1)^T x~``) and AFA
    (``-u_1^T x``, ``u_1 = D_1 W_1 (s F e)``) for each minibatch of ``batch`` samples. Separates
    the first-order approximation from float32 rounding, which dominates PEPITA's update when
    the errors of a trained network are tiny (|F e| below float32 resolution of the drives)."""
    W = [np.asarray(w, np.float64) for w in W]
    F = np.asarray(F, np.float64)
    X = np.asarray(X, np.float64)
    T = np.eye(W[-1].shape[0])[np.asarray(Y)]

    def fwd(x):
        hs, acts, h = [x], [], x
        for w in W[:-1]:
            a = h @ w.T
            acts.append(a)
            h = np.maximum(a, 0.0)
            hs.append(h)
        z = h @ W[-1].T
        z = np.exp(z - z.max(1, keepdims=True))
        return hs, acts, z / z.sum(1, keepdims=True)

    out = []
    for j in range(0, len(X), batch):
        x, t = X[j:j + batch], T[j:j + batch]
        hs, acts, o = fwd(x)
        e = o - t
        xm = x + sign * (e @ F.T)
        hm, _, _ = fwd(xm)
        pep = (hs[1] - hm[1]).T @ xm
        u = ((sign * (e @ F.T)) @ W[0].T) * (acts[0] > 0)
        afa = -(u.T @ x)
        n = np.linalg.norm(pep) * np.linalg.norm(afa)
        out.append(float((pep * afa).sum() / n) if n > 0 else np.nan)
    return np.asarray(out)


def alignment_angles(sim) -> dict:
    """Weight-alignment angles (degrees) of a simulator's current weights, in numpy:
    ``"F"``: F vs (W_L ... W_1)^T for a feedback projection ``F`` (error -> input), and for each
    factor projection ``B<l>`` (if F is factorized): B_l vs W_l^T."""
    from .analysis import angle_deg

    W = sim.weights
    layers = sorted((n for n in W if n.startswith("W") and n[1:].isdigit()),
                    key=lambda n: int(n[1:]))
    out = {}
    if "F" in W and layers:
        prod = W[layers[0]].astype(np.float64)
        for n in layers[1:]:
            prod = W[n].astype(np.float64) @ prod
        out["F"] = angle_deg(W["F"], prod.T)
    for n in layers:
        b = f"B{n[1:]}"
        if b in W:
            out[b] = angle_deg(W[b], W[n].T)
    return out


__all__ = ["GradientAlignment", "PepitaAfaAngle", "pepita_afa_cosine",
           "pepita_afa_cosine_reference", "alignment_angles"]
