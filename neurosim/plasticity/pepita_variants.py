"""PEPITA variants of Srinivasan et al. (ICLR 2024), each one description + one build function
on the same engine (algorithms.md 1.1, 1.2), written as array expressions (:mod:`neurosim.expr`):

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

How weight mirroring is scheduled. The mirroring step runs at the start of every trial
(``trial_start``, after the trial's dropout masks are drawn: it uses that trial's masks and noise
counters), i.e. after the previous trial's optimizer step (which the compiler emits last in
``trial_end``) and before this trial's clean pass. The epoch schedule is two scalar slots set by
:meth:`~neurosim.Simulator.set_epoch` (``training.run`` calls it every epoch; a loop that drives
``Simulator.train`` by hand must call ``sim.set_epoch(e)`` before each epoch): ``<name>.mirror``
is 1 in a pre-mirroring epoch (``e < P``) or a mirroring epoch (``(e - P) % k == 0``), else 0,
and multiplies the mirroring noise; ``<name>.update`` is 0 in the pre-mirroring epochs, else 1,
and multiplies the updates of the rules listed before this one. A step is gated by the epoch in
which it runs, so in a mirroring epoch the steps run at the starts of its T minibatches: the
first follows the last minibatch of the epoch before, and the last minibatch of the epoch is
followed by a step only if the next epoch mirrors too. (Up to version 1 the gates were computed
in the program from a trial counter and ``trials_per_epoch``, and after pre-mirroring the step at
the start of trial n was gated by trial n - 1's epoch: the steps are now shifted by one trial at
every boundary between a mirroring and a non-mirroring epoch, there is one more step at the start
of epoch P, before its first weight update, and with ``P = 0, k > 1`` one at the start of trial
0, as without a schedule. Epochs inside one regime are unchanged, and so is every run without a
schedule.) Gated off, the step still rescales F (by a factor 1 up to rounding).

Rescaling. After the factor updates F = B_1 ... B_L is recomputed and every B_l multiplied by
``g = (sd_F^2 / mean(F^2))^(1/(2L))`` (one ``pow``), F by ``g^L = sd_F / rms(F)`` (one
``rsqrt``), with ``sd_F = f_scale sqrt(2 / d_in)``. The decay ``B_l *= 1 - lr wd`` multiplies F
by a constant that the rescaling undoes, so it is folded into the step size:
``B_l <- B_l + lr / (1 - lr wd) mean_b xi_b^T y_b``, identical to decaying, adding
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
import warnings
from dataclasses import dataclass
from functools import partial

from ..errors import CompileError, NeurosimWarning, ValidationError
from ..expr import Buf
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


def _sgd_step(pb, name, update, opt, tag, wd):
    """Write ``update`` into projection ``name``'s own update buffer ``<name>.<tag>.dW`` and emit
    an SGD-with-momentum step with its own velocity ``<name>.<tag>.V`` (so several steps per
    trial do not share one); the compiler's fusion pass folds the momentum update into the GEMM
    when nothing else reads dW and ``wd == 0``. Returns the update's handle."""
    from ..compiler import emit_sgd

    shape = pb.circuit.shape_of(pb.circuit.projections[name])
    dW = pb.state(f"{name}.{tag}.dW", *shape, kind="optimizer")
    pb.assign(dW, update, f"projection {name!r}")
    emit_sgd(pb, name, dW.index, opt, weight_decay=wd, velocity=f"{name}.{tag}.V")
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


def _normalized(pb, rule, h, size):
    """``h / ||h_b||`` per row (``norm="sample"``) or ``h / ||H||_F`` (``"batch"``)."""
    if rule.norm == "sample":      # ROW_NORMALIZE divides by the RMS, ||h_b|| / sqrt(size)
        return pb.let(h.row_normalize(rule.eps) * (1.0 / math.sqrt(size)))
    return pb.let(h / (h.sumsq(axis=1).sum().sqrt() + rule.eps))


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
    t = pb.stim("t")
    W_L, gain_L = pb.W(projs[-1]), c.projections[projs[-1]].gain
    norm = {}

    def normalized_error(phase):
        """Normalize the held activities of ``phase``; the normalized network's output error."""
        for p in hidden:
            norm[(p, phase)] = _normalized(pb, rule, pb.r(p, phase), c.populations[p].size)
        return (gain_L * (norm[(hidden[-1], phase)] @ W_L.T)).apply("softmax") - t

    err_clean = pb.r(err.name, rule.clean)
    with pb.at(f"{rule.clean}:post"):            # F reads the normalized clean error
        pb.assign(err_clean, normalized_error(rule.clean))
    with pb.at("trial_end"):
        err_mod = pb.let(normalized_error(rule.modulated))
        pre_phase = rule.modulated if rule.presynaptic == "modulated" else rule.clean
        for name in rule.modifies(pb):
            proj = pb.require_projection(name, "NormalizedPEPITA.projections")
            pre = norm.get((proj.pre_population, pre_phase))
            if pre is None:
                pre = pb.r(proj.pre_population, pre_phase)
            if proj.post == err.output:
                post = err_mod if rule.last_layer_error == "modulated" else err_clean
            elif proj.post in hidden:
                post = norm[(proj.post, rule.clean)] - norm[(proj.post, rule.modulated)]
            else:
                raise ValidationError("NormalizedPEPITA.projections", f"{name!r} does not "
                                      "end in a hidden layer or the output.")
            pb.update(name, post.T @ pre)


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
    t = pb.stim("t")
    for name in rule.modifies(pb):
        proj = pb.require_projection(name, "PEPITATimeLocal.projections")
        if not proj.plastic:
            raise ValidationError("PEPITATimeLocal.projections", f"projection {name!r} is fixed "
                                  "(plastic=False) but the rule updates it.")
        pre = proj.pre_population
        with pb.at(f"{rule.clean}:post"):      # anti-Hebbian: W -= lr/B h_l h_{l-1}^T
            h, x = pb.r(proj.post, rule.clean), pb.r(pre, rule.clean)
            d_c = _sgd_step(pb, name, h.T @ x, opt, rule.clean, 0.0)
        with pb.at(f"{rule.modulated}:post"):  # Hebbian: W += lr/B h~_l h~_{l-1}^T (t for last)
            h = t if proj.post == err.output else pb.r(proj.post, rule.modulated)
            d_m = _sgd_step(pb, name, -(h.T @ pb.r(pre, rule.modulated)), opt, rule.modulated,
                            opt.weight_decay)
            if rule.record_update:
                pb.assign(pb.state(f"{rule.name}.{name}.update", *c.shape_of(proj)), d_c + d_m)


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

    Schedule (epochs counted from 0, set by :meth:`~neurosim.Simulator.set_epoch`, which
    ``training.run`` calls every epoch): the first ``premirror_epochs`` epochs run mirroring only
    (the weight updates of the rules listed *before* this one are zeroed); afterwards the
    mirroring step runs with every minibatch of every ``period``-th epoch (epochs P, P+k, P+2k,
    ...). The step runs at the start of each trial (see the module docstring for the exact
    timing). List this rule after the rule that updates the forward weights.

    ``trials_per_epoch`` and ``newton_steps`` are accepted for compatibility and ignored (the
    schedule follows the epoch, the rescaling is one ``pow``): passing them warns.
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
    newton_steps: int | None = None
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
        if self.lr * self.wd >= 1.0:
            raise ValidationError("WeightMirroring.wd", f"lr * wd = {self.lr * self.wd:g}; the "
                                  "decay factor 1 - lr wd must stay positive (lr * wd < 1).")
        for key, why in (("trials_per_epoch", "the schedule follows the epoch that "
                          "Simulator.set_epoch sets (training.run calls it every epoch)"),
                         ("newton_steps", "the rescaling root is one pow operation")):
            if getattr(self, key) is not None:
                check_int(f"WeightMirroring.{key}", getattr(self, key), low=1)
                warnings.warn(f"WeightMirroring.{key} is deprecated and ignored: {why}; drop the "
                              "argument.", NeurosimWarning, stacklevel=3)

    def modifies(self, pb):
        return []

    def reads(self, pb):
        return []


def _mirror_gate(premirror, period, epoch):
    """1 in a pre-mirroring epoch or a mirroring epoch (P, P + k, P + 2k, ...), else 0."""
    return float(epoch < premirror or (epoch - premirror) % period == 0)


def _update_gate(premirror, epoch):
    """0 in the pre-mirroring epochs (no weight update), else 1."""
    return float(epoch >= premirror)


def _factor_chain(pb, rule):
    """The forward chain (projections, populations) and the handles of the factors and F, with
    their shapes checked."""
    c, where = pb.circuit, "WeightMirroring"
    projs, pops = _layered_chain(pb, rule.error, where)
    if len(rule.factors) != len(projs):
        raise ValidationError(f"{where}.factors", f"got {len(rule.factors)} factors for "
                              f"{len(projs)} layers {projs}; F = B_1 ... B_L needs one per layer.")
    fb = pb.require_projection(rule.feedback, f"{where}.feedback")
    d_in, n_out = c.populations[pops[0]].size, c.populations[pops[-1]].size
    if c.shape_of(fb) != (d_in, n_out):
        raise ValidationError(f"{where}.feedback", f"{fb.name!r} has shape {c.shape_of(fb)}, "
                              f"expected (d_in, n_out) = {(d_in, n_out)}.")
    for l, (bname, wname) in enumerate(zip(rule.factors, projs)):
        bp = pb.require_projection(bname, f"{where}.factors")
        want = c.shape_of(c.projections[wname])[::-1]
        if c.shape_of(bp) != want:
            raise ValidationError(f"{where}.factors", f"{bname!r} has shape {c.shape_of(bp)}, "
                                  f"expected W_{l + 1}^T's {want} ({wname!r} transposed).")
        if bp.plastic:
            raise ValidationError(f"{where}.factors", f"{bname!r} is plastic; the factors are "
                                  "changed by mirroring only (make it plastic=False).")
    return projs, pops, [pb.W(b) for b in rule.factors], pb.W(fb.name)


@register_builder(WeightMirroring)
def build_weight_mirroring(pb, rule: WeightMirroring):
    c = pb.circuit
    projs, pops, Bs, F = _factor_chain(pb, rule)
    L, P, k = len(projs), rule.premirror_epochs, rule.period
    sd_f = rule.f_scale * math.sqrt(2.0 / c.populations[pops[0]].size)
    # the decay B_l *= 1 - lr wd is a common factor of every B_l that the rescaling undoes
    # exactly, so it is folded into the step size lr' = lr / (1 - lr wd)
    eta = rule.lr / (1.0 - rule.lr * rule.wd)
    with pb.at("trial_start"):   # after the last trial's optimizer step, with this trial's masks
        on = 1.0
        if rule.lr > 0 and (P > 0 or k > 1):
            on = pb.scalar(f"{rule.name}.mirror", _mirror_gate(P, k, 0),
                           partial(_mirror_gate, P, k))
        for l in range(L if rule.lr > 0 else 0):   # lr = 0: F = B_1 ... B_L, never mirrored
            pre, post = c.populations[pops[l]], c.populations[pops[l + 1]]
            xi = pb.noise(f"{rule.name}:noise:{l}", pre.size, rule.noise_dist, rule.noise)
            xi = pb.let((xi - xi.mean()) * on)
            y = (c.projections[projs[l]].gain * (xi @ pb.W(projs[l]).T)).apply(post.code)
            if post.dropout > 0:
                y = y * pb.mask(post.name)
            pb.accumulate(Bs[l], eta * (xi.T @ y).batch_mean())     # B_l += lr' xi^T y / nb
        prod = Bs[-1]
        for B in Bs[-2::-1]:                   # F = B_1 (B_2 (... B_L)), right to left
            prod = B @ prod
        pb.assign(F, prod)
        w = pb.let(F.sumsq(axis=1).sum() * (1.0 / (F.rows * F.cols * sd_f ** 2)))  # (rms/sd_F)^2
        g = pb.let(w ** (-0.5 / L))
        for B in Bs:
            pb.assign(B, B * g)                # B_l *= (sd_F / rms F)^(1/L)
        pb.assign(F, F * w.rsqrt())            # F *= sd_F / rms F
    if P > 0:   # pre-mirroring: zero the updates written by the rules listed before this one
        with pb.at("trial_end"):
            upd = pb.scalar(f"{rule.name}.update", _update_gate(P, 0), partial(_update_gate, P))
            for name in list(pb.grads):
                dW = Buf(pb, pb.grad(name)[0])
                pb.assign(dW, dW * upd)
