"""A Forward-Forward network (Hinton 2022): circuit, protocol, rules, a simulator that classifies,
and the scenario model ``"ff"``.

Circuit (names used everywhere else)::

    input (normalize='rms', identity)         --W1-->  h1  --W2-->  h2  --W3-->  h3   (ReLU, RMS-normalised outputs)
    one (constant 1)                        --b1, b2, b3-->  h1, h2, h3               (learnable biases)
    h2, h3                                  --R2, R3-->  readout (softmax, local delta rule)

Protocol: ``positive`` (true label written into the image), ``neutral`` (0.1 in the label pixels;
the readout is read and trained here, and hard negatives are drawn from it), ``negative`` (a
wrong label). All three run the same circuit; the layers' outputs are normalised to unit RMS, so
each layer sees only the direction of the previous layer's activity, and the goodness
``sum_j relu(drive)_j^2`` is the layer's own.

Rules: :class:`~neurosim.plasticity.ForwardForward` on ``W*`` and ``b*`` (peer normalisation,
weight cost on ``W*`` only) and :class:`~neurosim.plasticity.SoftmaxReadout` on ``R*``.

Hinton's reference (ffcode): 784-1000-1000-1000, batch 100, weights N(0, 1/fan_in), zero biases
and readout, lr 0.01 with the gradient smoothed as ``g <- 0.9 g + 0.1 dW/B`` (= torch-style
momentum 0.9 with the learning rate times 0.1, see ``gradient_smoothing``), weight cost 1e-3
(readout: 3e-3, 10x the learning rate), lr decaying linearly to 0 over the second half,
peer normalisation 0.03, hard negatives; classification by the summed goodness of layers 2..3
over the 10 label candidates, or by the softmax readout of layers 2..3.

:class:`FFSimulator` is a :class:`~neurosim.Simulator` whose ``predict``/``evaluate`` classify
that way (the plan's own inference program cannot: it sees no label and needs ten passes). It
runs a second plan of the same circuit (one phase, a larger batch) with the trained weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neurosim import (SGD, Circuit, Monitor, Normal, Phase, Protocol, Simulator, ValidationError,
                      Zeros, compile_plan)
from neurosim.optable import RMS_NORM, f_ref
from neurosim.plasticity import ForwardForward, Goodness, SoftmaxReadout

HIDDEN = ("relu", "identity", "tanh", "sigmoid", "erf")


@dataclass(frozen=True)
class FFNetwork:
    """What :func:`build_ff_network` returns."""

    circuit: Circuit
    protocol: Protocol
    rules: tuple
    input: str
    layers: tuple              # hidden populations, input side first
    goodness_layers: tuple     # layers whose goodness is summed to classify
    readout: str | None
    readout_from: tuple        # layers the readout reads
    n_classes: int
    label_strength: float
    phases: dict = field(default_factory=dict)   # role -> phase name


def build_ff_network(sizes=(784, 1000, 1000, 1000), *, n_classes=10, negatives="hard",
                     readout=True, readout_from=2, goodness_from=2, peer_normalization=0.03,
                     weight_cost=1e-3, readout_weight_cost=3e-3, readout_gain=10.0,
                     threshold=None, temperature=1.0, label_strength=1.0, bias=True,
                     hidden="relu", mode="steady", tau=0.01, dt=1e-3, phase_duration=0.1,
                     method="euler") -> FFNetwork:
    """Build circuit, protocol and rules of a Forward-Forward network.

    Parameters
    ----------
    sizes : (d_in, h_1, ..., h_L)
        Input width (the first ``n_classes`` inputs carry the label) and hidden widths.
    negatives : ``"hard"`` (from the readout) or ``"uniform"``
    readout : bool
        Add the local softmax readout (needed for hard negatives and softmax classification).
    readout_from, goodness_from : int
        1-based index of the first hidden layer read by the readout / summed for goodness
        classification (Hinton: 2; clipped to the number of layers).
    peer_normalization, weight_cost, threshold, temperature, label_strength :
        see :class:`~neurosim.plasticity.ForwardForward`.
    readout_weight_cost, readout_gain : the readout's weight cost and relative learning rate.
    bias : learnable biases (projections from a constant population).
    mode, tau, dt, phase_duration, method :
        ``"steady"`` or ``"time"``; in time mode the hidden layers and the readout have time
        constant ``tau`` and each phase lasts ``phase_duration``.
    """
    sizes = tuple(sizes)
    if len(sizes) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in sizes):
        raise ValidationError("build_ff_network.sizes", f"got {sizes!r}, expected (d_in, h_1, "
                              "..., h_L) with at least one hidden layer, positive ints.")
    if sizes[0] < n_classes:
        raise ValidationError("build_ff_network.sizes", f"the input ({sizes[0]}) must hold the "
                              f"{n_classes} label pixels.")
    if hidden not in HIDDEN:
        raise ValidationError("build_ff_network.hidden", f"got {hidden!r}, expected one of "
                              f"{list(HIDDEN)}.")
    if negatives == "hard" and not readout:
        raise ValidationError("build_ff_network.negatives", "hard negatives need the readout.",
                              "set readout=True or negatives='uniform'.")
    t = tau if mode == "time" else 0.0
    L = len(sizes) - 1
    c = Circuit(f"ff-{'-'.join(map(str, sizes))}")
    c.population("input", sizes[0], transfer="identity", normalize="rms")
    if bias:
        c.population("one", 1, transfer="identity", bias=1.0)
    layers, names, biases = [], [], []
    prev = "input"
    for i, n in enumerate(sizes[1:], start=1):
        h = f"h{i}"
        c.population(h, n, tau=t, transfer=hidden, normalize="rms")
        c.project(prev, h, name=f"W{i}", init=Normal(std=1.0 / math.sqrt(sizes[i - 1])))
        names.append(f"W{i}")
        if bias:
            c.project("one", h, name=f"b{i}", init=Zeros())
            names.append(f"b{i}")
            biases.append(f"b{i}")
        layers.append(h)
        prev = h
    r0 = min(max(int(readout_from), 1), L)
    g0 = min(max(int(goodness_from), 1), L)
    ro, ro_from = None, ()
    if readout:
        ro = "readout"
        c.population(ro, n_classes, tau=t, transfer="softmax")
        ro_from = tuple(layers[r0 - 1:])
        for h in ro_from:
            c.project(h, ro, name=f"R{h[1:]}", init=Zeros())
    kw = dict(duration=phase_duration) if mode == "time" else {}
    phases = [Phase("positive", clamp={"input": "x"}, **kw)]
    roles = {"positive": "positive", "negative": "negative"}
    if readout:
        phases.append(Phase("neutral", clamp={"input": "x_neutral"}, **kw))
        roles["neutral"] = "neutral"
    phases.append(Phase("negative", clamp={"input": "x_negative"}, **kw))
    protocol = Protocol(tuple(phases), mode=mode, dt=dt, method=method,
                        inference_phase="positive")
    rules = [ForwardForward(negatives=negatives, neutral="neutral" if readout else None,
                            readout=ro, n_classes=n_classes, label_strength=label_strength,
                            peer_normalization=peer_normalization, weight_cost=weight_cost,
                            threshold=threshold, temperature=temperature,
                            bias_projections=tuple(biases), projections=tuple(names))]
    if readout:
        rules.append(SoftmaxReadout(weight_cost=readout_weight_cost, gain=readout_gain,
                                    projections=tuple(f"R{h[1:]}" for h in ro_from)))
    return FFNetwork(c, protocol, tuple(rules), "input", tuple(layers), tuple(layers[g0 - 1:]),
                     ro, ro_from, n_classes, float(label_strength), roles)


def embed_label(X, label, n_classes=10, strength=1.0) -> np.ndarray:
    """A float32 copy of ``X`` with the first ``n_classes`` columns overwritten: one-hot of
    ``label`` (an int or an array of ints) times ``strength``, or, for ``label=None``, the neutral
    label ``strength / n_classes`` everywhere."""
    Xc = np.array(X, dtype=np.float32, copy=True, order="C")
    if label is None:
        Xc[:, :n_classes] = strength / n_classes
    else:
        lab = np.broadcast_to(np.asarray(label), (Xc.shape[0],))
        Xc[:, :n_classes] = 0.0
        Xc[np.arange(Xc.shape[0]), lab] = strength
    return Xc


class FFSimulator(Simulator):
    """A :class:`~neurosim.Simulator` for Forward-Forward plans that classifies.

    Parameters
    ----------
    plan : the training plan (from the circuit, protocol and rules of an :class:`FFNetwork`)
    network : FFNetwork
    classify : ``"goodness"`` (argmax over the label candidates of the summed goodness of
        ``network.goodness_layers``) or ``"softmax"`` (the readout on the neutral label)
    eval_batch : rows per pass of the evaluation plan.

    ``evaluate`` computes both accuracies when the network has a readout, returns the one named
    by ``classify`` and keeps both in :attr:`last_evaluation`; if :attr:`log_path` is set, it
    appends a row (trial, accuracies, seconds) to that CSV file.
    """

    def __init__(self, plan, threads: int = 1, *, backend="numba", network: FFNetwork,
                 classify="goodness",
                 eval_batch: int = 1000):
        super().__init__(plan, threads=threads, backend=backend)
        if classify not in ("goodness", "softmax"):
            raise ValidationError("FFSimulator.classify", f"got {classify!r}, expected "
                                  "'goodness' or 'softmax'.")
        if classify == "softmax" and network.readout is None:
            raise ValidationError("FFSimulator.classify", "'softmax' needs the readout.")
        self.network = network
        self.classify = classify
        self.eval_batch = int(eval_batch)
        self.last_evaluation: dict = {}
        self.log_path: Path | None = None
        self._eval: Simulator | None = None

    # -- the evaluation plan --------------------------------------------------------------------
    def _evaluator(self) -> Simulator:
        net = self.network
        if self._eval is None:
            proto = self.plan.protocol
            kw = dict(duration=proto.phases[0].duration) if proto.mode == "time" else {}
            ph = Protocol((Phase("probe", clamp={net.input: "x"}, **kw),), mode=proto.mode,
                          dt=proto.dt, method=proto.method)
            plan = compile_plan(net.circuit, ph, batch=self.eval_batch, seed=self.plan.seed,
                                output=net.readout or net.layers[-1])
            self._eval = Simulator(plan, threads=self.threads, backend=self.backend)
        for name in net.circuit.projections:
            self._eval.view(f"{name}.W")[...] = self.view(f"{name}.W")
        return self._eval

    def goodness(self, X) -> np.ndarray:
        """(samples, n_classes): summed goodness of the goodness layers with each label."""
        net = self.network
        X = np.asarray(X, np.float32)
        ev = self._evaluator()
        C = net.n_classes
        out = np.zeros((X.shape[0], C), np.float64)
        # the layers' activity f(drive), before their RMS normalisation
        codes = {h: net.circuit.populations[h].code - RMS_NORM for h in net.goodness_layers}
        for s in range(0, X.shape[0], self.eval_batch):
            xb = X[s:s + self.eval_batch]
            nb = xb.shape[0]
            for lab in range(C):
                ev.outputs(embed_label(xb, lab, C, net.label_strength))
                for h in net.goodness_layers:
                    a = f_ref(np, codes[h], ev.view(f"{h}.drive@probe", nb))
                    out[s:s + nb, lab] += np.einsum("ij,ij->i", a, a, dtype=np.float64)
        return out

    def readout_probabilities(self, X) -> np.ndarray:
        """(samples, n_classes): the softmax readout with the neutral label."""
        net = self.network
        if net.readout is None:
            raise ValidationError("FFSimulator.readout_probabilities", "the network has no "
                                  "readout.")
        return self._evaluator().outputs(embed_label(X, None, net.n_classes, net.label_strength))

    def predict(self, X, batch=None, method: str | None = None) -> np.ndarray:
        """Class predictions by ``method`` (default :attr:`classify`)."""
        method = method or self.classify
        if method == "goodness":
            return np.argmax(self.goodness(X), axis=1)
        if method == "softmax":
            return np.argmax(self.readout_probabilities(X), axis=1)
        raise ValidationError("FFSimulator.predict.method", f"got {method!r}, expected "
                              "'goodness' or 'softmax'.")

    def evaluate(self, X, Y) -> float:
        """Accuracy by :attr:`classify`; both accuracies go to :attr:`last_evaluation`."""
        t0 = time.perf_counter()
        Y = np.asarray(Y)
        res = {"goodness": float(np.mean(self.predict(X, method="goodness") == Y))}
        if self.network.readout is not None:
            res["softmax"] = float(np.mean(self.predict(X, method="softmax") == Y))
        res["eval_s"] = time.perf_counter() - t0
        self.last_evaluation = res
        if self.log_path is not None:
            new = not Path(self.log_path).exists()
            with open(self.log_path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["trial", "goodness_accuracy", "softmax_accuracy", "eval_s"])
                w.writerow([self.trial, res["goodness"], res.get("softmax", float("nan")),
                            f"{res['eval_s']:.2f}"])
        return res[self.classify]


def ff_optimizer(lr, epochs, *, momentum=0.9, gradient_smoothing=True, schedule="linear_decay",
                 decay_start=0.5, **kw) -> SGD:
    """Hinton's optimizer: ``g <- m g + (1 - m) dW/B; W <- W - lr gain(epoch) g``, realised as
    torch-style SGD momentum with lr times ``1 - m`` (exact: ``g = (1 - m) v``), and the linear
    decay of lr over the second half of ``epochs``."""
    scaled = lr * (1.0 - momentum) if gradient_smoothing else lr
    kw.setdefault("style", "torch")
    return SGD(lr=scaled, momentum=momentum, schedule=schedule, epochs=int(epochs),
               decay_start=decay_start, **kw)


# -- scenario registration ------------------------------------------------------------------------
FF_SCHEMA = {
    "sizes": ("list[int]", [784, 1000, 1000, 1000]),
    "n_classes": ("int+", 10),
    "negatives": (("hard", "uniform"), "hard"),
    "readout": ("bool", True),
    "readout_from": ("int+", 2),
    "goodness_from": ("int+", 2),
    "peer_normalization": ("float0", 0.03),
    "weight_cost": ("float0", 1e-3),
    "readout_weight_cost": ("float0", 3e-3),
    "readout_gain": ("float+", 10.0),
    "threshold": ("float+?", None),
    "temperature": ("float+", 1.0),
    "label_strength": ("float+", 1.0),
    "bias": ("bool", True),
    "hidden": (HIDDEN, "relu"),
    "gradient_smoothing": ("bool", True),
    "lr_schedule": (("linear_decay", "step"), "linear_decay"),
    "decay_start": ("prob", 0.5),
    "classify": (("goodness", "softmax"), "goodness"),
    "eval_batch": ("int+", 1000),
}


def network_from_settings(s) -> FFNetwork:
    m, sim = s["model"], s["simulation"]
    if len(m["sizes"]) < 2 or min(m["sizes"]) < 1:
        raise ValidationError("model.sizes", f"got {m['sizes']}, expected [d_in, hidden...] with "
                              "at least one hidden layer and sizes >= 1.")
    if m["sizes"][0] < m["n_classes"]:
        raise ValidationError("model.sizes", f"the input ({m['sizes'][0]}) must hold the "
                              f"{m['n_classes']} label pixels (model.n_classes).")
    if m["negatives"] == "hard" and not m["readout"]:
        raise ValidationError("model.negatives", "hard negatives are drawn from the readout.",
                              "set model.readout = true or model.negatives = \"uniform\".")
    if m["classify"] == "softmax" and not m["readout"]:
        raise ValidationError("model.classify", "'softmax' classification needs the readout.")
    return build_ff_network(tuple(m["sizes"]), n_classes=m["n_classes"],
                            negatives=m["negatives"], readout=m["readout"],
                            readout_from=m["readout_from"], goodness_from=m["goodness_from"],
                            peer_normalization=m["peer_normalization"],
                            weight_cost=m["weight_cost"],
                            readout_weight_cost=m["readout_weight_cost"],
                            readout_gain=m["readout_gain"], threshold=m["threshold"],
                            temperature=m["temperature"], label_strength=m["label_strength"],
                            bias=m["bias"], hidden=m["hidden"], mode=sim["mode"], tau=sim["tau"],
                            dt=sim["dt"], phase_duration=sim["phase_duration"],
                            method=sim["method"])


def _from_settings(s):
    net = network_from_settings(s)
    return net.circuit, net.protocol, list(net.rules), None


def make_ff_simulator(settings: dict) -> FFSimulator:
    """The scenario's network compiled with Hinton's optimizer and the goodness monitors
    (``[[monitor]] target = "h1.goodness", phase = "positive"``); standard monitors otherwise.
    Monitor intervals in epochs are resolved for the nominal training-set size."""
    from neurosim import scenario as sc

    settings = sc.with_trial_intervals(settings)
    net = network_from_settings(settings)
    tr, m = settings["training"], settings["model"]
    opt = ff_optimizer(tr["lr"], tr["epochs"], momentum=tr["momentum"],
                       gradient_smoothing=m["gradient_smoothing"], schedule=m["lr_schedule"],
                       decay_start=m["decay_start"], style=tr["optimizer"],
                       weight_decay=tr["weight_decay"], milestones=tuple(tr["milestones"]),
                       gamma=tr["gamma"], max_weight=tr["max_weight"])
    mons = []
    for i, mon in enumerate(settings["monitor"]):
        if mon["target"].endswith(".goodness"):
            pop = mon["target"].rsplit(".", 1)[0]
            if pop not in net.circuit.populations:
                raise ValidationError(f"monitor[{i}].target", f"no population {pop!r} (has "
                                      f"{sorted(net.circuit.populations)}).")
            if mon["phase"] is None:
                raise ValidationError(f"monitor[{i}].phase", "a goodness monitor needs the phase "
                                      "(positive, negative or neutral).")
            mons.append(Goodness(pop, mon["phase"], every=mon["every"], name=mon["name"]))
        else:
            mons.append(Monitor(mon["target"], phase=mon["phase"], every=mon["every"],
                                per=mon["per"], units=tuple(mon["units"]) if mon["units"] else None,
                                sample=mon["sample"], name=mon["name"]))
    plan = compile_plan(net.circuit, net.protocol, rules=list(net.rules), optimizer=opt,
                        monitors=mons, batch=tr["batch_size"], seed=tr["seed"], output=None)
    return FFSimulator(plan, threads=tr["threads"], backend=tr["backend"], network=net, classify=m["classify"],
                       eval_batch=m["eval_batch"])


def run(settings, out_dir, data_dir=None, resume=False, progress=True) -> dict:
    """``neurosim run`` for the ``ff`` model: the standard training loop
    (:func:`neurosim.training.run`: epochs, checkpoints, metrics, resume) with
    :func:`make_ff_simulator` in place of its simulator factory, so that the test accuracy is
    Forward-Forward's classification. Both accuracies of every evaluation go to
    ``ff_evaluations.csv``; the summary gets ``final_test_accuracy_goodness`` and
    ``final_test_accuracy_softmax``."""
    from neurosim import training

    made = []

    def factory(s):
        sim = make_ff_simulator(s)
        sim.log_path = Path(out_dir) / "ff_evaluations.csv"
        made.append(sim)
        return sim

    summary = training.run(settings, out_dir, data_dir=data_dir, resume=resume,
                           progress=progress, simulator_factory=factory)
    if made and made[-1].last_evaluation:
        ev = made[-1].last_evaluation
        summary["final_test_accuracy_goodness"] = ev["goodness"]
        summary["final_test_accuracy_softmax"] = ev.get("softmax")
        summary["classify"] = made[-1].classify
        path = Path(out_dir) / "summary.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, default=_json_default))
        os.replace(tmp, path)
    return summary


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


def _register():
    from neurosim.scenario import register_model

    register_model("ff", FF_SCHEMA, _from_settings, runner=run, simulator=make_ff_simulator)


_register()
