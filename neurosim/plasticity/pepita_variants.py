"""PEPITA variants of Srinivasan et al. (ICLR 2024), each one description + one build function
on the same engine (algorithms.md 1.1, 1.2):

* :class:`NormalizedPEPITA` -- activation normalization: every hidden activity divided by its
  norm, per sample (default) or by the Frobenius norm of the whole batch matrix (the released
  code's choice, ``norm="batch"``);
* :class:`PEPITATimeLocal` -- PEPITA-TL: the Hebbian form of the update applied in two SGD steps,
  the anti-Hebbian clean-pass step right after the clean pass and the Hebbian modulated-pass
  step right after the modulated pass, so no activity is held across passes;
* :class:`WeightMirroring` -- weight mirroring of F: F = B_1 ... B_L stored as factors (the
  weights of inactive feedback projections ``B1`` .. ``BL``), each B_l driven towards W_l^T by
  noise through the layer's forward path, with pre-mirroring epochs and a mirroring period.

Weight decay needs no rule: it is the optimizer's ``SGD(weight_decay=...)`` (L2 inside the
momentum step, on the forward weights only).

How normalization is realised. The circuit's populations compute the *un-normalized* chain
``h_l = f(W_l h_{l-1})``. For a positively homogeneous transfer (ReLU, identity), no biases and
inverted dropout, the normalized network's activities are exactly ``h_l / ||h_l||`` (per sample)
or ``h_l / ||H_l||_F`` (per batch) of that chain, by induction over layers, and its logits are
``W_L (h_{L-1} / ||h_{L-1}||)``. So the rule (i) at the end of the clean pass normalizes the held
clean activities, recomputes the normalized logits and overwrites the held clean error
``error@clean`` with the normalized network's error, which the top-down projection F then reads in
the modulated pass; (ii) at the end of the trial normalizes the modulated activities the same way
and forms the updates from normalized activities. Classification (argmax) is unchanged by the
positive per-sample / per-batch scalings, so inference needs no change. Other transfers or biased
populations are refused.

How weight mirroring is scheduled. The mirroring step for trial n runs at the start of trial n+1
(after trial n's optimizer step, which the compiler emits last in ``trial_end``), before the clean
pass. Epoch-level schedules (pre-mirroring epochs with no W update, mirroring only every k-th
epoch) are evaluated in the compiled program from a persistent trial counter and
``trials_per_epoch`` (known when the scenario is built) with scalar arithmetic: gates g in {0, 1}
multiply the mirroring noise and, during pre-mirroring, the rules' weight updates. The rescaling of
the factors by ``(sd_F / std(F))^(1/L)`` needs a root of a scalar, computed by division-free
Newton steps for the inverse 2L-th root of ``w = mean(F^2) / sd_F^2``, started below the root at
``y0 = ((2L + 1) / 1e4)^(1/2L)`` (monotone convergence for any 0 < w < 1e4; ``newton_steps``
= 20 reach float32 precision for 1e-2 <= w <= 1e3, i.e. std(F) within a factor 30 of sd_F
after a mirroring step; checked in tests/test_pepita_variants.py). The decay ``B_l *= 1 - lr wd``
multiplies F by a constant that the rescaling undoes, so it is folded into the step size:
``B_l <- g (B_l + lr / (1 - lr wd) xi^T y / B)``, identical to decaying, adding
``lr xi^T y / B`` and rescaling.

Mirroring noise. ``noise_dist = "gaussian"`` draws the reference's ``noise * randn`` (counter-based
Box-Muller, :func:`neurosim.kernels.rng.normal01`); the default ``"rademacher"`` draws
``xi = +-noise`` with probability 1/2 each (one dropout-mask draw, cheaper). Both have mean 0 and
covariance noise^2 I, and for any symmetric noise ``E[xi relu(W xi)^T] = noise^2 W^T / 2``
exactly (z -> -z symmetry), so the expected mirroring signal is the same; the campaign in
docs/results.md used the default. Either way ``xi -= mean(xi)`` follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CompileError, ValidationError
from ..optable import RELU, SOFTMAX
from ..params import check_choice, check_float, check_int
from .base import PlasticityRule, register_builder
from .optim import SGD
from .pepita import PEPITA, _check_sign

_HOMOGENEOUS = ("relu", "identity", "linear")


# ---------------------------------------------------------------------------------------------
# helpers shared by the builders
def _layered_chain(pb, error_name, where):
    """Feedforward projections input -> ... -> error.output (input side first) and the
    populations along the way."""
    c = pb.circuit
    err = pb.require_error(error_name, f"{where}.error")
    projs, pops, pop = [], [err.output], err.output
    while True:
        inc = [p for p in c.projections.values()
               if p.post == pop and p.role == "feedforward" and p.pre_phase is None]
        if not inc:
            break
        if len(inc) > 1:
            raise ValidationError(where, f"population {pop!r} has several feedforward inputs "
                                  f"{[p.name for p in inc]}; the rule needs a layered chain.")
        projs.append(inc[0].name)
        pop = inc[0].pre_population
        pops.append(pop)
    if not projs:
        raise ValidationError(where, f"no feedforward projection into {err.output!r}.")
    return projs[::-1], pops[::-1]


def _const(pb, name, rows, cols, value):
    """A persistent constant buffer (never written by any instruction)."""
    return pb.persistent(f"const.{name}", rows, cols, init=np.full((rows, cols), value, np.float32),
                         kind="constant")


def _ones_batch(pb):
    """A batch-shaped (B, 1) column of ones (its view has the minibatch's nb rows)."""
    return pb.buffer("const.ones_batch", pb.batch, 1, True, kind="constant",
                     init=np.ones((pb.batch, 1), np.float32))


def _col_of(pb, name, rows, scalar):
    """Emit: a (rows, 1) persistent column filled with the (1, 1) buffer ``scalar``."""
    col = pb.persistent(f"{name}.col{rows}", rows, 1)
    pb.gemm(col, _const(pb, f"ones{rows}x1", rows, 1, 1.0), scalar)
    return col


def _step(pb, name, post, pre, alpha, opt, section_tag, wd):
    """Emit ``dW = alpha post^T pre`` and an SGD-with-momentum step of projection ``name`` with
    its own velocity buffer ``<name>.<tag>.V`` (so several steps per trial do not share one);
    the compiler's fusion pass folds the momentum update into the GEMM when nothing else reads
    dW and ``wd == 0``."""
    from ..compiler import emit_sgd

    shape = pb.circuit.shape_of(pb.circuit.projections[name])
    dW = pb.buffer(f"{name}.{section_tag}.dW", *shape, kind="optimizer")
    pb.gemm(dW, post, pre, trans_a=True, alpha=alpha, where=f"projection {name!r}")
    emit_sgd(pb, name, dW, opt, weight_decay=wd, velocity=f"{name}.{section_tag}.V")
    return dW


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormalizedPEPITA(PEPITA):
    """PEPITA with activation normalization (ICLR 2024): each hidden activity divided by its L2
    norm, per sample (``norm="sample"``, default) or by the Frobenius norm of the whole batch
    matrix (``norm="batch"``, the released code). The input is not normalized. Updates as
    :class:`~neurosim.PEPITA` with normalized activities and the normalized network's errors
    (see the module docstring for how this is computed exactly from the circuit's passes).

    Requires hidden transfers ReLU or identity and no biases (positive homogeneity)."""

    norm: str = "sample"
    eps: float = 1e-12
    name: str = "pepita_norm"

    def __post_init__(self):
        super().__post_init__()
        check_choice("NormalizedPEPITA.norm", self.norm, ("sample", "batch"))
        check_float("NormalizedPEPITA.eps", self.eps, low=0.0)


def _emit_normalize(pb, rule, dst, src, size):
    """dst = src / ||src_b|| per row (sample) or src / ||src||_F (batch)."""
    eps = rule.eps
    pb.op("ROW_NORMALIZE", f"{rule.name} normalization", dst=dst, src=src, eps=eps)
    pb.scale(dst, 1.0 / math.sqrt(size))            # ROW_NORMALIZE divides by the RMS
    if rule.norm == "sample":
        return
    # batch: r_b = <h_b, h_b/|h_b|>; u = (r_1..r_nb, 0..)/nb as a row (diagonal trick);
    # ROW_NORMALIZE(u) = r_j sqrt(B) / ||H||_F; back to a column and scale the rows.
    B = pb.batch
    tag = f"{rule.name}.bn{size}"
    prod = pb.scratch(f"{tag}.prod", size)
    r = pb.scratch(f"{tag}.r", 1)
    D = pb.scratch(f"{tag}.D", B)
    eye = pb.buffer(f"const.eye{B}", B, B, True, init=np.eye(B, dtype=np.float32),
                    kind="constant")
    u = pb.persistent(f"{tag}.u", 1, B)
    col = pb.scratch(f"{tag}.col", 1)
    pb.mul(prod, src, dst)
    pb.gemm(r, prod, _const(pb, f"ones{size}x1", size, 1, 1.0))
    pb.gemm(D, r, _const(pb, f"ones1x{B}", 1, B, 1.0))
    pb.mul(D, D, eye)
    pb.op("COL_MEAN", f"{rule.name} normalization", dst=u, src=D, alpha=1.0, beta=0.0)
    pb.op("ROW_NORMALIZE", f"{rule.name} normalization", dst=u, src=u, eps=eps)
    pb.gemm(col, eye, u, trans_b=True)
    pb.op("ROW_SCALE", f"{rule.name} normalization", dst=dst, s=col)
    pb.scale(dst, 1.0 / math.sqrt(B))


@register_builder(NormalizedPEPITA)
def build_normalized_pepita(pb, rule: NormalizedPEPITA):
    c = pb.circuit
    for ph in (rule.clean, rule.modulated):
        pb.require_phase(ph, "NormalizedPEPITA")
    err = pb.require_error(rule.error, "NormalizedPEPITA.error")
    _check_sign(pb, rule, err)
    projs, pops = _layered_chain(pb, rule.error, "NormalizedPEPITA")
    for p in pops[1:]:
        pop = c.populations[p]
        if p != err.output and pop.transfer not in _HOMOGENEOUS:
            raise ValidationError("NormalizedPEPITA", f"hidden population {p!r} has transfer "
                                  f"{pop.transfer!r}; normalization is realised exactly only for "
                                  "positively homogeneous transfers (relu, identity).")
        if pop.bias is not None:
            raise ValidationError("NormalizedPEPITA", f"population {p!r} has a bias; "
                                  "normalization needs bias-free layers.")
    hidden = pops[1:-1]
    t = pb._index["stim.t"]
    W_L = pb.weight(projs[-1])
    gain_L = c.projections[projs[-1]].gain
    n_out = c.populations[err.output].size
    norm = {}

    def normalized_pass(phase, err_dst):
        for p in hidden:
            n = c.populations[p].size
            dst = pb.scratch(f"{rule.name}.{p}@{phase}", n)
            _emit_normalize(pb, rule, dst, pb.rate(p, phase), n)
            norm[(p, phase)] = dst
        logits = pb.scratch(f"{rule.name}.logits@{phase}", n_out)
        out = pb.scratch(f"{rule.name}.out@{phase}", n_out)
        pb.gemm(logits, norm[(hidden[-1], phase)], W_L, trans_b=True, alpha=gain_L)
        pb.op("APPLY", f"{rule.name} normalized output", dst=out, src=logits, code=SOFTMAX)
        pb.sub(err_dst, out, t)

    err_clean = pb.rate(err.name, rule.clean)
    with pb.at(f"{rule.clean}:post"):
        normalized_pass(rule.clean, err_clean)       # F reads the normalized clean error
    with pb.at("trial_end"):
        err_mod = pb.scratch(f"{rule.name}.error@{rule.modulated}", n_out)
        normalized_pass(rule.modulated, err_mod)
        pre_phase = rule.modulated if rule.presynaptic == "modulated" else rule.clean
        for name in rule.modifies(pb):
            proj = pb.require_projection(name, "NormalizedPEPITA.projections")
            pre_pop = proj.pre_population
            pre = (norm[(pre_pop, pre_phase)] if (pre_pop, pre_phase) in norm
                   else pb.rate(pre_pop, pre_phase))
            dW, beta = pb.grad(name)
            if proj.post == err.output:
                post = err_mod if rule.last_layer_error == "modulated" else err_clean
            else:
                if proj.post not in hidden:
                    raise ValidationError("NormalizedPEPITA.projections", f"{name!r} does not "
                                          "end in a hidden layer or the output.")
                post = pb.scratch(f"{rule.name}.{name}.delta", c.populations[proj.post].size)
                pb.sub(post, norm[(proj.post, rule.clean)], norm[(proj.post, rule.modulated)])
            pb.gemm(dW, post, pre, trans_a=True, alpha=1.0, beta=beta)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PEPITATimeLocal(PEPITA):
    """PEPITA-TL (ICLR 2024, Section 5): the Hebbian form of PEPITA,
    ``dW_l = h_l h_{l-1}^T - h~_l h~_{l-1}^T`` (last layer ``h_L h_{L-1}^T - t h~_{L-1}^T``),
    applied as two SGD steps: the anti-Hebbian clean-pass term right after the clean pass (so
    the modulated pass already sees the changed weights), the Hebbian modulated-pass term right
    after the modulated pass. No activity is held across passes (the modulated pass still reads
    the clean error through F, as in PEPITA).

    Each of the two steps has its own momentum buffer (``<W>.<phase>.V``), so their sum follows
    ordinary momentum SGD on the summed update. Weight decay, if any, is applied once per trial,
    in the modulated-pass step.

    ``optimizer``: the steps run inside the phases, not in the compiler's end-of-trial optimizer
    step, so the rule needs the optimizer's settings; pass the same SGD as to
    :func:`~neurosim.compile_plan` (if the plan builder exposes ``pb.optimizer``, that one is
    used). The learning-rate schedule (``Simulator.set_lr``) applies to these steps as usual.
    ``presynaptic`` and ``last_layer_error`` do not apply (the Hebbian form fixes them).

    ``record_update=True`` also keeps the trial's summed update (clean + modulated terms) of
    each projection in ``<name>.<W>.update`` for diagnostics
    (:class:`~neurosim.diagnostics.GradientAlignment` with ``update=``); the two steps then
    write explicit update buffers instead of folding them into the momentum GEMM.
    """

    optimizer: SGD | None = None
    record_update: bool = False
    name: str = "pepita_tl"


@register_builder(PEPITATimeLocal)
def build_pepita_time_local(pb, rule: PEPITATimeLocal):
    c = pb.circuit
    for ph in (rule.clean, rule.modulated):
        pb.require_phase(ph, "PEPITATimeLocal")
    err = pb.require_error(rule.error, "PEPITATimeLocal.error")
    _check_sign(pb, rule, err)
    opt = getattr(pb, "optimizer", None) or rule.optimizer
    if opt is None:
        raise CompileError("PEPITATimeLocal.optimizer: the time-local rule steps inside the "
                           "phases and needs the optimizer's settings; pass "
                           "PEPITATimeLocal(optimizer=SGD(...)) with the SGD given to "
                           "compile_plan.")
    t = pb._index["stim.t"]
    for name in rule.modifies(pb):
        proj = pb.require_projection(name, "PEPITATimeLocal.projections")
        if not proj.plastic:
            raise ValidationError("PEPITATimeLocal.projections", f"projection {name!r} is fixed "
                                  "(plastic=False) but the rule updates it.")
        with pb.at(f"{rule.clean}:post"):      # anti-Hebbian: W -= lr/B h_l h_{l-1}^T
            d_c = _step(pb, name, pb.rate(proj.post, rule.clean),
                        pb.rate(proj.pre_population, rule.clean), 1.0, opt, rule.clean, 0.0)
        with pb.at(f"{rule.modulated}:post"):  # Hebbian: W += lr/B h~_l h~_{l-1}^T (t for last)
            post = t if proj.post == err.output else pb.rate(proj.post, rule.modulated)
            d_m = _step(pb, name, post, pb.rate(proj.pre_population, rule.modulated), -1.0, opt,
                        rule.modulated, opt.weight_decay)
            if rule.record_update:
                upd = pb.persistent(f"{rule.name}.{name}.update", *c.shape_of(proj))
                pb.copy(upd, d_c)
                pb.axpy(upd, d_m, 1.0)


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightMirroring(PlasticityRule):
    """Weight mirroring of PEPITA's F (ICLR 2024; algorithms.md 1.1).

    F = B_1 B_2 ... B_L, with B_l (shaped like W_l^T) the weights of the feedback projections
    ``factors`` (inactive in every phase; e.g. ``B1: hidden -> input``). A mirroring step, per
    layer l: ``xi = noise * N(0, 1)`` (``noise_dist = "gaussian"``, the reference) or ``+-noise``
    (``"rademacher"``, the default), ``xi -= mean(xi)``, ``y = block_l(xi)`` (linear, the
    trial's dropout mask, transfer; softmax for the last), ``B_l <- B_l + lr xi^T y / B - lr wd
    B_l``; then every B_l is rescaled by ``(sd_F / std(F))^(1/L)`` with ``sd_F = f_scale
    sqrt(2 / d_in)`` (std taken about 0, i.e. the RMS of F's entries), and F is recomputed.

    Schedule: the first ``premirror_epochs`` epochs run mirroring only (the weight updates of the
    rules listed *before* this one are zeroed); afterwards the mirroring step follows every
    minibatch's weight update in every ``period``-th epoch (epochs P, P+k, P+2k, ...).
    ``trials_per_epoch`` (minibatches per epoch) is needed when ``premirror_epochs > 0`` or
    ``period > 1``. List this rule after the rule that updates the forward weights.
    """

    factors: tuple = ()
    feedback: str = "F"
    error: str = "error"
    lr: float = 0.1
    wd: float = 0.5
    noise: float = 0.1
    noise_dist: str = "rademacher"
    f_scale: float = 0.05
    premirror_epochs: int = 0
    period: int = 1
    trials_per_epoch: int | None = None
    newton_steps: int = 20
    name: str = "wm"

    def __post_init__(self):
        if isinstance(self.factors, str) or not self.factors or \
                not all(isinstance(f, str) for f in self.factors):
            raise ValidationError("WeightMirroring.factors", f"got {self.factors!r}, expected the "
                                  "names of the factor projections B_1..B_L, input side first.")
        object.__setattr__(self, "factors", tuple(self.factors))
        check_float("WeightMirroring.lr", self.lr, low=0.0)
        check_float("WeightMirroring.wd", self.wd, low=0.0)
        check_float("WeightMirroring.noise", self.noise, low=0.0, low_open=True)
        check_choice("WeightMirroring.noise_dist", self.noise_dist, ("rademacher", "gaussian"))
        check_float("WeightMirroring.f_scale", self.f_scale, low=0.0, low_open=True)
        check_int("WeightMirroring.premirror_epochs", self.premirror_epochs, low=0)
        check_int("WeightMirroring.period", self.period, low=1)
        check_int("WeightMirroring.newton_steps", self.newton_steps, low=1)
        if self.lr * self.wd >= 1.0:
            raise ValidationError("WeightMirroring.wd", f"lr * wd = {self.lr * self.wd:g}; the "
                                  "decay factor 1 - lr wd must stay positive (lr * wd < 1).")
        if self.trials_per_epoch is not None:
            check_int("WeightMirroring.trials_per_epoch", self.trials_per_epoch, low=1)
        elif self.premirror_epochs > 0 or self.period > 1:
            raise ValidationError("WeightMirroring.trials_per_epoch", "missing; an epoch schedule "
                                  "(premirror_epochs > 0 or period > 1) needs the number of "
                                  "minibatches per epoch.")

    def modifies(self, pb):
        return []

    def reads(self, pb):
        return []


def _step01(pb, dst, src, shift, tag):
    """dst = [src + shift >= 0] for integer-valued (1, 1) src: relu(x + 1) - relu(x)."""
    a = pb.persistent(f"{tag}.a", 1, 1)
    pb.copy(a, src)
    pb.op("AFFINE", tag, dst=a, s=1.0, c=shift + 1.0)
    pb.op("APPLY", tag, dst=a, src=a, code=RELU)
    pb.copy(dst, src)
    pb.op("AFFINE", tag, dst=dst, s=1.0, c=shift)
    pb.op("APPLY", tag, dst=dst, src=dst, code=RELU)
    pb.sub(dst, a, dst)


@register_builder(WeightMirroring)
def build_weight_mirroring(pb, rule: WeightMirroring):
    c = pb.circuit
    where = "WeightMirroring"
    projs, pops = _layered_chain(pb, rule.error, where)
    L = len(projs)
    if len(rule.factors) != L:
        raise ValidationError(f"{where}.factors", f"got {len(rule.factors)} factors for {L} "
                              f"layers {projs}; F = B_1 ... B_L needs one per layer.")
    fb = pb.require_projection(rule.feedback, f"{where}.feedback")
    d_in, n_out = c.populations[pops[0]].size, c.populations[pops[-1]].size
    if c.shape_of(fb) != (d_in, n_out):
        raise ValidationError(f"{where}.feedback", f"{fb.name!r} has shape {c.shape_of(fb)}, "
                              f"expected (d_in, n_out) = {(d_in, n_out)}.")
    Bs = []
    for l, (bname, wname) in enumerate(zip(rule.factors, projs)):
        bp = pb.require_projection(bname, f"{where}.factors")
        want = c.shape_of(c.projections[wname])[::-1]
        if c.shape_of(bp) != want:
            raise ValidationError(f"{where}.factors", f"{bname!r} has shape {c.shape_of(bp)}, "
                                  f"expected W_{l + 1}^T's {want} ({wname!r} transposed).")
        if bp.plastic:
            raise ValidationError(f"{where}.factors", f"{bname!r} is plastic; the factors are "
                                  "changed by mirroring only (make it plastic=False).")
        Bs.append(pb.weight(bname))
    tag = rule.name
    sd_f = rule.f_scale * math.sqrt(2.0 / d_in)
    eta = rule.lr / (1.0 - rule.lr * rule.wd)
    gated = rule.premirror_epochs > 0 or rule.period > 1
    ones_b = _ones_batch(pb)
    with pb.at("trial_start"):
        g_wm = None
        if gated:
            T, P, k = rule.trials_per_epoch, rule.premirror_epochs, rule.period
            n = pb.persistent(f"{tag}.trial", 1, 1)                       # n = this trial
            z = pb.persistent(f"{tag}.cycle", 1, 1,
                              init=np.full((1, 1), (-2 - P * T) % (k * T), np.float32))
            g_pre = pb.persistent(f"{tag}.g_pre", 1, 1)
            g_wm = pb.persistent(f"{tag}.g_wm", 1, 1)
            g_w = pb.persistent(f"{tag}.g_w", 1, 1)
            tmp = pb.persistent(f"{tag}.tmp", 1, 1)
            # z <- (z + 1) mod kT: the position of trial n-1-PT in its cycle of k epochs
            pb.op("AFFINE", tag, dst=z, s=1.0, c=1.0)
            _step01(pb, tmp, z, -float(k * T), f"{tag}.wrap")
            pb.axpy(z, tmp, -float(k * T))
            # g_pre = [n < PT]; g_w = 1 - g_pre (weight updates allowed)
            _step01(pb, g_w, n, -float(P * T), f"{tag}.pre")
            pb.copy(g_pre, g_w)
            pb.op("AFFINE", tag, dst=g_pre, s=-1.0, c=1.0)
            # g_wm = g_pre + [n >= PT + 1] * [z < T]
            _step01(pb, g_wm, n, -float(P * T + 1), f"{tag}.post")
            _step01(pb, tmp, z, -float(T), f"{tag}.cyc")
            pb.op("AFFINE", tag, dst=tmp, s=-1.0, c=1.0)
            pb.mul(g_wm, g_wm, tmp)
            pb.axpy(g_wm, g_pre, 1.0)
            pb.op("AFFINE", tag, dst=n, s=1.0, c=1.0)                     # next trial
        for l in range(L if rule.lr > 0 else 0):     # lr = 0: F = B_1 ... B_L, never mirrored
            pre, post = pops[l], pops[l + 1]
            fan_in, fan_out = c.populations[pre].size, c.populations[post].size
            xi = pb.scratch(f"{tag}.xi{l}", fan_in)
            a = pb.scratch(f"{tag}.a{l}", fan_out)
            y = pb.scratch(f"{tag}.y{l}", fan_out)
            key = pb.key(f"{tag}:noise:{l}")
            if rule.noise_dist == "gaussian":
                pb.op("GAUSS", f"{tag} noise", dst=xi, key=key, scale=rule.noise)
            else:
                pb.op("MASK", f"{tag} noise", dst=xi, key=key, keep=0.5)                 # {0, 2}
                pb.op("AFFINE", f"{tag} noise", dst=xi, s=rule.noise, c=-rule.noise)   # +-noise
            m = pb.persistent(f"{tag}.colmean{l}", 1, fan_in)
            mu = pb.persistent(f"{tag}.mean{l}", 1, 1)
            mrow = pb.persistent(f"{tag}.meanrow{l}", 1, fan_in)
            pb.op("COL_MEAN", f"{tag} noise mean", dst=m, src=xi, alpha=1.0, beta=0.0)
            pb.gemm(mu, m, _const(pb, f"ones{fan_in}x1", fan_in, 1, 1.0), alpha=1.0 / fan_in)
            pb.gemm(mrow, mu, _const(pb, f"ones1x{fan_in}", 1, fan_in, 1.0))
            pb.gemm(xi, ones_b, mrow, alpha=-1.0, beta=1.0)                # xi -= mean(xi)
            if gated:
                gcol = pb.scratch(f"{tag}.gcol", 1)
                pb.gemm(gcol, ones_b, g_wm)
                pb.op("ROW_SCALE", f"{tag} gate", dst=xi, s=gcol)
            pb.gemm(a, xi, pb.weight(projs[l]), trans_b=True,                # block_l(xi)
                    alpha=c.projections[projs[l]].gain)
            pb.op("APPLY", f"{tag} block", dst=y, src=a, code=c.populations[post].code)
            if c.populations[post].dropout > 0:
                pb.mul(y, y, pb.buffer(f"{post}.mask", 0, fan_out, True))
            # B_l += (lr' / nb) xi^T y, lr' = lr / (1 - lr wd): the decay B_l *= 1 - lr wd is a
            # common factor of every B_l that the rescaling below undoes exactly, so it is folded
            # into the step size (the GEMM's run-time 1/nb: fused flag with factor 1)
            pb.op("GEMM", f"{tag} B update", c=Bs[l], a=xi, b=y, trans_a=1, fused=1, alpha=eta,
                  beta=1.0)
        # F' = B_1 (B_2 (... B_L)), right to left (small intermediates: fan_in_l x n_out)
        Fw = pb.weight(fb.name)
        prod = Bs[-1]
        for l in range(L - 2, -1, -1):
            rows = c.populations[pops[l]].size
            dst = Fw if l == 0 else pb.persistent(f"{tag}.Fpart{l}", rows, n_out)
            pb.gemm(dst, Bs[l], prod)
            prod = dst
        if L == 1:
            pb.copy(Fw, Bs[0])
        # w = mean(F'^2) / sd_F^2 ; g = w^(-1/(2L)) by Newton (inverse p-th root, p = 2L)
        rs = pb.persistent(f"{tag}.rowsq", d_in, 1)
        w = pb.persistent(f"{tag}.w", 1, 1)
        y_ = pb.persistent(f"{tag}.g", 1, 1)
        yp = pb.persistent(f"{tag}.gp", 1, 1)
        pb.op("ROW_SUMSQ", f"{tag} rescale", dst=rs, src=Fw, scale=1.0)
        pb.gemm(w, rs, _const(pb, f"ones{d_in}x1", d_in, 1, 1.0), trans_a=True,
                alpha=1.0 / (d_in * n_out * sd_f * sd_f))
        p = 2 * L
        y0 = ((p + 1.0) / 1e4) ** (1.0 / p)     # w y0^p < p + 1 for every w < 1e4
        pb.op("AFFINE", tag, dst=y_, s=0.0, c=y0)
        for _ in range(rule.newton_steps):
            pb.copy(yp, y_)
            for _ in range(p - 1):
                pb.mul(yp, yp, y_)                                             # y^p
            pb.mul(yp, yp, w)
            pb.op("AFFINE", tag, dst=yp, s=-1.0 / p, c=(p + 1.0) / p)
            pb.mul(y_, y_, yp)                                                 # y (p+1 - w y^p)/p
        for l in range(L):
            fan_in = c.populations[pops[l]].size
            pb.op("ROW_SCALE", tag, dst=Bs[l], s=_col_of(pb, f"{tag}.g", fan_in, y_))
        gL = pb.persistent(f"{tag}.gL", 1, 1)
        pb.copy(gL, y_)
        for _ in range(L - 1):
            pb.mul(gL, gL, y_)
        pb.op("ROW_SCALE", tag, dst=Fw, s=_col_of(pb, f"{tag}.gL", d_in, gL))
    if gated and rule.premirror_epochs > 0:
        # pre-mirroring: no weight update; zero the updates written by the rules before this one
        g_w = pb._index[f"{tag}.g_w"]
        with pb.at("trial_end"):
            for name in list(pb.grads):
                post, _ = c.shape_of(c.projections[name])
                dW, _ = pb.grad(name)
                pb.op("ROW_SCALE", f"{tag} pre-mirroring gate", dst=dW,
                      s=_col_of(pb, f"{tag}.g_w", post, g_w))
