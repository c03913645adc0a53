r"""Teacher-student online learning on the engine, next to the ODEs of :mod:`neurosim.theory`.

The setting is the one of ``docs/theory-reference.md`` (the spec) §1: a soft committee
machine (SCM) student with K erf hidden units learns online from an SCM teacher with M hidden
units, on i.i.d. Gaussian inputs :math:`x\in\mathbb R^N`, one fresh sample per step, with BP,
FA, AFA or PEPITA. Both networks are neurosim circuits; the student is trained by the engine's
own rules (:class:`~neurosim.BP`, :class:`~neurosim.FA`, :class:`~neurosim.AFA`,
:class:`~neurosim.PEPITA`) through the compiled kernels.

Normalisation (spec §1.2, "practical" mapping)
----------------------------------------------
The circuits store the first layer as :math:`W_1=w/\sqrt N` acting on the raw input (gain 1),
and the readout as :math:`W_2=v^\top` (shape (1, K)). The engine's rules ignore projection
gains when they form updates, so folding :math:`1/\sqrt N` into the stored weights (rather than
into a gain) is what keeps BP's update the gradient with respect to the effective weights and
AFA's feedback equal to :math:`b=-W_1F`. The optimizer is plain SGD (momentum 0) with

* ``lr = eta / N`` for ``W1``: :math:`W_1\leftarrow W_1+\frac{\eta}{N}\delta x`, i.e.
  :math:`w\leftarrow w+\frac{\eta}{\sqrt N}\delta x` (the theory's update);
* ``lr * lr_scale["W2"] = eta_v / N`` for ``W2``: :math:`v\leftarrow v+\frac{\eta_v}{N}\Delta g`.

The error population is :math:`e=\hat y-y=-\Delta` (PEPITA's convention); the rules update in
the descent direction, so the signs agree with the spec's :math:`\Delta`-form.

Rules and their feedback
------------------------
* ``bp``: :class:`~neurosim.BP` (:math:`\beta=v`).
* ``fa``: :class:`~neurosim.FA` with its fixed matrix :math:`B` (shape (1, K), like ``W2``) set to
  the instance's feedback vector :math:`b` (``FA(feedback_init=Given(b[None]))``), so
  :math:`\delta_1=(eB)\odot g'` is :math:`-\Delta b_kg'(\lambda_k)`.
* ``afa``: :class:`~neurosim.AFA` with the top-down projection ``F`` (input <- error, shape
  (N, 1), gain s = +1), so the feedback is :math:`b=-W_1F` recomputed every step. ``F`` is
  gated off in the single ``clean`` phase: it exists only to carry the feedback matrix.
* ``pepita``: :class:`~neurosim.PEPITA` with two phases, ``clean`` (x) and ``modulated``
  (:math:`\tilde x=x+Fe`, s = +1, the default ``icml2022`` sign, for which :math:`b=-W_1F` as in
  the spec). The readout update uses the **clean** error by default
  (``last_layer_error="clean"``), which is the spec's exact one-hidden-layer rule
  :math:`v\leftarrow v-\frac{\eta_v}{N}e\,g(\tilde\lambda)`; ``"modulated"`` (the ICML 2022
  code) is available but is not what the §4.5 ODE describes.

Order parameters are computed from ``Simulator.weights`` at the output times with
:func:`neurosim.theory.order_parameters` (``scale="practical"``), and :math:`\epsilon_g` with the
analytic :func:`neurosim.theory.eps_g` (no test-set noise, spec §8). The ODEs start from the
order parameters of the very weights the engine holds at t = 0 (float32), spec §8.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import numpy as np

from . import theory as th
from .circuit import Circuit
from .compiler import compile_plan
from .errors import NeurosimWarning, SimulationError, ValidationError
from .init import Given
from .plasticity import AFA, BP, FA, PEPITA, SGD
from .protocol import Phase, Protocol
from .rng import component_rng
from .simulator import Simulator

__all__ = ["RULES", "Instance", "make_instance", "plant_feedback", "plant_student",
           "build_student", "build_teacher", "compile_student", "Teacher", "DataStream",
           "SimRun", "simulate", "initial_order_parameters", "theory", "pepita_E",
           "pepita_afa_product", "afa_E2", "feedback_variance"]

RULES = ("bp", "fa", "afa", "pepita")


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Instance:
    r"""A teacher and an initial student in the engine's normalisation (float32 arrays).

    Attributes
    ----------
    W1 : numpy.ndarray, shape (K, N)
        Student first layer :math:`W_1=w/\sqrt N` (acts on raw x).
    v : numpy.ndarray, shape (K,)
        Student readout.
    W1_star : numpy.ndarray, shape (M, N)
        Teacher first layer :math:`W_1^*=w^*/\sqrt N`.
    v_star : numpy.ndarray, shape (M,)
        Teacher readout.
    F : numpy.ndarray, shape (N,) or None
        PEPITA/AFA feedback vector in input space (:math:`\tilde x=x+Fe`).
    b_fa : numpy.ndarray, shape (K,) or None
        Fixed FA feedback vector.
    """

    W1: np.ndarray
    v: np.ndarray
    W1_star: np.ndarray
    v_star: np.ndarray
    F: np.ndarray | None = None
    b_fa: np.ndarray | None = None

    def __post_init__(self):
        for name in ("W1", "v", "W1_star", "v_star", "F", "b_fa"):
            a = getattr(self, name)
            if a is None:
                continue
            a = np.array(a, dtype=np.float32)
            if not np.all(np.isfinite(a)):
                raise ValidationError(f"Instance.{name}", "contains NaN or inf.")
            a.setflags(write=False)
            object.__setattr__(self, name, a)
        K, N = self.W1.shape if self.W1.ndim == 2 else (None, None)
        if self.W1.ndim != 2 or self.W1_star.ndim != 2 or self.W1_star.shape[1] != N:
            raise ValidationError("Instance.W1", f"shapes {self.W1.shape} and "
                                  f"{self.W1_star.shape}; expected (K, N) and (M, N).")
        if self.v.shape != (K,) or self.v_star.shape != (self.W1_star.shape[0],):
            raise ValidationError("Instance.v", f"shapes {self.v.shape}, {self.v_star.shape}; "
                                  f"expected ({K},) and ({self.W1_star.shape[0]},).")
        if self.F is not None and self.F.shape != (N,):
            raise ValidationError("Instance.F", f"shape {self.F.shape}, expected ({N},).")
        if self.b_fa is not None and self.b_fa.shape != (K,):
            raise ValidationError("Instance.b_fa", f"shape {self.b_fa.shape}, expected ({K},).")

    @property
    def N(self) -> int:
        return int(self.W1.shape[1])

    @property
    def K(self) -> int:
        return int(self.W1.shape[0])

    @property
    def M(self) -> int:
        return int(self.W1_star.shape[0])

    def order_parameters(self, W1=None) -> th.OrderParameters:
        """Q, R, T (and b, b*, Phi when F is set) of ``W1`` (default: the initial student)."""
        W1 = self.W1 if W1 is None else W1
        F = None if self.F is None else self.F.astype(np.float64)
        return th.order_parameters(np.asarray(W1, np.float64), self.W1_star.astype(np.float64),
                                   F, scale="practical")


def make_instance(N: int = 1000, K: int = 2, M: int = 2, *, seed: int = 0, w_scale: float = 1.0,
                  v_scale: float = 1.0, v_star: str = "ones", f_scale: float | None = None,
                  fa_scale: float = 1.0) -> Instance:
    r"""A random instance as in spec §6.3.

    Student :math:`w\sim w_{\rm scale}\mathcal N(0,1)`, :math:`v\sim v_{\rm scale}\mathcal N(0,1)`;
    teacher :math:`w^*\sim\mathcal N(0,1)`, :math:`v^*=\mathbf 1` (``v_star="ones"``) or
    :math:`\mathcal N(0,1)` (``"normal"``); FA feedback :math:`b\sim fa_{\rm scale}\mathcal
    N(0,1)^K`; PEPITA/AFA feedback :math:`F=f_{\rm scale}\,f`, :math:`f\sim\mathcal N(0,I_N)`
    (regime (b) of spec §5, :math:`\Phi\approx f_{\rm scale}^2N`), or none.

    Each piece comes from its own random stream under ``seed`` (changing ``f_scale`` does not
    change the weights).
    """
    for name, val in (("N", N), ("K", K), ("M", M)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValidationError(f"make_instance.{name}", f"got {val!r}, expected an int >= 1.")
    if v_star not in ("ones", "normal"):
        raise ValidationError("make_instance.v_star", f"got {v_star!r}, expected 'ones' or "
                              "'normal'.")
    sq = math.sqrt(N)
    w = w_scale * component_rng(seed, "ts:w").standard_normal((K, N))
    ws = component_rng(seed, "ts:w_star").standard_normal((M, N))
    v = v_scale * component_rng(seed, "ts:v").standard_normal(K)
    vs = np.ones(M) if v_star == "ones" else component_rng(seed, "ts:v_star").standard_normal(M)
    b = fa_scale * component_rng(seed, "ts:b_fa").standard_normal(K)
    F = None if f_scale is None else f_scale * component_rng(seed, "ts:F").standard_normal(N)
    return Instance(w / sq, v, ws / sq, vs, F, b)


def plant_feedback(inst: Instance, b, b_star, Phi: float, *, seed: int = 0) -> Instance:
    r"""Replace F by one with prescribed macroscopic overlaps (regime (a) of spec §5).

    Builds :math:`F=A^\top c+F_\perp` with :math:`A` the stacked rows of :math:`W_1, W_1^*`,
    :math:`c` solving :math:`-AF=(b,b^*)`, and a random :math:`F_\perp\perp` the rows of A scaled
    so that :math:`\lVert F\rVert^2=\Phi`. Needs :math:`\Phi\ge(b,b^*)^\top(AA^\top)^{-1}(b,b^*)`
    (the covariance of :math:`(\lambda,\nu,x\cdot F)` must be PSD).
    """
    A = np.concatenate([inst.W1, inst.W1_star]).astype(np.float64)
    target = -np.concatenate([np.asarray(b, float), np.asarray(b_star, float)])
    if target.shape != (inst.K + inst.M,):
        raise ValidationError("plant_feedback.b", f"lengths {np.shape(b)}, {np.shape(b_star)}; "
                              f"expected ({inst.K},) and ({inst.M},).")
    G = A @ A.T
    c = np.linalg.solve(G, target)
    par = A.T @ c
    rest = float(Phi) - float(par @ par)
    if rest < 0:
        raise ValidationError("plant_feedback.Phi", f"got {Phi}; the prescribed overlaps need "
                              f"Phi >= {par @ par:.4g}.")
    f = component_rng(seed, "ts:F_perp").standard_normal(inst.N)
    f -= A.T @ np.linalg.solve(G, A @ f)
    F = par + math.sqrt(rest) * f / np.linalg.norm(f)
    return replace(inst, F=F)


def plant_student(inst: Instance, Q, R, *, seed: int = 0) -> Instance:
    r"""Replace the student's first layer by one with exact overlaps Q (K, K) and R (K, M).

    :math:`w_k=\sqrt N(A_kU+B_kV)` with U an orthonormal basis of the teacher rows, V random
    orthonormal directions orthogonal to U, :math:`A=RL^{-\top}` (:math:`W^*=\sqrt N LU`) and
    :math:`BB^\top=Q-AA^\top` (Cholesky). Used for the plateau (spec §7.11).
    """
    N, K, M = inst.N, inst.K, inst.M
    Q = np.asarray(Q, float)
    R = np.asarray(R, float)
    Ws = inst.W1_star.astype(np.float64)            # = w*/sqrt(N)
    Uq, Lt = np.linalg.qr(Ws.T)                     # Ws.T = Uq Lt  ->  Ws = Lt.T Uq.T
    U = Uq.T                                        # (M, N) orthonormal rows
    L = Lt.T                                        # Ws = L U  (so w* = sqrt(N) L U)
    # With W1 = A U + B V (= w / sqrt(N)): R = W1 Ws^T = A L^T, Q = W1 W1^T = A A^T + B B^T.
    A = np.linalg.solve(L, R.T).T
    Bm = np.linalg.cholesky(Q - A @ A.T)
    Vr = component_rng(seed, "ts:plant_V").standard_normal((K, N))
    Vr -= (Vr @ U.T) @ U
    Vq, _ = np.linalg.qr(Vr.T)
    W1 = A @ U + Bm @ Vq.T
    return replace(inst, W1=W1)


# --------------------------------------------------------------------------------------------
# Circuits
# --------------------------------------------------------------------------------------------


def _check_rule(rule, where):
    if rule not in RULES:
        raise ValidationError(where, f"got {rule!r}, expected one of {RULES}.")


def build_student(inst: Instance, rule: str, *, last_layer_error: str = "clean"):
    """Circuit, protocol and plasticity rule of the student for ``rule`` (see module doc).

    Returns ``(circuit, protocol, rule_object)``.
    """
    _check_rule(rule, "build_student.rule")
    if rule in ("afa", "pepita") and inst.F is None:
        raise ValidationError("build_student.inst.F", f"rule {rule!r} needs the feedback vector "
                              "F.", "make_instance(..., f_scale=0.07) or plant_feedback().")
    if rule == "fa" and inst.b_fa is None:
        raise ValidationError("build_student.inst.b_fa", "rule 'fa' needs the feedback vector.")
    c = Circuit(f"ts-student-{rule}")
    c.population("input", inst.N, transfer="identity")
    c.population("hidden", inst.K, transfer="erf")
    c.population("output", 1, transfer="identity")
    c.error("error", "output", target="t")
    c.project("input", "hidden", name="W1", init=Given(inst.W1))
    c.project("hidden", "output", name="W2", init=Given(inst.v[None, :]))
    if rule in ("afa", "pepita"):
        c.feedback("error@clean", "input", name="F", init=Given(inst.F[:, None]), gain=1.0,
                   phases=("modulated",) if rule == "pepita" else None)
    if rule == "pepita":
        protocol = Protocol((Phase("clean", clamp={"input": "x"}),
                             Phase("modulated", clamp={"input": "x"})))
        r = PEPITA(convention="icml2022", last_layer_error=last_layer_error, feedback="F")
    else:
        gates = ("W1", "W2") if rule == "afa" else None
        protocol = Protocol((Phase("clean", clamp={"input": "x"}, gates=gates),))
        r = {"bp": lambda: BP(),
             "fa": lambda: FA(feedback_init=Given(inst.b_fa[None, :])),
             "afa": lambda: AFA(feedback="F")}[rule]()
    return c, protocol, r


def build_teacher(inst: Instance):
    """Circuit and protocol of the teacher SCM (fixed weights ``W1_star``, ``v_star``)."""
    c = Circuit("ts-teacher")
    c.population("input", inst.N, transfer="identity")
    c.population("hidden", inst.M, transfer="erf")
    c.population("output", 1, transfer="identity")
    c.project("input", "hidden", name="W1", init=Given(inst.W1_star), plastic=False)
    c.project("hidden", "output", name="W2", init=Given(inst.v_star[None, :]), plastic=False)
    return c, Protocol((Phase("clean", clamp={"input": "x"}),))


#: Readout learning-rate multiplier used to freeze v (train_v=False): the engine's BP/FA/AFA
#: update every projection of the chain and SGD.lr_scale must be > 0, so a frozen readout is a
#: vanishing rate; updates ~1e-33 leave float32 weights of order 1 bit-identical.
_FROZEN_SCALE = 1e-30


def compile_student(inst: Instance, rule: str, *, eta: float, eta_v: float | None = None,
                    train_v: bool = True, last_layer_error: str = "clean", seed: int = 0):
    """Compile the student for online learning (batch 1, float targets, SGD without momentum)."""
    eta_v = eta if eta_v is None else eta_v
    if not (eta > 0 and math.isfinite(eta)):
        raise ValidationError("compile_student.eta", f"got {eta!r}, expected a number > 0.")
    if train_v and not (eta_v > 0 and math.isfinite(eta_v)):
        raise ValidationError("compile_student.eta_v", f"got {eta_v!r}, expected a number > 0 "
                              "(or train_v=False).")
    c, protocol, r = build_student(inst, rule, last_layer_error=last_layer_error)
    scale = (eta_v / eta) if train_v else _FROZEN_SCALE
    opt = SGD(lr=eta / inst.N, momentum=0.0, lr_scale={"W2": scale})
    return compile_plan(c, protocol, rules=[r], optimizer=opt, batch=1, seed=seed,
                        targets="values")


class Teacher:
    """The teacher circuit compiled for inference: ``teacher(X) -> y_clean`` (float32)."""

    def __init__(self, inst: Instance, batch: int = 1024):
        c, protocol = build_teacher(inst)
        self.sim = Simulator(compile_plan(c, protocol, batch=batch, output="output"))

    def __call__(self, X) -> np.ndarray:
        return self.sim.outputs(X)[:, 0]


class DataStream:
    r"""Fresh i.i.d. samples :math:`x\sim\mathcal N(0,I_N)` with targets
    :math:`y=y_{\rm teacher}(x)+\sigma\zeta`.

    Samples are generated in fixed blocks from the stream ``"ts:data:<seed>"``, so the sequence
    does not depend on how it is consumed (``take(10)`` twice equals ``take(20)``).
    """

    def __init__(self, teacher: Teacher, N: int, seed: int, sigma: float = 0.0,
                 block: int = 4096):
        self.teacher, self.N, self.sigma, self.block = teacher, N, float(sigma), int(block)
        self.rng = component_rng(seed, f"ts:data:{seed}")
        self._X = np.zeros((0, N), np.float32)
        self._y = np.zeros(0, np.float32)
        self._i = 0

    def _refill(self):
        X = self.rng.standard_normal((self.block, self.N), dtype=np.float32)
        zeta = self.rng.standard_normal(self.block)
        y = self.teacher(X).astype(np.float64) + self.sigma * zeta
        self._X, self._y, self._i = X, y.astype(np.float32), 0

    def take(self, n: int):
        """The next ``n`` samples as ``(X (n, N) float32, y (n,) float32)``."""
        xs, ys = [], []
        while n > 0:
            if self._i == len(self._y):
                self._refill()
            k = min(n, len(self._y) - self._i)
            xs.append(self._X[self._i:self._i + k])
            ys.append(self._y[self._i:self._i + k])
            self._i += k
            n -= k
        if not xs:
            return np.zeros((0, self.N), np.float32), np.zeros(0, np.float32)
        return np.concatenate(xs), np.concatenate(ys)


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


@dataclass
class SimRun:
    """Order parameters of S simulated data streams at the output times.

    Arrays have leading axes (time, seed): ``eps_g`` (n, S), ``Q`` (n, S, K, K), ``R`` (n, S, K,
    M), ``v`` (n, S, K), ``b`` (n, S, K) (the feedback in use: v for BP, the fixed b for FA,
    :math:`-W_1F` for AFA/PEPITA). Rows after a divergence (``t_fail[s]``) are NaN.
    """

    rule: str
    t: np.ndarray
    steps: np.ndarray
    seeds: tuple
    eps_g: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    v: np.ndarray
    b: np.ndarray
    T: np.ndarray
    v_star: np.ndarray
    b_star: np.ndarray | None
    Phi: float | None
    eta: float
    eta_v: float
    sigma: float
    train_v: bool
    t_fail: list = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def cos_vb(self) -> np.ndarray:
        """cos(v, b) per time and seed, (n, S)."""
        num = np.einsum("tsk,tsk->ts", self.v, self.b)
        den = np.linalg.norm(self.v, axis=-1) * np.linalg.norm(self.b, axis=-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den


def _steps_of(times, N):
    times = np.asarray(times, float)
    if times.ndim != 1 or times.size == 0 or times[0] < 0 or np.any(np.diff(times) <= 0):
        raise ValidationError("simulate.times", "expected a non-empty, non-negative, strictly "
                              "increasing 1-D array of times (samples / N).")
    steps = np.round(times * N).astype(np.int64)
    if np.any(np.diff(steps) <= 0):
        raise ValidationError("simulate.times", f"two output times fall on the same step at "
                              f"N = {N} (times are rounded to multiples of 1/N).")
    return steps


def _feedback_now(rule, inst, W1, v):
    if rule == "bp":
        return v.copy()
    if rule == "fa":
        return inst.b_fa.astype(np.float64)
    return -(W1 @ inst.F.astype(np.float64))


def simulate(inst: Instance, rule: str, *, eta: float, eta_v: float | None = None,
             sigma: float = 0.0, times, seeds=(0, 1, 2), train_v: bool = True,
             last_layer_error: str = "clean", block: int = 4096, progress=None) -> SimRun:
    r"""Train the student online with the engine's ``rule``, one run per data seed.

    Every run starts from the same instance; seed ``s`` draws its own data stream. ``times`` are
    in units of N samples (t = steps / N) and are rounded to whole steps. Returns the order
    parameters and :math:`\epsilon_g` at those times. A run that diverges (the engine raises
    :class:`~neurosim.errors.SimulationError`, e.g. PEPITA's exponential growth of b for large
    :math:`\Phi`) is reported with a :class:`~neurosim.errors.NeurosimWarning`, NaN rows from
    there on and its time in ``t_fail``.
    """
    import time as _time

    eta_v = eta if eta_v is None else eta_v
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValidationError("simulate.seeds", "empty; expected at least one data seed.")
    N, K, M = inst.N, inst.K, inst.M
    steps = _steps_of(times, N)
    t = steps / N
    plan = compile_student(inst, rule, eta=eta, eta_v=eta_v, train_v=train_v,
                           last_layer_error=last_layer_error)
    sim = Simulator(plan)
    teacher = Teacher(inst, batch=min(block, 1024))
    n, S = len(steps), len(seeds)
    out = {k: np.full(shape, np.nan) for k, shape in
           (("Q", (n, S, K, K)), ("R", (n, S, K, M)), ("v", (n, S, K)), ("b", (n, S, K)))}
    Ws = inst.W1_star.astype(np.float64)
    T = Ws @ Ws.T
    t_fail = []
    t0 = _time.perf_counter()
    for si, seed in enumerate(seeds):
        sim.reset(rates=True, weights=True, optimizer=True, monitors=True)
        data = DataStream(teacher, N, seed, sigma, block)
        done, failed = 0, None
        for j, target in enumerate(steps):
            while done < target and failed is None:
                X, y = data.take(int(min(block, target - done)))
                try:
                    sim.train(X, T=y[:, None], chunk=len(y))
                except SimulationError as exc:
                    # the kernel's failure record holds the (0-based) trial since the reset
                    failed = (int(sim._info[2]) + 1) / N
                    warnings.warn(f"simulate({rule!r}, seed {seed}): the run diverged between "
                                  f"t = {done / N:g} and {(done + len(y)) / N:g} ({exc}); later "
                                  "outputs are NaN.", NeurosimWarning, stacklevel=2)
                    break
                done += len(y)
            if failed is not None:
                break
            W1 = sim.weights["W1"].astype(np.float64)
            v = sim.weights["W2"][0].astype(np.float64)
            out["Q"][j, si] = W1 @ W1.T
            out["R"][j, si] = W1 @ Ws.T
            out["v"][j, si] = v
            out["b"][j, si] = _feedback_now(rule, inst, W1, v)
            if progress is not None:
                progress(si, j)
        t_fail.append(failed)
    eg = np.full((n, S), np.nan)
    ok = np.all(np.isfinite(out["Q"]), axis=(2, 3))
    if np.any(ok):
        eg[ok] = th.eps_g(out["Q"][ok], out["R"][ok], T, out["v"][ok],
                          inst.v_star.astype(np.float64))
    op = inst.order_parameters() if inst.F is not None else None
    return SimRun(rule=rule, t=t, steps=steps, seeds=seeds, eps_g=eg, T=T,
                  v_star=inst.v_star.astype(np.float64),
                  b_star=None if op is None else op.b_star, Phi=None if op is None else op.Phi,
                  eta=float(eta), eta_v=float(eta_v), sigma=float(sigma), train_v=train_v,
                  t_fail=t_fail, wall_s=_time.perf_counter() - t0, **out)


# --------------------------------------------------------------------------------------------
# Theory on the same instance
# --------------------------------------------------------------------------------------------


def initial_order_parameters(inst: Instance, rule: str) -> dict:
    """Keyword arguments of :func:`neurosim.theory.integrate` for the instance's initial state.

    Q, R, T, v, v* from the float32 weights the engine starts from; FA: the fixed b; AFA and
    PEPITA: :math:`b(0)=-W_1F`, :math:`b^*=-W_1^*F` and :math:`\\Phi=\\lVert F\\rVert^2`.
    """
    _check_rule(rule, "initial_order_parameters.rule")
    op = inst.order_parameters()
    kw = dict(Q=op.Q, R=op.R, T=op.T, v=inst.v.astype(np.float64),
              v_star=inst.v_star.astype(np.float64))
    if rule == "fa":
        kw["b"] = inst.b_fa.astype(np.float64)
    elif rule in ("afa", "pepita"):
        kw.update(b=op.b, b_star=op.b_star, Phi=op.Phi)
    return kw


def theory(inst: Instance, rule: str, *, eta: float, eta_v: float | None = None,
           sigma: float = 0.0, times, train_v: bool = True, dt: float = 0.01,
           method: str = "rk4") -> th.Trajectory:
    """The ODE of ``rule`` (spec §4) started from the instance's initial order parameters.

    ``pepita`` is AFA plus the first-order PEPITA corrections (spec §4.5). A PEPITA ODE that
    blows up warns and returns NaN rows (see :func:`neurosim.theory.integrate`).
    """
    kw = initial_order_parameters(inst, rule)
    return th.integrate(rule, eta=eta, eta_v=eta_v, sigma=sigma, times=np.asarray(times, float),
                        train_v=train_v, dt=dt, method=method, **kw)


def _fields(Q, R, T, v, v_star):
    """Joint covariance C of (lambda_1..K, nu_1..M), broadcast over leading axes, the weights
    a = (-v, v*) with Delta = sum_c a_c g(u_c) + noise, K and P = K + M."""
    Q, R, T = (np.asarray(a, float) for a in (Q, R, T))
    v, v_star = np.asarray(v, float), np.asarray(v_star, float)
    K, M = v.shape[-1], v_star.shape[-1]
    lead = np.broadcast_shapes(Q.shape[:-2], R.shape[:-2], v.shape[:-1])
    Q = np.broadcast_to(Q, lead + (K, K))
    R = np.broadcast_to(R, lead + (K, M))
    T = np.broadcast_to(T, lead + (M, M))
    v = np.broadcast_to(v, lead + (K,))
    vs = np.broadcast_to(v_star, lead + (M,))
    C = np.concatenate([np.concatenate([Q, R], -1),
                        np.concatenate([np.swapaxes(R, -1, -2), T], -1)], -2)
    a = np.concatenate([-v, vs], -1)
    P = K + M
    return C, a, K, P


def pepita_E(Q, R, T, v, v_star, sigma: float = 0.0) -> np.ndarray:
    r""":math:`E_k=\mathbb E[g'(\lambda_k)\Delta^2]` (spec §4.5), batched over leading axes.

    :math:`E_k=\sum_{cd}a_ca_dJ_3(k,c,d)+\sigma^2J_1(k)` with :math:`a=(-v,v^*)`. It sets the
    rate :math:`\eta\Phi E_k` at which PEPITA's presynaptic term amplifies b (spec §5).
    """
    C, a, K, P = _fields(Q, R, T, v, v_star)
    k, c, d = np.meshgrid(np.arange(K), np.arange(P), np.arange(P), indexing="ij")
    idx = np.stack([k, c, d], -1)                                  # (K, P, P, 3)
    blocks = C[..., idx[..., :, None], idx[..., None, :]]          # (..., K, P, P, 3, 3)
    E = np.einsum("...kcd,...c,...d->...k", th.J3(blocks), a, a)
    return E + sigma**2 * th.J1(C[..., np.arange(K), np.arange(K)][..., None, None])


def pepita_afa_product(traj: th.Trajectory, Phi: float, sigma: float | None = None) -> dict:
    r"""The PEPITA ~ AFA control parameter of spec §5 along an (AFA) ODE trajectory.

    Returns ``Phi``, ``E0`` (:math:`\max_kE_k` at t = 0), ``product_t0`` (:math:`\eta\Phi E_0
    t_{\max}`) and ``integrated`` (:math:`\eta\Phi\int_0^{t}\max_kE_k\,ds` per output time, by
    the trapezoidal rule on the output grid). PEPITA ~ AFA requires these to be << 1.
    """
    sigma = traj.sigma if sigma is None else sigma
    E = pepita_E(traj.Q, traj.R, traj.T, traj.v, traj.v_star, sigma).max(-1)
    integ = np.concatenate([[0.0], np.cumsum(0.5 * (E[1:] + E[:-1]) * np.diff(traj.t))])
    return dict(Phi=float(Phi), E0=float(E[0]),
                product_t0=float(traj.eta * Phi * E[0] * traj.t[-1]),
                integrated=traj.eta * Phi * (integ + E[0] * traj.t[0]))


def afa_E2(Q, R, T, v, v_star, sigma: float = 0.0) -> np.ndarray:
    r""":math:`\mathbb E[g'(\lambda_k)^2\Delta^2]` per student unit (the diagonal of the
    :math:`\eta^2` term's bracket in spec §4.1), batched over leading axes.

    :math:`\sum_{cd}a_ca_dI_4(k,k,c,d)+\sigma^2J_2(k,k)` with :math:`a=(-v,v^*)`.
    """
    C, a, K, P = _fields(Q, R, T, v, v_star)
    k, c, d = np.meshgrid(np.arange(K), np.arange(P), np.arange(P), indexing="ij")
    idx = np.stack([k, k, c, d], -1)                               # (K, P, P, 4)
    blocks = C[..., idx[..., :, None], idx[..., None, :]]          # (..., K, P, P, 4, 4)
    E2 = np.einsum("...kcd,...c,...d->...k", th.I4(blocks), a, a)
    kk = np.stack([np.arange(K), np.arange(K)], -1)                # (K, 2)
    return E2 + sigma**2 * th.J2(C[..., kk[:, :, None], kk[:, None, :]])


def feedback_variance(traj: th.Trajectory, Phi: float, N: int) -> np.ndarray:
    r"""Predicted single-run variance of the adaptive feedback :math:`b_k(t)` (spec §5).

    Each step changes :math:`b_k` by :math:`-\frac{\eta}{N}\delta_k\,x\cdot F` with
    :math:`\operatorname{Var}(x\cdot F)=\Phi`, so per unit of t the variance grows by
    :math:`\eta^2b_k^2\,\mathbb E[g'(\lambda_k)^2\Delta^2]\,\Phi/N`. This returns
    :math:`\frac{\eta^2\Phi}{N}\int_0^t b_k^2\,\mathbb E[g'^2_k\Delta^2]\,ds` along the ODE
    trajectory (trapezoidal rule on its output times; pass a fine grid), shape (n, K): the
    free-diffusion estimate, ignoring how the drift damps or amplifies a deviation. In regime (a)
    (:math:`\Phi=O(1)`) it is O(1/N): b self-averages; in regime (b) (:math:`\Phi=\varepsilon^2N`)
    it is O(1) and (AFA-b) is only the drift closure.
    """
    E2 = afa_E2(traj.Q, traj.R, traj.T, traj.v, traj.v_star, traj.sigma)
    rate = traj.eta**2 * Phi / N * traj.b**2 * E2
    dt = np.diff(traj.t)[:, None]
    cum = np.concatenate([np.zeros((1, rate.shape[1])),
                          np.cumsum(0.5 * (rate[1:] + rate[:-1]) * dt, axis=0)])
    return cum + rate[:1] * traj.t[0]
