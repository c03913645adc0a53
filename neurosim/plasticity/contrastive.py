"""Two-phase contrastive plasticity: the principle Forward-Forward and PEPITA-Hebbian share.

Both rules contrast two passes of the same circuit. Each synapse gets a **Hebbian** term from one
pass and an **anti-Hebbian** term from the other (Srinivasan et al., ICLR 2024, Section 5;
Hinton 2022). Written once, for every plastic projection ``W`` (post x pre), summed over the
minibatch, in the descent direction the optimizer applies (``W <- W - lr dW / B``)::

    dW = gain * ( (g_a * y_a)^T x_a  -  (g_h * y_h + p)^T x_h )  +  weight_cost * B * W

* ``x_a``, ``x_h``: the presynaptic rates held at the end of the anti-Hebbian and the Hebbian
  phase (for an RMS-normalised population, its normalised output: what the projection
  transmits);
* ``y_a``, ``y_h``: the postsynaptic *activity* ``f(drive)`` held at the end of each phase
  (the rate itself unless the population normalises its output), or, for the ``target``
  population, the one-hot target in the Hebbian term (a delta rule);
* ``g_a``, ``g_h``: a per-sample third factor, 1 (``"none"``) or, with ``"goodness"``, the
  probability that the layer gets the pass wrong: with ``G = sum_j y_j^2`` and
  ``p = sigmoid((G - theta) / T)``, ``g_h = 1 - p`` on the Hebbian (positive) pass and
  ``g_a = p`` on the anti-Hebbian (negative) pass. (Hinton's convention: the exact gradient of
  ``log p`` carries a further factor 2/T, absorbed in the learning rate.)
* ``p``: peer normalisation (optional): a running mean ``m <- d m + (1 - d) mean_batch(y_h)`` per
  unit, and ``p = lambda (mean_units(m) - m)`` added to every row of the Hebbian term (not gated
  by the ReLU, so it revives silent units).

**Configurations** (docs/rules.md shows them side by side):

====================  ==========================  ==============================================
                      PEPITA-Hebbian               Forward-Forward
====================  ==========================  ==============================================
Hebbian phase         ``modulated`` (x + F e)     ``positive`` (true label in the image)
anti-Hebbian phase    ``clean`` (x)               ``negative`` (a wrong label in the image)
third factor          none                         goodness (``1 - p`` / ``p``)
normalisation         none                         RMS-normalised layer outputs
output layer          target in the Hebbian term   (local softmax readout, same delta rule)
====================  ==========================  ==============================================

The rule only writes ``dW`` (in ``trial_end``); how the two passes differ is the circuit's and
the protocol's business (PEPITA: the top-down projection F; FF: the label written into the image,
see :class:`~neurosim.plasticity.forward_forward.ForwardForward`).

``Population(normalize="rms")`` is the circuit element the ``"rms"`` normalisation refers to: a
population whose output rate is ``f(drive)`` divided by its root mean square per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..circuit import ErrorPopulation, Population
from ..errors import ValidationError
from ..optable import RMS_NORM, SIGMOID, SOFTMAX
from ..params import check_choice, check_float
from .base import PlasticityRule, register_builder

THIRD_FACTORS = ("none", "goodness")
NORMALIZATIONS = ("none", "rms")


@dataclass(frozen=True)
class NormalizedPopulation(Population):
    """A :class:`~neurosim.circuit.Population` with ``normalize = "rms"`` by default (kept for
    code written before ``Population.normalize`` existed)."""

    normalize: str | None = "rms"


def is_normalized(pop) -> bool:
    """Whether a population's output rate is RMS-normalised."""
    return int(getattr(pop, "code", 0)) >= RMS_NORM


@dataclass(frozen=True)
class Contrastive(PlasticityRule):
    """Two-phase contrastive plasticity (see the module docstring for the update).

    Parameters
    ----------
    hebbian : str
        Phase whose pre/post correlations are strengthened.
    anti_hebbian : str
        Phase whose correlations are weakened (may equal ``hebbian``, e.g. for a delta rule).
    third_factor : ``"none"`` or ``"goodness"``
    normalization : ``"none"`` or ``"rms"``
        ``"rms"`` requires the presynaptic population of every projection the rule changes (other
        than those in ``bias_projections``) to be ``Population(normalize="rms")``: the layer
        input is normalised, as in Forward-Forward.
    target : str, optional
        A population whose Hebbian postsynaptic factor is the one-hot target of the trial
        (needs integer labels): ``dW = (y_a - t)^T x`` if both terms share the phase.
    threshold : float, optional
        Goodness threshold theta; default: the width of each layer.
    temperature : float
        T in ``sigmoid((G - theta) / T)``.
    peer_normalization : float
        lambda (0 disables it); ``peer_decay`` d and ``peer_init`` (the running mean's start).
    weight_cost : float
        L2 cost added to ``dW`` (as ``weight_cost * B * W``, B the compiled batch size) of every
        projection but those in ``bias_projections``.
    bias_projections : tuple of str
        Projections exempt from ``weight_cost`` and from the normalisation check (learnable
        biases: projections from a constant population).
    gain : float
        Multiplies the whole update: a learning rate relative to the optimizer's.
    projections : tuple of str, optional
        Projections changed; default every plastic feedforward projection.
    """

    hebbian: str = "positive"
    anti_hebbian: str = "negative"
    third_factor: str = "none"
    normalization: str = "none"
    target: str | None = None
    threshold: float | None = None
    temperature: float = 1.0
    peer_normalization: float = 0.0
    peer_decay: float = 0.9
    peer_init: float = 0.5
    weight_cost: float = 0.0
    bias_projections: tuple = ()
    gain: float = 1.0
    projections: tuple | None = None
    name: str = "contrastive"

    def __post_init__(self):
        cls = type(self).__name__
        for attr in ("hebbian", "anti_hebbian"):
            v = getattr(self, attr)
            if not isinstance(v, str) or not v:
                raise ValidationError(f"{cls}.{attr}", f"got {v!r}, expected a phase name.")
        check_choice(f"{cls}.third_factor", self.third_factor, THIRD_FACTORS)
        check_choice(f"{cls}.normalization", self.normalization, NORMALIZATIONS)
        if self.threshold is not None:
            check_float(f"{cls}.threshold", self.threshold)
        check_float(f"{cls}.temperature", self.temperature, low=0.0, low_open=True)
        check_float(f"{cls}.peer_normalization", self.peer_normalization, low=0.0)
        check_float(f"{cls}.peer_decay", self.peer_decay, low=0.0, high=1.0, high_open=True)
        check_float(f"{cls}.peer_init", self.peer_init)
        check_float(f"{cls}.weight_cost", self.weight_cost, low=0.0)
        check_float(f"{cls}.gain", self.gain, low=0.0, low_open=True)
        if self.third_factor == "goodness" and self.target is not None:
            raise ValidationError(f"{cls}.target", "a target population has no goodness; the "
                                  "goodness third factor and a target term do not combine.",
                                  "train the readout with a separate rule.")
        for attr in ("projections", "bias_projections"):
            v = getattr(self, attr)
            if v is None:
                continue
            if isinstance(v, str) or not all(isinstance(p, str) for p in v):
                raise ValidationError(f"{cls}.{attr}", f"got {v!r}, expected a tuple of "
                                      "projection names.")
            object.__setattr__(self, attr, tuple(v))

    # -- interface ------------------------------------------------------------------------------
    def modifies(self, pb) -> list[str]:
        if self.projections is not None:
            return list(self.projections)
        return [p.name for p in pb.circuit.projections.values()
                if p.plastic and p.role == "feedforward"]

    def reads(self, pb) -> list[str]:
        out = []
        for name in self.modifies(pb):
            proj = pb.circuit.projections[name]
            for ph in (self.anti_hebbian, self.hebbian):
                out.append(f"{proj.pre_population}@{proj.pre_phase or ph}")
                out.append(f"{proj.post}.drive@{ph}" if is_normalized(pb.circuit[proj.post])
                           else f"{proj.post}@{ph}")
        return sorted(set(out))


@register_builder(Contrastive)
def build_contrastive(pb, rule: Contrastive) -> None:
    """Emit the contrastive update of every projection the rule changes (in ``trial_end``)."""
    emit_contrastive_updates(pb, rule)


def emit_contrastive_updates(pb, rule: Contrastive) -> dict:
    """The body of :func:`build_contrastive`, shared with rules built on it. Returns, per
    postsynaptic population, the per-sample goodness buffers ``{phase: buffer}`` (if any)."""
    cls = type(rule).__name__
    c = pb.circuit
    pb.require_phase(rule.hebbian, f"{cls}.hebbian")
    pb.require_phase(rule.anti_hebbian, f"{cls}.anti_hebbian")
    names = rule.modifies(pb)
    if not names:
        raise ValidationError(f"{cls}.projections", "no plastic feedforward projection to change.")
    for b in rule.bias_projections:
        if b not in names:
            raise ValidationError(f"{cls}.bias_projections", f"{b!r} is not one of the "
                                  f"projections the rule changes ({names}).")
    by_post: dict[str, list] = {}
    for name in names:
        proj = pb.require_projection(name, f"{cls}.projections")
        if not proj.plastic:
            raise ValidationError(f"{cls}.projections", f"projection {name!r} is fixed "
                                  "(plastic=False).")
        post = c.populations[proj.post]
        if post.code == SOFTMAX and rule.target != proj.post:
            if rule.third_factor == "goodness" or rule.peer_normalization:
                raise ValidationError(f"{cls}.projections", f"{name!r} ends in the softmax "
                                      f"population {proj.post!r}, which has no goodness.")
        if rule.normalization == "rms" and name not in rule.bias_projections and \
                not is_normalized(c.populations[proj.pre_population]):
            raise ValidationError(f"{cls}.normalization", f"'rms' needs normalised layer inputs, "
                                  f"but projection {name!r} reads {proj.pre_population!r}, which "
                                  "is not normalised (Population(normalize='rms')).",
                                  "build the layers with normalize='rms', or list the "
                                  "projection in bias_projections if it is a learnable bias.")
        by_post.setdefault(proj.post, []).append(proj)
    if rule.target is not None:
        tgt = c.populations.get(rule.target)
        if tgt is None or isinstance(tgt, ErrorPopulation):
            raise ValidationError(f"{cls}.target", f"no (non-error) population {rule.target!r}.")
    goodness = {}
    with pb.at("trial_end"):
        target_buf = None
        for post, projs in by_post.items():
            terms = []  # (sign, buffer of the scaled postsynaptic factor, phase)
            for sign, phase in ((+1.0, rule.anti_hebbian), (-1.0, rule.hebbian)):
                if sign < 0 and post == rule.target:
                    if target_buf is None:
                        target_buf = _target(pb, rule)
                    terms.append((sign, target_buf, phase))
                    continue
                y, own = _activity(pb, rule, post, phase, sign)
                peer = sign < 0 and rule.peer_normalization > 0.0
                if (rule.third_factor == "goodness" or peer) and not own:
                    y = _copy(pb, rule, post, phase, sign, y)
                pv = _peer_vector(pb, rule, post, y) if peer else None  # from unscaled y
                if rule.third_factor == "goodness":
                    goodness.setdefault(post, {})[phase] = _goodness_factor(
                        pb, rule, post, phase, sign, y)
                if pv is not None:
                    pb.op("BIAS", f"population {post!r} (peer normalisation)", dst=y, bias=pv)
                terms.append((sign, y, phase))
            (sa, ya, pha), (sh, yh, phh) = terms
            diff = None
            for proj in projs:
                dW, beta = pb.grad(proj.name)
                xa = pb.rate(proj.pre_population, proj.pre_phase or pha)
                xh = pb.rate(proj.pre_population, proj.pre_phase or phh)
                where = f"projection {proj.name!r}"
                if xa == xh:  # one presynaptic factor: dW = (y_a - y_h)^T x
                    if diff is None:
                        diff = pb.scratch(f"{rule.name}.{post}.contrast", c.populations[post].size)
                        pb.sub(diff, ya, yh, where)
                    pb.gemm(dW, diff, xa, trans_a=True, alpha=rule.gain, beta=beta, where=where)
                else:
                    pb.gemm(dW, ya, xa, trans_a=True, alpha=sa * rule.gain, beta=beta, where=where)
                    pb.gemm(dW, yh, xh, trans_a=True, alpha=sh * rule.gain, beta=1.0, where=where)
                if rule.weight_cost > 0.0 and proj.name not in rule.bias_projections:
                    pb.axpy(dW, pb.weight(proj.name), rule.weight_cost * pb.batch * rule.gain,
                            where)
    return goodness


# -- pieces ---------------------------------------------------------------------------------------
def _activity(pb, rule, post, phase, sign):
    """Buffer of the postsynaptic activity f(drive) in ``phase``; ``own`` tells whether it is a
    scratch buffer of this rule (free to scale in place) or a population's held rate."""
    pop = pb.circuit.populations[post]
    if not is_normalized(pop):
        return pb.rate(post, phase), False
    y = pb.scratch(_key(rule, post, phase, sign, "y"), pop.size)
    pb.op("APPLY", f"population {post!r} (activity)", dst=y, src=pb.drive(post, phase),
          code=pop.code - RMS_NORM)
    if pop.dropout > 0:
        pb.mul(y, y, pb.buffer(f"{post}.mask", 0, pop.size, True))
    return y, True


def _copy(pb, rule, post, phase, sign, src):
    y = pb.scratch(_key(rule, post, phase, sign, "y"), pb.circuit.populations[post].size)
    pb.copy(y, src)
    return y


def _goodness_factor(pb, rule, post, phase, sign, y):
    """Per-sample goodness G = sum y^2 (kept) and, scaling ``y`` in place, the factor
    1 - sigmoid((G - theta)/T) (Hebbian, sign -1) or sigmoid((G - theta)/T) (anti-Hebbian)."""
    n = pb.circuit.populations[post].size
    theta = float(n) if rule.threshold is None else rule.threshold
    T = rule.temperature
    G = pb.scratch(_key(rule, post, phase, sign, "G"), 1)
    q = pb.scratch(_key(rule, post, phase, sign, "q"), 1)
    where = f"population {post!r} (goodness)"
    pb.op("ROW_SUMSQ", where, dst=G, src=y, scale=1.0)
    pb.copy(q, G, where)
    s = 1.0 if sign > 0 else -1.0        # sigmoid(s (G - theta) / T)
    pb.op("AFFINE", where, dst=q, s=s / T, c=-s * theta / T)
    pb.op("APPLY", where, dst=q, src=q, code=SIGMOID)
    pb.op("ROW_SCALE", where, dst=y, s=q)
    return G


def _peer_vector(pb, rule, post, y):
    """Update the running mean activity ``m <- d m + (1 - d) mean_b y`` (``y`` unscaled) and
    return the buffer of ``lambda (mean_units(m) - m)``, to add to every row of the term."""
    n = pb.circuit.populations[post].size
    lam = rule.peer_normalization
    where = f"population {post!r} (peer normalisation)"
    m = pb.persistent(f"{rule.name}.{post}.peer_mean", 1, n, init=[[rule.peer_init] * n])
    ones_c = pb.persistent(f"{rule.name}.ones{n}.col", n, 1, init=[[1.0]] * n)
    ones_r = pb.persistent(f"{rule.name}.ones{n}.row", 1, n, init=[[1.0] * n])
    mbar = pb.scratch(f"{rule.name}.{post}.peer_mbar", 1, rows=1)
    pv = pb.scratch(f"{rule.name}.{post}.peer", n, rows=1)
    pb.op("COL_MEAN", where, dst=m, src=y, alpha=1.0 - rule.peer_decay, beta=rule.peer_decay)
    pb.gemm(mbar, m, ones_c, alpha=1.0 / n, where=where)
    pb.gemm(pv, mbar, ones_r, alpha=lam, where=where)
    pb.axpy(pv, m, -lam, where)
    return pv


def _target(pb, rule):
    """One-hot target of the trial's labels, made at trial start."""
    n = pb.circuit.populations[rule.target].size
    t = pb.scratch(f"{rule.name}.target", n)
    with pb.at("trial_start"):
        pb.op("ONEHOT", f"{type(rule).__name__} target", dst=t)
    return t


def _key(rule, post, phase, sign, what):
    return f"{rule.name}.{post}.{'anti' if sign > 0 else 'hebb'}.{phase}.{what}"


# -- PEPITA-Hebbian as a configuration ------------------------------------------------------------
@dataclass(frozen=True)
class PepitaHebbian(Contrastive):
    """PEPITA's Hebbian form (Srinivasan et al., ICLR 2024, Section 5) as a contrastive rule.

    ``dW_l = h_l^T h_{l-1} - h~_l^T h~_{l-1}`` for hidden layers (anti-Hebbian on the clean pass,
    Hebbian on the modulated pass x + F e) and ``dW_L = h_L^T h_{L-1} - t^T h~_{L-1}`` for the
    output layer (the target replaces the modulated output in the Hebbian term). Use with the
    circuit of :func:`neurosim.models.build_pepita_network`; ``target`` defaults to the output.
    """

    hebbian: str = "modulated"
    anti_hebbian: str = "clean"
    target: str | None = "output"
    name: str = "pepita_hebbian"


register_builder(PepitaHebbian)(build_contrastive)
