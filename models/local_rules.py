"""Scenarios of the local rules (neurosim.plasticity.local), each doing its job on synthetic
data generated from the scenario's seed:

* ``oja_pca`` (scenarios/oja_pca.toml): a linear neuron with Oja's rule finds the first
  principal component of correlated Gaussian input (metric: the angle to it);
* ``bcm_selectivity`` (scenarios/bcm_selectivity.toml): neurons with the BCM rule, shown one of
  several noisy patterns per sample, each become selective to one pattern (metric: the
  selectivity index; the theory's preferred response, 1 / P(pattern), is reported beside it);
* ``pes_map`` (scenarios/pes_map.toml): the readout ``D`` of a recurrent tanh circuit in time
  mode (input -> E, E -> E, tau 20 ms) learns a linear map ``t = M x`` with PES from an error
  population ``mismatch = y - t`` during the ``stim`` phase that follows an ``onset`` phase
  (metric: the relative RMS map error on held-out inputs).

``neurosim run scenarios/<name>.toml`` writes into the run directory ``scenario.toml``,
``metrics.csv`` (one row per epoch, epoch 0 = before training), ``summary.json`` (the first and
last metrics, the references, wall time), ``weights.npz`` (the learned projection after every
epoch: ``W`` with shape (epochs + 1, post, pre), and ``epoch``), ``traces.npz`` when the scenario
has monitors, and ``<name>.png``.

The data are drawn from ``component_rng(training.seed, "data:<model>")``, the fixed weights
from their own streams, so the data do not change when an initialisation does.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from neurosim import (BCM, PES, SGD, Circuit, Monitor, Oja, Phase, Protocol, Simulator,
                      ValidationError, compile_plan)
from neurosim.init import Given
from neurosim.rng import component_rng
from neurosim.simulator import shuffled_order
from neurosim.training import check_trace_lengths

_TIMING = (("end", "continuous"), "end")

OJA_SCHEMA = {
    "d": ("int+", 10),                 # input dimension
    "eigen_ratio": ("prob", 0.5),      # lambda_{k+1} / lambda_k of the input covariance
    "n_train": ("int+", 2000),
    "init_scale": ("float+", 0.1),     # initial weights ~ N(0, init_scale^2)
    "timing": _TIMING,
}
BCM_SCHEMA = {
    "d": ("int+", 8),                  # input dimension
    "patterns": ("int+", 4),           # number of patterns, equally likely
    "neurons": ("int+", 4),
    "noise": ("float0", 0.05),         # std of the Gaussian noise added to each presentation
    "n_train": ("int+", 1024),
    "theta_tau": ("float+", 5.0),      # threshold time constant in updates (BCM.theta_tau)
    "theta_init": ("float0", 0.0),
    "init_scale": ("float+", 0.2),     # initial weights ~ U(0, init_scale)
    "transfer": (("identity", "relu"), "identity"),
    "timing": _TIMING,
}
PES_SCHEMA = {
    "d_in": ("int+", 3),
    "n": ("int+", 64),                 # units of the recurrent population E
    "d_out": ("int+", 2),
    "rho": ("prob", 0.5),              # spectral radius of the recurrent weights R
    "input_gain": ("float+", 0.15),    # Win ~ N(0, input_gain^2 / d_in)
    "map_scale": ("float+", 0.5),      # M ~ N(0, map_scale^2 / d_in)
    "onset": ("time", 0.15),           # phase before the learning phase (no plasticity)
    "n_train": ("int+", 512),
    "n_test": ("int+", 256),
    "timing": (("end", "continuous"), "continuous"),
}


# ---- circuits ------------------------------------------------------------------------------------
def _time_kw(settings, duration=None):
    """(population tau, phase keywords) for the scenario's simulation mode."""
    sim = settings["simulation"]
    if sim["mode"] == "time":
        return sim["tau"], dict(duration=sim["phase_duration"] if duration is None else duration)
    return 0.0, {}


def _protocol(settings, phases, **kw):
    sim = settings["simulation"]
    return Protocol(phases, mode=sim["mode"], dt=sim["dt"], method=sim["method"], **kw)


def _check_timing(settings):
    if settings["model"]["timing"] == "continuous" and settings["simulation"]["mode"] != "time":
        raise ValidationError("model.timing", "got 'continuous' in steady mode; the update is "
                              "made at every time step of the phase.",
                              "set simulation.mode = \"time\" or model.timing = \"end\".")


def build_oja(settings):
    m = settings["model"]
    _check_timing(settings)
    seed = settings["training"]["seed"]
    tau, kw = _time_kw(settings)
    W0 = component_rng(seed, "init:W").normal(0.0, m["init_scale"], (1, m["d"]))
    c = Circuit("oja_pca")
    c.population("x", m["d"])
    c.population("y", 1, tau=tau)
    c.project("x", "y", name="W", init=Given(W0.astype(np.float32)))
    proto = _protocol(settings, (Phase("present", clamp={"x": "x"}, **kw),))
    return c, proto, [Oja("W", phase="present", timing=m["timing"])], "y"


def build_bcm(settings):
    m = settings["model"]
    _check_timing(settings)
    if m["theta_tau"] < 1.0:
        raise ValidationError("model.theta_tau", f"got {m['theta_tau']}, expected a number of "
                              "threshold updates >= 1.")
    seed = settings["training"]["seed"]
    tau, kw = _time_kw(settings)
    W0 = component_rng(seed, "init:W").uniform(0.0, m["init_scale"], (m["neurons"], m["d"]))
    c = Circuit("bcm_selectivity")
    c.population("x", m["d"])
    c.population("y", m["neurons"], tau=tau, transfer=m["transfer"])
    c.project("x", "y", name="W", init=Given(W0.astype(np.float32)))
    proto = _protocol(settings, (Phase("present", clamp={"x": "x"}, **kw),))
    rule = BCM("W", phase="present", timing=m["timing"], theta_tau=m["theta_tau"],
               theta_init=m["theta_init"])
    return c, proto, [rule], "y"


def pes_fixed_weights(settings):
    """The fixed input and recurrent weights of the PES circuit and the target map ``M``."""
    m = settings["model"]
    seed = settings["training"]["seed"]
    Win = component_rng(seed, "init:Win").normal(0.0, m["input_gain"] / math.sqrt(m["d_in"]),
                                                 (m["n"], m["d_in"]))
    R = component_rng(seed, "init:R").normal(0.0, 1.0 / math.sqrt(m["n"]), (m["n"], m["n"]))
    R *= m["rho"] / max(np.max(np.abs(np.linalg.eigvals(R))), 1e-12)
    M = component_rng(seed, "data:map").normal(0.0, m["map_scale"] / math.sqrt(m["d_in"]),
                                               (m["d_out"], m["d_in"]))
    return Win, R, M


def build_pes(settings):
    m = settings["model"]
    if settings["simulation"]["mode"] != "time":
        raise ValidationError("simulation.mode", "got 'steady'; the PES scenario's circuit is "
                              "recurrent (E -> E), which needs time mode.",
                              "set simulation.mode = \"time\".")
    Win, R, _ = pes_fixed_weights(settings)
    tau = settings["simulation"]["tau"]
    c = Circuit("pes_map")
    c.population("x", m["d_in"])
    c.population("E", m["n"], tau=tau, transfer="tanh")
    c.population("y", m["d_out"])
    c.error("mismatch", "y", target="t")
    c.project("x", "E", name="Win", init=Given(Win.astype(np.float32)), plastic=False)
    c.project("E", "E", name="R", init=Given(R.astype(np.float32)), plastic=False)
    c.project("E", "y", name="D", init="zeros")
    proto = _protocol(settings, (Phase("onset", clamp={"x": "x"}, duration=m["onset"]),
                                 Phase("stim", clamp={"x": "x"},
                                       duration=settings["simulation"]["phase_duration"])),
                      inference_phase="stim")
    return c, proto, [PES("D", "mismatch", phase="stim", timing=m["timing"])], "y"


_LEARNED = {"oja_pca": "W", "bcm_selectivity": "W", "pes_map": "D"}
_TARGETS = {"oja_pca": "onehot", "bcm_selectivity": "onehot", "pes_map": "values"}
_BUILDERS = {"oja_pca": build_oja, "bcm_selectivity": build_bcm, "pes_map": build_pes}


def make_simulator(settings) -> Simulator:
    """Compile the scenario's circuit with its rule, the [training] optimizer and the
    [[monitor]] entries (intervals in epochs resolved for ``model.n_train``)."""
    from neurosim import scenario as sc

    name = settings["model"]["name"]
    if sc.has_epoch_intervals(settings):
        settings = sc.resolve_intervals(settings, settings["model"]["n_train"])
    circuit, protocol, rules, output = _BUILDERS[name](settings)
    tr = settings["training"]
    opt = SGD(lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
              style=tr["optimizer"], milestones=tuple(tr["milestones"]), gamma=tr["gamma"],
              max_weight=tr["max_weight"], schedule=tr["schedule"], epochs=tr["epochs"],
              decay_start=tr["decay_start"])
    mons = [Monitor(m["target"], phase=m["phase"], every=m["every"], per=m["per"],
                    units=tuple(m["units"]) if m["units"] else None, sample=m["sample"],
                    name=m["name"], synapses=m.get("synapses")) for m in settings["monitor"]]
    plan = compile_plan(circuit, protocol, rules=rules, optimizer=opt, monitors=mons,
                        batch=tr["batch_size"], seed=tr["seed"], output=output,
                        targets=_TARGETS[name])
    return Simulator(plan, threads=tr["threads"], backend=tr["backend"])


# ---- data and metrics ----------------------------------------------------------------------------
class _Oja:
    def __init__(self, settings):
        m = settings["model"]
        rng = component_rng(settings["training"]["seed"], "data:oja_pca")
        d = m["d"]
        Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        lam = m["eigen_ratio"] ** np.arange(d)
        self.X = ((rng.normal(size=(m["n_train"], d)) * np.sqrt(lam)) @ Q.T).astype(np.float32)
        self.T = None
        C = self.X.astype(np.float64).T @ self.X / len(self.X)
        vals, vecs = np.linalg.eigh(C)
        self.v1, self.lam = vecs[:, -1], vals[::-1]

    def measure(self, sim):
        w = sim.weights["W"][0].astype(np.float64)
        norm = float(np.linalg.norm(w))
        cos = abs(float(w @ self.v1)) / norm if norm > 0 else 0.0
        return {"angle_deg": math.degrees(math.acos(min(1.0, cos))), "w_norm": norm}

    def references(self):
        return {"eigenvalues": self.lam.tolist(), "pc1": self.v1.tolist()}


class _BCM:
    def __init__(self, settings):
        m = settings["model"]
        rng = component_rng(settings["training"]["seed"], "data:bcm_selectivity")
        P = rng.uniform(0.0, 1.0, (m["patterns"], m["d"]))
        self.P = (P / np.linalg.norm(P, axis=1, keepdims=True)).astype(np.float32)
        labels = rng.integers(0, m["patterns"], m["n_train"])
        self.X = (self.P[labels] + m["noise"] * rng.normal(size=(m["n_train"], m["d"]))
                  ).astype(np.float32)
        self.T = None
        self.K = m["patterns"]

    def measure(self, sim):
        r = sim.outputs(self.P).astype(np.float64)          # (patterns, neurons)
        pref = np.argmax(r, axis=0)
        top = r[pref, np.arange(r.shape[1])]
        others = (np.abs(r).sum(0) - np.abs(top)) / max(self.K - 1, 1)
        sel = np.where(top > 0, 1.0 - others / np.where(top > 0, top, 1.0), 0.0)
        row = {"min_selectivity": float(sel.min()), "mean_selectivity": float(sel.mean())}
        for i in range(r.shape[1]):
            row[f"selectivity_{i}"] = float(sel[i])
            row[f"preferred_{i}"] = int(pref[i])
            row[f"response_{i}"] = float(top[i])
        row["theta_mean"] = float(np.mean(sim.buffer("bcm.W.theta")))
        self.responses = r
        return row

    def references(self):
        return {"preferred_response_theory": float(self.K),
                "note": "at a selective fixed point theta = E[y^2] = y_pref^2 / K and y = theta "
                        "on the preferred pattern, so y_pref = K (patterns equally likely)"}


class _PES:
    def __init__(self, settings):
        m = settings["model"]
        rng = component_rng(settings["training"]["seed"], "data:pes_map")
        self.Win, self.R, self.M = pes_fixed_weights(settings)
        self.X = rng.normal(size=(m["n_train"], m["d_in"])).astype(np.float32)
        self.T = (self.X @ self.M.T).astype(np.float32)
        self.Xt = rng.normal(size=(m["n_test"], m["d_in"])).astype(np.float32)
        self.Tt = self.Xt.astype(np.float64) @ self.M.T
        self.settings = settings

    def error(self, sim):
        """(relative RMS error, outputs) on the held-out inputs."""
        y = sim.outputs(self.Xt).astype(np.float64)
        return float(np.sqrt(np.mean((y - self.Tt) ** 2) / np.mean(self.Tt ** 2))), y

    def measure(self, sim):
        err, self.y = self.error(sim)
        return {"map_error": err}

    def references(self):
        """The error of the readout that is exact for the linearised circuit (tanh(u) ~ u, at
        its fixed point E = (I - R)^-1 Win x): D_lin = M A^+, A = (I - R)^-1 Win, evaluated on
        the engine's tanh circuit. PES learns the directions of E's large variance (those of A)
        within a few minibatches, so it ends at or below this error; what remains is the
        tanh's curvature."""
        sim = make_simulator(self.settings)
        A = np.linalg.solve(np.eye(self.R.shape[0]) - self.R, self.Win)
        sim.set_weights("D", (self.M @ np.linalg.pinv(A)).astype(np.float32))
        return {"linear_readout_error": self.error(sim)[0]}


_TASKS = {"oja_pca": _Oja, "bcm_selectivity": _BCM, "pes_map": _PES}
_MAIN = {"oja_pca": "angle_deg", "bcm_selectivity": "min_selectivity", "pes_map": "map_error"}


# ---- the run -------------------------------------------------------------------------------------
def run(settings, out_dir, *, data_dir=None, resume=False, progress=True) -> dict:
    """Train the scenario's circuit for ``training.epochs`` epochs on its synthetic data,
    measuring after every epoch (see the module docstring for the files written)."""
    from neurosim import scenario as sc

    name = settings["model"]["name"]
    if resume:
        raise ValidationError("--resume", f"{name} runs keep no checkpoints (a run takes "
                              "seconds); start it again without --resume.")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenario.toml").write_text(sc.to_toml(settings))
    task = _TASKS[name](settings)
    sim = make_simulator(settings)
    tr = settings["training"]
    check_trace_lengths(sim, sc.resolve_intervals(settings, len(task.X)), len(task.X))
    proj = _LEARNED[name]
    rows, snaps = [], [sim.weights[proj].copy()]
    rows.append({"epoch": 0, **task.measure(sim), "wall_s": time.perf_counter() - t0})
    for ep in range(tr["epochs"]):
        sim.set_lr(sim.plan.optimizer.lr_at(ep))
        sim.set_epoch(ep)
        order = shuffled_order(tr["seed"], ep, len(task.X))
        sim.train(task.X, order=order, T=task.T, chunk=tr["chunk"])
        rows.append({"epoch": ep + 1, **task.measure(sim), "wall_s": time.perf_counter() - t0})
        snaps.append(sim.weights[proj].copy())
        if progress:
            key = _MAIN[name]
            print(f"epoch {ep + 1}/{tr['epochs']}: {key} {rows[-1][key]:.4g}", flush=True)
    refs = task.references()
    _write_csv(out / "metrics.csv", rows)
    np.savez(out / "weights.npz", **{proj: np.stack(snaps), "epoch": np.arange(len(snaps))})
    if sim.plan.monitors:
        arrays = {f"{k}/{f}": v for k, t in sim.traces.items() for f, v in t.to_dict().items()}
        np.savez(out / "traces.npz", **arrays)
    _PLOTS[name](out / f"{name}.png", settings, rows, snaps, task, refs, sim.traces)
    key = _MAIN[name]
    summary = {"scenario": settings["name"], "model": name, "epochs": tr["epochs"],
               "seed": tr["seed"], "mode": settings["simulation"]["mode"],
               "timing": settings["model"]["timing"], "metric": key,
               f"initial_{key}": rows[0][key], f"final_{key}": rows[-1][key],
               "final": rows[-1], "references": refs, "wall_s": time.perf_counter() - t0}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if progress:
        print(f"{name}: {key} {rows[0][key]:.4g} -> {rows[-1][key]:.4g}; wrote {out} "
              f"({summary['wall_s']:.1f} s)", file=sys.stderr)
    return summary


def _write_csv(path, rows):
    fields = list(rows[0])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)


# ---- plots ---------------------------------------------------------------------------------------
def _figure(ncols=2):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.0))
    return plt, fig, axes


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_oja(path, settings, rows, snaps, task, refs, traces):
    plt, fig, (ax, bx) = _figure()
    ep = [r["epoch"] for r in rows]
    ax.semilogy(ep, [max(r["angle_deg"], 1e-3) for r in rows], "o", ms=4,
                label="angle of W to PC 1, per epoch")
    if "W.w" in traces:      # a [[monitor]] of the weights: the angle between the epochs
        tr = traces["W.w"]
        w = tr.values.reshape(len(tr.values), -1).astype(np.float64)
        cos = np.abs(w @ task.v1) / np.maximum(np.linalg.norm(w, axis=1), 1e-30)
        per_epoch = math.ceil(len(task.X) / settings["training"]["batch_size"])
        ax.semilogy((tr.trial + 1) / per_epoch, np.maximum(np.degrees(np.arccos(
            np.minimum(cos, 1.0))), 1e-3), "-", color="C0", lw=0.8,
            label="from the W.w monitor")
    ax.set_xlabel("epoch")
    ax.set_ylabel("angle (degrees)")
    ax2 = ax.twinx()
    ax2.plot(ep, [r["w_norm"] for r in rows], "s--", color="C1", ms=3, label="|W|")
    ax2.set_ylabel("|W| (Oja's fixed point: 1)")
    ax.legend(handles=ax.lines + ax2.lines, fontsize=8, loc="center right")
    w = snaps[-1][0].astype(np.float64)
    w = w * np.sign(w @ task.v1 or 1.0)
    k = np.arange(len(w))
    bx.plot(k, task.v1, "o", ms=7, mfc="none", label="PC 1 of the input (unit norm)")
    bx.plot(k, w, "x", ms=6, label=f"W after {rows[-1]['epoch']} epochs")
    bx.axhline(0, color="0.8", lw=0.6)
    bx.set_xlabel("input unit")
    bx.set_ylabel("weight")
    bx.legend(fontsize=8)
    fig.suptitle(f"{settings['name']}: Oja's rule, {settings['simulation']['mode']} mode, "
                 f"timing {settings['model']['timing']}", fontsize=10)
    _save(plt, fig, path)


def _plot_bcm(path, settings, rows, snaps, task, refs, traces):
    plt, fig, (ax, bx) = _figure()
    ep = [r["epoch"] for r in rows]
    n = settings["model"]["neurons"]
    for i in range(n):
        ax.plot(ep, [r[f"selectivity_{i}"] for r in rows], "o-", ms=3, label=f"neuron {i}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("selectivity 1 - mean|r other| / r preferred")
    ax.legend(fontsize=8)
    r = task.responses
    im = bx.imshow(r.T, aspect="auto", cmap="viridis")
    bx.set_xticks(range(r.shape[0]))
    bx.set_yticks(range(r.shape[1]))
    bx.set_xlabel("pattern")
    bx.set_ylabel("neuron")
    bx.set_title(f"responses after {rows[-1]['epoch']} epochs (theory: {task.K} on the "
                 "preferred pattern, 0 elsewhere)", fontsize=8)
    fig.colorbar(im, ax=bx, label="rate")
    fig.suptitle(f"{settings['name']}: BCM, {settings['simulation']['mode']} mode, timing "
                 f"{settings['model']['timing']}", fontsize=10)
    _save(plt, fig, path)


def _plot_pes(path, settings, rows, snaps, task, refs, traces):
    plt, fig, (ax, bx) = _figure()
    ep = [r["epoch"] for r in rows]
    ax.semilogy(ep, [r["map_error"] for r in rows], "o-", ms=4, label="PES readout (test set)")
    ax.axhline(refs["linear_readout_error"], color="0.5", ls=":",
               label="readout exact for the linearised circuit")
    ax.set_xlabel("epoch")
    ax.set_ylabel("relative RMS map error |y - M x| / |M x|")
    ax.legend(fontsize=8)
    lim = 1.05 * np.max(np.abs(task.Tt))
    for j in range(task.Tt.shape[1]):
        bx.plot(task.Tt[:, j], task.y[:, j], ".", ms=3, label=f"output {j}")
    bx.plot([-lim, lim], [-lim, lim], color="0.5", lw=0.8, label="y = M x")
    bx.set_xlabel("target (M x)_j")
    bx.set_ylabel(f"output y_j after {rows[-1]['epoch']} epochs")
    bx.set_title("held-out inputs", fontsize=8)
    bx.legend(fontsize=8)
    fig.suptitle(f"{settings['name']}: PES on the readout of a recurrent tanh circuit "
                 f"(timing {settings['model']['timing']})", fontsize=10)
    _save(plt, fig, path)


_PLOTS = {"oja_pca": _plot_oja, "bcm_selectivity": _plot_bcm, "pes_map": _plot_pes}


def _register():
    from neurosim.scenario import register_model

    for name, schema in (("oja_pca", OJA_SCHEMA), ("bcm_selectivity", BCM_SCHEMA),
                         ("pes_map", PES_SCHEMA)):
        register_model(name, schema, _BUILDERS[name], runner=run, simulator=make_simulator)


_register()
