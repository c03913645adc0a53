"""Forward-Forward (Hinton 2022) as a configuration of the two-phase contrastive rule.

Each layer ``h = relu(W x_n + b)`` (``x_n`` the previous layer's output normalised to unit RMS,
``Population(normalize="rms")``) is trained, locally, to have
a high goodness ``G = sum_j h_j^2`` on positive data and a low one on negative data, with
``p = sigmoid((G - theta) / T)``, ``theta`` = the layer width. Per layer, summed over the batch,
descent direction (no gradient crosses layers)::

    dW = (p_neg h_neg)^T x_neg - ((1 - p_pos) h_pos + peer)^T x_pos + weight_cost B W

which is :class:`~neurosim.plasticity.contrastive.Contrastive` with Hebbian phase ``positive``,
anti-Hebbian phase ``negative``, the goodness third factor and RMS normalisation (Hinton's code
convention: ``(1 - p) h`` without the factor 2/T of the exact log-likelihood gradient). Biases are
projections from a constant population (``bias_projections``: no weight cost, as in the
reference).

What makes the two phases differ is the label written into the image (first ``n_classes``
pixels, overwritten), done by this rule at the start of each trial:

* ``positive`` phase: the true label, one-hot times ``label_strength``;
* ``neutral`` phase (optional): ``label_strength / n_classes`` in every label pixel; the local
  softmax readout (:class:`SoftmaxReadout`, a delta rule on the normalised activities) is read
  and trained here;
* ``negative`` phase: a wrong label, drawn uniformly among the ``n_classes - 1`` others
  (``negatives="uniform"``, at trial start) or "hard": in proportion to the readout's
  probabilities of the wrong classes in the neutral phase (``negatives="hard"``, at the end of
  the neutral phase). Either way the true class is excluded, so a negative never carries the
  true label.

The stimulus clamped to ``input`` in the positive phase must be ``"x"`` (the data rows); the
neutral and negative phases clamp stimuli of their own (e.g. ``"x_neutral"``, ``"x_negative"``)
that this rule fills. With a readout, the rule also counts the readout's correct answers in the
neutral phase into the plan's training-accuracy counter.

:class:`Goodness` is a custom monitor of the batch-mean goodness of a layer in a phase.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError
from ..optable import SOFTMAX
from ..monitors import AbstractMonitor
from ..params import check_choice, check_float, check_int
from .base import register_builder
from .contrastive import Contrastive, activity, emit_contrastive_updates, is_normalized

NEGATIVES = ("uniform", "hard")


@dataclass(frozen=True)
class ForwardForward(Contrastive):
    """Forward-Forward plasticity of the hidden layers (see the module docstring).

    Parameters (beyond :class:`~neurosim.plasticity.contrastive.Contrastive`, whose defaults are
    set to Hinton's: goodness third factor, RMS normalisation, peer normalisation 0.03, weight
    cost 1e-3):

    input : str
        Population the (labelled) image is presented to.
    neutral : str or None
        Phase with the neutral label (needed for ``negatives="hard"``).
    readout : str or None
        Softmax population read in the neutral phase for hard negatives and the training
        accuracy.
    negatives : ``"hard"`` or ``"uniform"``
    n_classes : int
    label_strength : float
    projections : default every plastic feedforward projection not ending in ``readout``.
    """

    hebbian: str = "positive"
    anti_hebbian: str = "negative"
    third_factor: str = "goodness"
    normalization: str = "rms"
    peer_normalization: float = 0.03
    weight_cost: float = 1e-3
    input: str = "input"
    neutral: str | None = "neutral"
    readout: str | None = "readout"
    negatives: str = "hard"
    n_classes: int = 10
    label_strength: float = 1.0
    name: str = "ff"

    def __post_init__(self):
        super().__post_init__()
        check_choice("ForwardForward.negatives", self.negatives, NEGATIVES)
        check_int("ForwardForward.n_classes", self.n_classes, low=2)
        check_float("ForwardForward.label_strength", self.label_strength, low=0.0, low_open=True)
        if self.negatives == "hard" and (self.neutral is None or self.readout is None):
            raise ValidationError("ForwardForward.negatives", "'hard' negatives are sampled from "
                                  "the softmax readout in the neutral phase, but neutral or "
                                  "readout is None.", "use negatives='uniform', or give both.")
        if self.hebbian == self.anti_hebbian:
            raise ValidationError("ForwardForward.anti_hebbian", "the negative phase must differ "
                                  "from the positive phase.")

    def modifies(self, pb) -> list[str]:
        if self.projections is not None:
            return list(self.projections)
        return [p.name for p in pb.circuit.projections.values()
                if p.plastic and p.role == "feedforward" and p.post != self.readout]


@register_builder(ForwardForward)
def build_forward_forward(pb, rule: ForwardForward) -> None:
    """Label embedding (trial start / end of the neutral phase) and the contrastive updates."""
    _emit_labels(pb, rule)
    emit_contrastive_updates(pb, rule)


def _emit_labels(pb, rule: ForwardForward) -> None:
    c, protocol = pb.circuit, pb.protocol
    C = rule.n_classes
    inp = c.populations.get(rule.input)
    if inp is None:
        raise ValidationError("ForwardForward.input", f"no population {rule.input!r}.")
    if inp.size < C:
        raise ValidationError("ForwardForward.n_classes", f"{C} label pixels do not fit into "
                              f"{rule.input!r} of size {inp.size}.")
    if not is_normalized(inp) and rule.normalization == "rms":
        raise ValidationError("ForwardForward.input", f"{rule.input!r} is not normalised "
                              "(normalize='rms'); Forward-Forward normalises the image too.")
    phases = {"positive": rule.hebbian, "negative": rule.anti_hebbian}
    attrs = {"positive": "hebbian", "negative": "anti_hebbian", "neutral": "neutral"}
    if rule.neutral is not None:
        phases["neutral"] = rule.neutral
    stim = {}
    for role, ph in phases.items():
        pb.require_phase(ph, f"ForwardForward.{attrs[role]}")
        s = protocol.phase(ph).clamp.get(rule.input)
        if s is None:
            raise ValidationError(f"Phase({ph!r}).clamp", f"the {role} phase presents nothing to "
                                  f"{rule.input!r}.", f"clamp={{{rule.input!r}: ...}}")
        stim[role] = s
    if stim["positive"] != "x":
        raise ValidationError(f"Phase({rule.hebbian!r}).clamp", f"the positive phase must present "
                              f"the data 'x' to {rule.input!r}, got {stim['positive']!r}.")
    if len(set(stim.values())) != len(stim):
        raise ValidationError("ForwardForward", f"the phases {sorted(phases.values())} must "
                              f"present distinct stimuli to {rule.input!r} (got {stim}); each "
                              "gets its own label.")
    x = {role: pb.stim(s) for role, s in stim.items()}
    ls = rule.label_strength
    lab_name, stream = f"{rule.name}.negative_label", f"{rule.name}:negatives"
    with pb.at("trial_start"):
        pb.embed_label(x["positive"], C, on=ls)                       # the true label
        if "neutral" in x:
            pb.assign(x["neutral"], x["positive"])
            pb.embed_label(x["neutral"], C, on=ls / C, off=ls / C)   # every label, equally
        if rule.negatives == "uniform":
            wrong = pb.wrong_labels(lab_name, C, stream)
            pb.assign(x["negative"], x["positive"])
            pb.embed_label(x["negative"], C, on=ls, labels=wrong)
    names = [p.name for p in protocol.phases]
    if rule.readout is not None:
        ro = c.populations.get(rule.readout)
        if ro is None or ro.code != SOFTMAX or ro.size != C:
            raise ValidationError("ForwardForward.readout", f"{rule.readout!r} must be a softmax "
                                  f"population of {C} units.")
        if rule.neutral is None:
            raise ValidationError("ForwardForward.neutral", "a readout is read in the neutral "
                                  "phase; give its name.")
    if rule.negatives == "hard":
        if names.index(rule.neutral) > names.index(rule.anti_hebbian):
            raise ValidationError("ForwardForward.neutral", f"hard negatives are drawn at the "
                                  f"end of {rule.neutral!r}, which must come before the negative "
                                  f"phase {rule.anti_hebbian!r} (order {names}).")
        with pb.at(f"{rule.neutral}:post"):
            wrong = pb.wrong_labels(lab_name, C, stream, probs=pb.r(rule.readout, rule.neutral))
            pb.assign(x["negative"], x["positive"])
            pb.embed_label(x["negative"], C, on=ls, labels=wrong)
    if rule.readout is not None:
        with pb.at(f"{rule.neutral}:post"):
            pb.count_correct(pb.r(rule.readout, rule.neutral))


@dataclass(frozen=True)
class SoftmaxReadout(Contrastive):
    """The local softmax readout of Forward-Forward, as a contrastive (delta) rule.

    ``dW = gain ((y - t)^T x + weight_cost B W)`` for the projections into the softmax population
    ``target`` from the normalised layer outputs, both terms in the ``neutral`` phase: the
    anti-Hebbian term on the readout's own probabilities, the Hebbian term on the target. Hinton's
    reference trains it with 10x the forward learning rate (``gain = 10``) and weight cost 3e-3;
    nothing flows back into the layers.
    """

    hebbian: str = "neutral"
    anti_hebbian: str = "neutral"
    target: str | None = "readout"
    weight_cost: float = 3e-3
    gain: float = 10.0
    name: str = "ff_readout"

    def modifies(self, pb) -> list[str]:
        if self.projections is not None:
            return list(self.projections)
        return [p.name for p in pb.circuit.projections.values()
                if p.plastic and p.role == "feedforward" and p.post == self.target]


register_builder(SoftmaxReadout)(emit_contrastive_updates)


@dataclass(frozen=True)
class Goodness(AbstractMonitor):
    """Batch-mean goodness ``sum_j f(drive)_j^2`` of ``population`` at the end of ``phase``,
    recorded every ``every`` trials under ``name`` (default ``"<population>.goodness@<phase>"``).
    """

    population: str
    phase: str
    every: int = 1
    name: str | None = None

    def __post_init__(self):
        check_int(f"Goodness({self.population!r}).every", self.every, low=1)

    @property
    def key(self) -> str:
        return self.name or f"{self.population}.goodness@{self.phase}"

    def build(self, pb, index: int) -> dict:
        where = f"Monitor({self.key!r})"
        pop = pb.circuit.populations.get(self.population)
        if pop is None:
            raise ValidationError(f"{where}.population", f"no population {self.population!r}.")
        pb.require_phase(self.phase, f"{where}.phase")
        with pb.at("trial_end"):
            with pb.every(self.every, where):
                G = pb.let(activity(pb, self.population, self.phase, mask=False).sumsq(), where)
            pb.record(index, G)
        return dict(key=self.key, kind="var", size=1, per="trial", every=self.every, u0=0,
                    sample=-1, phase=self.phase)
