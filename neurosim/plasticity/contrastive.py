"""Two-phase contrastive plasticity: the principle Forward-Forward and PEPITA-Hebbian share.

Both rules contrast two passes of the same circuit. Each synapse gets a **Hebbian** term from one
pass and an **anti-Hebbian** term from the other (Srinivasan et al., ICLR 2024, Section 5;
Hinton 2022). Written once, for every plastic projection ``W`` (post x pre), summed over the
minibatch, in the descent direction the optimizer applies (``W <- W - lr dW / B``)::

    dW = gain * ( (g_a * y_a)^T x_a  -  (g_h * y_h + p)^T x_h  +  weight_cost * B * W )

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
from ..optable import RMS_NORM, SOFTMAX
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
    postsynaptic population, the per-sample goodness buffers ``{phase: buffer index}`` (if
    any)."""
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
        t = None
        for post, projs in by_post.items():
            ya = _postsynaptic(pb, rule, post, rule.anti_hebbian, False, goodness)
            if post == rule.target:     # the delta rule's target replaces the Hebbian term
                t = t if t is not None else _target(pb, rule)
                yh = t
            else:
                yh = _postsynaptic(pb, rule, post, rule.hebbian, True, goodness)
            diff = None
            for proj in projs:
                xa = pb.r(proj.pre_population, proj.pre_phase or rule.anti_hebbian)
                xh = pb.r(proj.pre_population, proj.pre_phase or rule.hebbian)
                if xa.index == xh.index:    # one presynaptic factor: (y_a - y_h)^T x
                    diff = diff if diff is not None else pb.let(ya - yh)
                    dW = diff.T @ xa
                else:
                    dW = ya.T @ xa - yh.T @ xh
                if rule.weight_cost > 0.0 and proj.name not in rule.bias_projections:
                    dW = dW + rule.weight_cost * pb.batch * pb.W(proj.name)
                pb.update(proj.name, rule.gain * dW)
    return goodness


# -- pieces ---------------------------------------------------------------------------------------
def activity(pb, post, phase, mask=True):
    """Handle of the postsynaptic activity ``f(drive)`` of ``post`` in ``phase``: the held rate,
    or, for an RMS-normalised population, ``f`` of its drive (times its dropout mask, if any and
    ``mask``)."""
    pop = pb.circuit.populations[post]
    if not is_normalized(pop):
        return pb.r(post, phase)
    y = pb.a(post, phase).apply(pop.code - RMS_NORM)
    if mask and pop.dropout > 0:
        y = y * pb.mask(post)
    return y


def _postsynaptic(pb, rule, post, phase, hebbian, goodness):
    """Handle of one term's postsynaptic factor: ``g y`` (anti-Hebbian) or ``g y + p``
    (Hebbian; ``p`` only with peer normalisation), computed here, once."""
    y = pb.let(activity(pb, post, phase), f"population {post!r} (activity)")
    out = y
    if rule.third_factor == "goodness":
        G = pb.let(y.sumsq(), f"population {post!r} (goodness)")
        goodness.setdefault(post, {})[phase] = G.index
        out = y * _goodness_factor(pb, rule, post, G, hebbian)
    if hebbian and rule.peer_normalization > 0.0:
        out = out + _peer_term(pb, rule, post, y)     # from the unscaled activity
    return pb.let(out, f"population {post!r} ({'Hebbian' if hebbian else 'anti-Hebbian'} term)")


def _goodness_factor(pb, rule, post, G, hebbian):
    """``1 - p`` (Hebbian term) or ``p`` (anti-Hebbian term), ``p = sigmoid((G - theta) / T)``
    from the per-sample goodness ``G`` = sum_j y_j^2."""
    n = pb.circuit.populations[post].size
    theta = float(n) if rule.threshold is None else rule.threshold
    T = rule.temperature
    s = -1.0 if hebbian else 1.0      # 1 - sigmoid(z) = sigmoid(-z)
    return ((s / T) * G - s * theta / T).apply("sigmoid")


def _peer_term(pb, rule, post, y):
    """Update the running mean activity ``m <- d m + (1 - d) mean_b y`` and return
    ``p = lambda (mean_units(m) - m)``, a row added to every row of the Hebbian term."""
    n = pb.circuit.populations[post].size
    lam, d = rule.peer_normalization, rule.peer_decay
    where = f"population {post!r} (peer normalisation)"
    m = pb.state(f"{rule.name}.{post}.peer_mean", 1, n, init=[[rule.peer_init] * n])
    pb.assign(m, d * m + (1.0 - d) * y.mean(0), where)
    return -lam * (m - m.mean())


def _target(pb, rule):
    """One-hot target of the trial's labels, made at trial start."""
    n = pb.circuit.populations[rule.target].size
    with pb.at("trial_start"):
        return pb.onehot(f"{rule.name}.target", n)


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
