"""Linear drive reuse (``neurosim.compiler.reuse_drives``, ``compile_plan(optimize={"drive_reuse":
...})``): where it fires, where it must not, and that on and off agree within float32 rounding on
both backends, in steady and time mode.

Tolerances
----------
*One drive.* The modulated drive of the first layer is ``W (x + F e)``. Without the pass it is
one GEMM over ``x_mod = fl(x + fl(F e))`` (K = d_in products per entry, plus the rounding of
``x_mod``); with it, ``fl(W x) + e fl(op(F) op(W))^T`` (K products, k products of K products, and
one addition). Each is the exact value up to the standard bound of a float32 sum of n products,
``gamma_n sum |terms|`` with ``gamma_n = n u / (1 - n u)``, ``u = 2^-24`` (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., eq. 3.5), and every term is bounded by
``M = |W| (|x| + |F| |e|)`` (entrywise absolute values). So the two differ by at most
``2 gamma_{K+k+2} M`` entry by entry. The clean pass is not touched: its results must be
bit-identical.

*Training.* Over T minibatches the two runs round the modulated drive differently at every
trial; as in tests/test_golden.py (its module docstring), one trial of re-associated arithmetic
perturbs the state like moving every weight by one ulp, and a perturbation cannot grow more than
the training map amplifies a one-ulp start. The test measures that amplification on the same run
(``S = rms(delta_ulp) / rms(Delta)``, Delta the change training made) and allows
``rho = T S``: ``rms(W_on - W_off) <= rho rms(Delta)``; norms recorded by monitors within
``2 rho`` relative (a norm moves by at most ``||delta||``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from neurosim import (PEPITA, SGD, Circuit, FanInUniform, Monitor, Phase, PlasticityRule,
                      Protocol, Simulator, ValidationError, compile_plan, register_builder)
from neurosim.compiler import PASSES, PlanBuilder, _ProgramBuilder, reuse_drives
from neurosim.models import build_pepita_network
from neurosim.optable import BY_CODE

U = 2.0 ** -24
SIZES = (200, 96, 10)
BATCH = 32
T = 8


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _net(mode="steady", sizes=SIZES, **kw):
    return build_pepita_network(sizes, mode=mode, dropout=0.1, phase_duration=0.02, dt=0.002,
                                **kw)


def _plan(net, reuse=True, rules=None, monitors=(), batch=BATCH, seed=3, **kw):
    return compile_plan(net.circuit, net.protocol, rules=rules or [net.rule],
                        optimizer=SGD(lr=0.1, momentum=0.9), monitors=list(monitors),
                        batch=batch, seed=seed, optimize={"drive_reuse": reuse}, **kw)


def _data(n, d_in=SIZES[0], n_out=SIZES[-1], seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, d_in), dtype=np.float32), rng.integers(0, n_out, n)


def _instrs(plan, prog="train"):
    """(op name, {operand: value}) of every instruction; buffers by name."""
    names = {i: n for n, i in plan.buffer_index.items()}
    p = getattr(plan, prog)
    out = []
    for row, fp in zip(p.prog, p.fprm):
        spec = BY_CODE[row[0]]
        ops = {}
        for o in spec.operands:
            v = fp[o.col] if o.is_float else int(row[o.col])
            ops[o.name] = (names.get(v) if v >= 0 else None) if o.is_buffer else v
        out.append((spec.name, ops))
    return out


def _gemm_shapes(plan, prog="train"):
    """(m, k, n) of every GEMM of the program, for the compiled batch."""
    out = []
    for name, o in _instrs(plan, prog):
        if name != "GEMM":
            continue
        def shape(b, t):
            off, r, c, bt = (int(v) for v in plan.bufs[plan.buffer_index[b]])
            r = plan.batch if bt else r
            return (c, r) if t else (r, c)
        (m, k), (_, n) = shape(o["a"], o["trans_a"]), shape(o["b"], o["trans_b"])
        out.append((m, k, n))
    return out


# -- where it fires -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["steady", "time"])
def test_the_modulated_first_layer_gemm_is_gone(mode):
    """PEPITA 784-1024-10, batch 64 (the shipped setup): the modulated pass's 64x784x1024 GEMM
    becomes a 10x784x1024 one (P = F^T W1^T) and a 64x10x1024 one (e P) added to a copy of the
    clean drive; the clean one stays. Nothing else changes."""
    net = build_pepita_network((784, 1024, 10), mode=mode)
    on, off = (_plan(net, reuse=r, batch=64) for r in (True, False))
    g_on, g_off = _gemm_shapes(on), _gemm_shapes(off)
    assert g_off.count((64, 784, 1024)) == 2 and g_on.count((64, 784, 1024)) == 1
    assert sorted(g_on) == sorted([g for g in g_off if g != (64, 784, 1024)]
                                  + [(64, 784, 1024)] + [(10, 784, 1024), (64, 10, 1024)])
    assert on.passes["drive_reuse"]["train"] == 1 and off.passes["drive_reuse"] == {}
    assert on.passes["drive_reuse"]["infer"] == 0           # one phase: nothing to reuse
    ins = _instrs(on)
    k = next(i for i, (n, o) in enumerate(ins) if n == "COPY"
             and o["dst"] == "hidden.drive@modulated")
    assert ins[k][1]["src"] == "hidden.drive@clean"
    assert ins[k + 1] == ("GEMM", dict(c="scratch.reuse.F.W.W1.W", a="F.W", b="W1.W", trans_a=1,
                                       trans_b=1, fused=0, lr_slot=-1, alpha=1.0, beta=0.0,
                                       lr_scale=1.0))
    assert ins[k + 2][1]["a"] == "error.r@clean" and ins[k + 2][1]["beta"] == 1.0
    # the modulated input x + F e is still materialised: the W1 update reads it
    assert any(n == "TRANSFER" and o["r"] == "input.r@modulated" for n, o in ins)
    # the inference program and the other op kinds are unchanged
    assert _instrs(on, "infer") == _instrs(off, "infer")


@pytest.mark.parametrize("variant", ["iclr2024", "deep", "clean_presynaptic"])
def test_fires_for_pepita_variants(variant):
    """The pattern is found from the ops, whatever the sign of F (iclr2024: gain -1), the depth
    (only the first layer has the F e term) or what the update reads."""
    kw = {"iclr2024": dict(convention="iclr2024"), "deep": dict(sizes=(200, 96, 64, 10)),
          "clean_presynaptic": dict(presynaptic="clean")}[variant]
    net = _net(**kw)
    plan = _plan(net)
    assert plan.passes["drive_reuse"]["train"] == 1
    gemms = [o for n, o in _instrs(plan) if n == "GEMM" and o["c"] == "hidden1.drive@modulated"
             or n == "GEMM" and o["c"] == "hidden.drive@modulated"]
    assert len(gemms) == 1 and gemms[0]["a"] == "error.r@clean"
    if variant == "iclr2024":
        assert gemms[0]["alpha"] == -1.0


# -- where it must not fire -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Rewrite(PlasticityRule):
    """A test rule that rewrites one buffer in one section: ``target = f(target)``."""

    target: str = "W1"          # "W1" (weights), "drive" (hidden's clean drive), "error"
    section: str = "clean:post"
    name: str = "rewrite"

    def modifies(self, pb):
        return []

    def reads(self, pb):
        return []


@register_builder(_Rewrite)
def _build_rewrite(pb, rule):
    h = {"W1": lambda: pb.W("W1"), "drive": lambda: pb.a("hidden", "clean"),
         "error": lambda: pb.r("error", "clean")}[rule.target]()
    with pb.at(rule.section):
        pb.assign(h, h.abs() * 0.5)


def _circuit(input_kw=None, mode="steady"):
    """A PEPITA circuit built by hand, with options on the input population."""
    c = Circuit("handmade")
    c.population("input", SIZES[0], **(input_kw or {}))
    c.population("hidden", SIZES[1], transfer="relu", tau="10 ms" if mode == "time" else 0.0)
    c.population("output", SIZES[2], transfer="softmax",
                 tau="10 ms" if mode == "time" else 0.0)
    c.error("error", "output", target="t")
    c.project("input", "hidden", name="W1")
    c.project("hidden", "output", name="W2")
    c.feedback("error@clean", "input", name="F", init=FanInUniform(0.05, fan=SIZES[0]),
               phases=("modulated",))
    kw = dict(duration="20 ms") if mode == "time" else {}
    proto = Protocol((Phase("clean", clamp={"input": "x"}, **kw),
                      Phase("modulated", clamp={"input": "x"}, **kw)), mode=mode, dt="2 ms")
    return c, proto


def _fires(circuit, protocol, rules, batch=BATCH):
    plan = compile_plan(circuit, protocol, rules=rules, optimizer=SGD(lr=0.1, momentum=0.9),
                        batch=batch, seed=0)
    return plan.passes["drive_reuse"]["train"]


@pytest.mark.parametrize("case,expected", [
    ("plain", 1),
    ("W1 written between the phases", 0),
    ("W1 written after both phases", 1),
    ("clean drive overwritten", 0),
    ("clean drive overwritten after both phases", 1),
    ("error rewritten before the modulated pass", 1),   # e is what F reads: still exact
    ("nonlinear input", 0),
    ("input dropout", 0),
    ("input with tau > 0 (time mode)", 0),
    ("time mode", 1),
    ("batch too small to gain", 0),
])
def test_conditions(case, expected):
    """The pass checks each condition on the op list: the input population is linear and
    instantaneous without a mask, W1 and the clean drive are not written between the two drive
    computations, and the rewrite saves at least half of the multiply-adds."""
    mode = "time" if "time" in case else "steady"
    input_kw = {"nonlinear input": dict(transfer="tanh"), "input dropout": dict(dropout=0.2),
                "input with tau > 0 (time mode)": dict(tau="10 ms")}.get(case)
    c, proto = _circuit(input_kw, mode)
    rules = [PEPITA(feedback="F")]
    extra = {"W1 written between the phases": _Rewrite("W1", "clean:post"),
             "W1 written after both phases": _Rewrite("W1", "trial_end"),
             "clean drive overwritten": _Rewrite("drive", "clean:post"),
             "clean drive overwritten after both phases": _Rewrite("drive", "trial_end"),
             "error rewritten before the modulated pass": _Rewrite("error", "clean:post")}
    if case in extra:
        rules.append(extra[case])
    batch = 4 if case == "batch too small to gain" else BATCH   # 10x200x96 + ... > 4x200x96 / 2
    assert _fires(c, proto, rules, batch) == expected


def _handmade(hazard):
    """A hand-written op list: d0 = x W^T (section a), then in section b the input x + e F^T and
    d1 = (x + e F^T) W^T, with ``hazard`` between; returns the number of rewrites."""
    net = _net()
    pb = PlanBuilder(net.circuit, net.protocol, BATCH, 0)
    x, e = pb.buffer("x", 0, 200, True), pb.buffer("e", 0, 10, True)
    W, F = pb.buffer("W", 96, 200), pb.buffer("F", 200, 10)
    d0, d1, d2 = (pb.buffer(f"d{i}", 0, 96, True) for i in range(3))
    xm = pb.buffer("xm", 0, 200, True)
    sections = ["a", "b", "c"]
    prb = _ProgramBuilder(sections)
    pb._pb = prb
    prb.is_loop["a"] = hazard == "d0 made in a loop"
    with pb.at("a"):
        pb.op("GATHER", dst=x, source=0)
        pb.gemm(d0, x, W, trans_b=True)
    with pb.at("b"):
        if hazard == "W scaled in a conditional block":
            with pb.every(3):
                pb.scale(W, 0.5)
        pb.gemm(xm, e, F, trans_b=True)
        pb.axpy(xm, x)
        if hazard == "W scaled":
            pb.scale(W, 0.5)
        if hazard == "e written":
            pb.zero(e)
        if hazard == "d0 overwritten":
            pb.op("UNARY", dst=d0, src=d0, fn=4)
        if hazard == "x written":
            pb.op("GATHER", dst=x, source=0)
        if hazard == "same input":
            pb.copy(xm, x)
        pb.gemm(d1, xm, W, trans_b=True)
    with pb.at("c"):
        pb.gemm(d2, xm, W, trans_b=True)            # again: d1 holds it now
    n = reuse_drives(prb, pb)
    return n, [it.spec.name for _, it in prb.instructions()]


@pytest.mark.parametrize("hazard,expected", [
    ("none", 2), ("W scaled", 1), ("W scaled in a conditional block", 1), ("e written", 1),
    ("d0 overwritten", 1), ("x written", 2), ("d0 made in a loop", 1), ("same input", 2)])
def test_versions_of_every_operand_are_checked(hazard, expected):
    """On a hand-written op list: the weights, the low-rank factor e and the reused drive must
    hold the values the forms name. A write in between (even in a conditional block, which may
    run), a drive made inside a loop section (forgotten after the loop) stop the rewrite of d1
    in section b; a new x after x + e F^T was formed does not (d0 and xm both hold the old x).
    The GEMM d2 of section c reuses d1 whenever d1 holds the same product (a plain copy).
    Without a low-rank difference (same input) the rewrite is a copy."""
    n, ops = _handmade(hazard)
    assert n == expected, ops
    if hazard == "none":
        assert ops == ["GATHER", "GEMM", "GEMM", "AXPY", "COPY", "GEMM", "GEMM", "COPY"]
    if hazard == "same input":
        assert ops == ["GATHER", "GEMM", "GEMM", "AXPY", "COPY", "COPY", "COPY"]


# -- on and off agree -----------------------------------------------------------------------------
def _train(plan, X, Y, backend, monitors=False, perturb=False):
    sim = Simulator(plan, backend=backend)
    w0 = {k: sim.weights[k].copy() for k in ("W1", "W2")}
    if perturb:                                  # every weight one ulp up or down
        rng = np.random.default_rng(7)
        for k in ("W1", "W2"):
            w = sim.view(f"{k}.W")
            w[...] = np.where(rng.random(w.shape) < 0.5, np.nextafter(w, np.float32(np.inf)),
                              np.nextafter(w, np.float32(-np.inf)))
    sim.train(X, Y)
    return sim, w0


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("mode", ["steady", "time"])
def test_one_trial_drive_within_rounding(mode, backend):
    """One minibatch: the clean pass is bit-identical; the modulated drive is within the bound
    ``2 gamma_{K+k+2} |W| (|x| + |F| |e|)`` of the module docstring, entry by entry."""
    net = _net(mode)
    X, Y = _data(BATCH)
    sims = {r: _train(_plan(net, reuse=r), X, Y, backend)[0] for r in (True, False)}
    on, off = sims[True], sims[False]
    for b in ("hidden.drive@clean", "hidden.r@clean", "error.r@clean", "input.r@modulated"):
        assert np.array_equal(on.view(b), off.view(b)), b
    W = np.abs(_plan(net).view("W1.W").astype(np.float64))           # the weights before the step
    F = np.abs(off.view("F.W").astype(np.float64))
    e = np.abs(off.view("error.r@clean").astype(np.float64))
    M = (np.abs(X.astype(np.float64)) + e @ F.T) @ W.T
    K, k = SIZES[0], SIZES[-1]
    bound = 2 * gamma(K + k + 2) * M
    diff = np.abs(on.view("hidden.drive@modulated").astype(np.float64)
                  - off.view("hidden.drive@modulated"))
    assert np.all(diff <= bound), float(np.max(diff / bound))
    # the bound is not vacuous: dropping the F e term would leave it
    Fe = np.abs((off.view("error.r@clean") @ off.view("F.W").T) @ _plan(net).view("W1.W").T)
    assert np.mean(Fe > bound) > 0.5


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("mode", ["steady", "time"])
def test_training_on_and_off_agree(mode, backend):
    """T minibatches of SGD with momentum: weights within rho = T S of the module docstring,
    recorded norms within 2 rho; and the numba and numpy backends agree with the pass on."""
    net = _net(mode)
    X, Y = _data(T * BATCH)
    mons = [Monitor("W1.norm", every=1), Monitor("W2.norm", every=1)]
    on, w0 = _train(_plan(net, True, monitors=mons), X, Y, backend)
    off, _ = _train(_plan(net, False, monitors=mons), X, Y, backend)
    ulp, _ = _train(_plan(net, False, monitors=mons), X, Y, backend, perturb=True)
    other, _ = _train(_plan(net, True, monitors=mons), X, Y,
                      "numpy" if backend == "numba" else "numba")

    def rel(a, b, k):
        return (np.sqrt(np.mean((a.weights[k].astype(np.float64) - b.weights[k]) ** 2))
                / np.sqrt(np.mean((off.weights[k].astype(np.float64) - w0[k]) ** 2)))

    S = max(rel(ulp, off, k) for k in ("W1", "W2"))
    assert 0 < S < 1e-3, S                       # a measured, small conditioning
    rho = T * S
    for k in ("W1", "W2"):
        assert rel(on, off, k) <= rho, (k, rel(on, off, k), rho)
        assert rel(on, other, k) <= rho, (k, rel(on, other, k), rho)
    for key in ("W1.norm", "W2.norm"):
        a, b = on.traces[key].values, off.traces[key].values
        assert a.shape == b.shape == (T, 1) or a.shape == b.shape
        assert np.all(np.abs(a - b) <= 2 * rho * np.abs(b)), key


# -- the switch -----------------------------------------------------------------------------------
def test_switch_validation_and_saving(tmp_path):
    """``optimize`` names passes (a misspelt one is refused, naming the passes); ``fuse=False``
    is ``optimize={"fuse_momentum": False}``; a saved simulator keeps its passes."""
    net = _net()
    with pytest.raises(ValidationError, match="drive_reuse"):
        compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                     batch=4, optimize={"drive_reus": False})
    with pytest.raises(ValidationError, match="expected True or False"):
        compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                     batch=4, optimize={"drive_reuse": "no"})
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.1),
                        batch=4, fuse=False)
    assert plan.optimize == {"drive_reuse": True, "fuse_momentum": False} and not plan.fuse
    assert set(plan.optimize) == set(PASSES)
    X, Y = _data(8)
    sim = Simulator(_plan(net, reuse=False))
    sim.train(X, Y)
    sim.save(tmp_path / "off.npz")
    back = Simulator.load(tmp_path / "off.npz")
    assert back.plan.optimize["drive_reuse"] is False
    assert back.plan.passes["drive_reuse"] == {}
