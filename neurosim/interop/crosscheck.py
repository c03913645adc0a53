"""``neurosim crosscheck SCENARIO``: run a time-mode scenario's first trials in neurosim and in
the equivalent Brian2 network, and compare every monitored variable step by step.

For each monitored population variable (the scenario's ``[[monitor]]`` entries on ``pop.r`` or
``pop.drive``; every population's ``r`` if it has none) and each phase, the tool prints the
maximum absolute deviation between the two simulators relative to the variable's range over the
compared samples, and exits with status 1 if any exceeds the tolerance (0 otherwise, 2 on a
usage error). With ``--out DIR`` it also writes ``DIR/crosscheck_traces.npz`` (both simulators'
traces of every compared variable, and the time axis), ``DIR/crosscheck.json`` (the table) and
``DIR/crosscheck.png`` (the traces of both simulators overlaid, one panel per variable).

Tolerance (default, see docs/interop.md): both simulators take the same explicit step, so the
only difference is arithmetic: neurosim runs in float32, Brian2 in float64. Per step, float32
rounds each rate once (relative error <= u = 2^-24) and each K-term drive sum by <= K u; the
rate equation is a low-pass filter that accumulates at most tau/dt rounded steps (1/alpha for
exponential Euler). The default tolerance is therefore ``10 * u * (max tau/dt + max fan-in)``;
the factor 10 covers the amplification by recurrent (top-down) loops and the rounding of the
transfer functions.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from ..circuit import ErrorPopulation
from ..errors import ValidationError

HELP = "run a time-mode scenario's first trials in neurosim and Brian2 and compare the traces"

U32 = 2.0 ** -24   # unit roundoff of float32 (half an ulp at 1)


def add_arguments(parser) -> None:
    parser.add_argument("scenario", help="TOML scenario file (simulation.mode = \"time\")")
    parser.add_argument("--trials", type=int, default=3, help="trials (batch 1) to run in both "
                        "simulators (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a scenario key (repeatable)")
    parser.add_argument("--tolerance", type=float, default=None, help="maximum deviation "
                        "relative to each variable's range (default: 10 u32 (tau/dt + fan-in))")
    parser.add_argument("--target", choices=("numpy", "cython"), default="numpy",
                        help="Brian2 code-generation target (default numpy: no compiler needed)")
    parser.add_argument("--data", default=None, help="take the inputs from the scenario's dataset "
                        "in this folder (first trials of epoch 0's order) instead of seeded "
                        "uniform [0, 1) inputs")
    parser.add_argument("--plasticity", action="store_true", help="keep the scenario's rules in "
                        "neurosim and copy its weights into Brian2 before every trial")
    parser.add_argument("--softmax-as", choices=("sigmoid", "identity", "relu", "tanh"),
                        default=None, help="replace softmax populations by this transfer in both "
                        "simulators (softmax is not exported)")
    parser.add_argument("--no-dropout", action="store_true", help="set every population's "
                        "dropout to 0 in both simulators (dropout is not exported)")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write both simulators' "
                        "traces (crosscheck_traces.npz), the table (crosscheck.json) and an "
                        "overlay plot (crosscheck.png) into DIR")


def default_tolerance(circuit, protocol) -> tuple[float, str]:
    """``10 * u32 * (max tau/dt + max fan-in)`` and its explanation."""
    dt = protocol.dt
    steps = []
    for p in circuit.populations.values():
        if p.tau > 0:
            a = dt / p.tau if protocol.method == "euler" else -math.expm1(-dt / p.tau)
            steps.append(1.0 / a)
    n_tau = max(steps, default=1.0)
    fan = max((sum(circuit.shape_of(q)[1] for q in circuit.incoming(n))
               for n in circuit.populations), default=0)
    tol = 10.0 * U32 * (n_tau + fan)
    return tol, (f"10 x u32 ({U32:.1e}) x (tau/dt {n_tau:.0f} + fan-in {fan}): float32 rounding "
                 "accumulated over a time constant and over the widest drive sum")


def _variables(settings, circuit, protocol):
    """(population, variable, phase) triples to compare, and notes on skipped monitors."""
    phases = [p.name for p in protocol.phases]
    out, notes = [], []
    for m in settings["monitor"]:
        target = m["target"]
        obj, _, var = target.rpartition(".")
        if obj not in circuit.populations or var not in ("r", "drive"):
            notes.append(f"monitor {target!r} skipped (only population r/drive are compared)")
            continue
        if var == "drive" and isinstance(circuit.populations[obj], ErrorPopulation):
            notes.append(f"monitor {target!r} skipped (an error population has no drive)")
            continue
        for ph in ([m["phase"]] if m.get("phase") else phases):
            if (obj, var, ph) not in out:
                out.append((obj, var, ph))
    if not out:
        out = [(n, "r", ph) for n in circuit.populations for ph in phases]
    return out, notes


def _inputs(settings, plan, trials, data_dir, seed):
    from ..rng import component_rng

    stim = plan.stimuli
    n_x = plan.view("stim.x").shape[1] if "x" in stim else 1
    n_t = plan.view("stim.t").shape[1] if "t" in stim else 1
    if data_dir is not None:
        from ..simulator import shuffled_order
        from ..training import load_data

        ds, _, _ = load_data(settings, data_dir)
        if ds.x_train.shape[1] != n_x:
            raise ValidationError("--data", f"the dataset has {ds.x_train.shape[1]} features, the "
                                  f"circuit's input takes {n_x}.")
        order = shuffled_order(seed, 0, ds.x_train.shape[0])[:trials]
        return (np.ascontiguousarray(ds.x_train[order], np.float32),
                np.asarray(ds.y_train[order], np.int64), n_t)
    rng = component_rng(seed, "crosscheck:inputs")
    X = rng.random((trials, n_x), dtype=np.float32)
    Y = rng.integers(0, n_t, size=trials).astype(np.int64)
    return X, Y, n_t


def crosscheck(settings: dict, *, trials: int = 3, tolerance: float | None = None,
               target: str = "numpy", data_dir=None, plasticity: bool = False,
               softmax_as: str | None = None, no_dropout: bool = False, out=None,
               log=print) -> dict:
    """Run the comparison; returns a dict with ``rows`` (per variable), ``tolerance``,
    ``max_rel`` and ``passed`` (and ``files`` written into ``out``, if given). ``softmax_as`` /
    ``no_dropout`` modify the circuit in both simulators (see
    :func:`~neurosim.interop.brian2_export.exportable_copy`)."""
    from .. import scenario as sc
    from ..compiler import compile_plan
    from ..monitors import Monitor
    from ..plasticity.optim import SGD
    from ..simulator import Simulator
    from .brian2_export import export_brian2, exportable_copy

    if settings["simulation"]["mode"] != "time":
        raise ValidationError("simulation.mode", f"got {settings['simulation']['mode']!r}; the "
                              "cross-check compares time courses and needs mode = \"time\".",
                              "add --set simulation.mode=time.")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValidationError("--trials", f"got {trials!r}, expected an integer >= 1.")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValidationError("--out", f"{str(out)!r} exists and is not a folder.",
                              "give a folder (it is created if missing).")
    circuit, protocol, rules, output = sc.build(settings)
    changed = []
    if softmax_as or no_dropout:
        soft = {n: softmax_as for n, p in circuit.populations.items()
                if softmax_as and getattr(p, "transfer", None) == "softmax"}
        circuit = exportable_copy(circuit, transfers=soft, dropout=0.0 if no_dropout else None)
        changed = [f"{n}: softmax -> {t}" for n, t in soft.items()]
        changed += ["dropout -> 0"] if no_dropout else []
    variables, notes = _variables(settings, circuit, protocol)
    mons = [Monitor(f"{pop}.{var}", phase=ph, every=1, per="step", sample=0,
                    name=f"{pop}.{var}@{ph}") for pop, var, ph in variables]
    tr = settings["training"]
    seed = tr["seed"]
    opt = None
    if plasticity and rules:
        opt = SGD(lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
                  style=tr["optimizer"], milestones=tuple(tr["milestones"]), gamma=tr["gamma"],
                  max_weight=tr["max_weight"])
    else:
        rules = []
    plan = compile_plan(circuit, protocol, rules=rules, optimizer=opt, monitors=mons, batch=1,
                        seed=seed, output=output)
    sim = Simulator(plan, threads=1)
    X, Y, n_t = _inputs(settings, plan, trials, data_dir, seed)
    if tolerance is None:
        tolerance, why = default_tolerance(circuit, protocol)
    else:
        why = "given with --tolerance"

    pops = sorted({pop for pop, _, _ in variables})
    t0 = time.perf_counter()
    b2n = export_brian2(sim, target=target, record=pops, prefix="xc")
    t_export = time.perf_counter() - t0
    t_b2 = t_ns = 0.0
    eye = np.eye(n_t)
    for k in range(trials):
        stimuli = {name: None for name in plan.stimuli}
        if "x" in stimuli:
            stimuli["x"] = X[k]
        if "t" in stimuli:
            stimuli["t"] = eye[Y[k]] if plan.targets == "onehot" else None
        if plasticity and rules:
            b2n.set_all_weights(sim.weights)
        t0 = time.perf_counter()
        b2n.run_trial(stimuli)
        t_b2 += time.perf_counter() - t0
        t0 = time.perf_counter()
        sim.train(X[k:k + 1], Y[k:k + 1])
        t_ns += time.perf_counter() - t0

    traces = sim.traces
    steps = ", ".join(f"{p.name} {protocol.n_steps(p)}" for p in protocol.phases)
    log(f"crosscheck {settings['name']!r}: circuit {circuit.name!r}, {trials} trial(s) of phases "
        f"[{steps}] steps at dt = {protocol.dt * 1e3:g} ms ({protocol.method}); Brian2 "
        f"{b2n._b2.__version__} ({target}, float64) vs neurosim (float32)"
        + ("; plasticity on, weights copied before each trial" if plasticity and rules else ""))
    if changed:
        log(f"  circuit modified in both simulators: {', '.join(changed)}")
    for n in notes:
        log(f"  note: {n}")
    log(f"  {'variable':<28} {'max |dev|':>10} {'range':>10} {'dev/range':>10}")
    rows, worst, pairs = [], 0.0, {}
    for pop, var, ph in variables:
        key = f"{pop}.{var}@{ph}"
        a = np.asarray(traces[key].values, np.float64)
        b = b2n.trace(pop, var, ph)
        pairs[key] = (np.asarray(traces[key].t, np.float64), a, b)
        if a.shape != b.shape:
            raise RuntimeError(f"internal: {pop}.{var}@{ph} has {a.shape} rows in neurosim and "
                               f"{b.shape} in Brian2")
        ok = ~np.isnan(b)
        dev = float(np.max(np.abs(a[ok] - b[ok]))) if ok.any() else 0.0
        rng = float(np.max(b[ok]) - np.min(b[ok])) if ok.any() else 0.0
        scale = rng if rng > 0 else max(float(np.max(np.abs(b[ok]))) if ok.any() else 0.0, 1.0)
        rel = dev / scale
        worst = max(worst, rel)
        flag = "ok" if rel <= tolerance else "FAIL"
        lag = "" if ok.all() else " (last step of each phase not comparable)"
        log(f"  {pop + '.' + var + '@' + ph:<28} {dev:>10.2e} {rng:>10.3g} {rel:>10.2e}  {flag}{lag}")
        rows.append(dict(variable=f"{pop}.{var}@{ph}", max_dev=dev, range=rng, rel=rel,
                         ok=rel <= tolerance))
    passed = worst <= tolerance
    log(f"  tolerance {tolerance:.2e} ({why})")
    log(f"  time: Brian2 {t_b2:.2f} s (+ {t_export:.2f} s to build), neurosim {t_ns:.3f} s")
    log(f"{'PASS' if passed else 'FAIL'}: max deviation/range {worst:.2e} "
        f"{'<=' if passed else '>'} tolerance {tolerance:.2e}")
    res = dict(rows=rows, tolerance=tolerance, max_rel=worst, passed=passed)
    if out is not None:
        title = (f"crosscheck {settings['name']!r}: neurosim (float32) vs Brian2 "
                 f"{b2n._b2.__version__} ({target}, float64), {trials} trial(s), "
                 f"dt = {protocol.dt * 1e3:g} ms")
        res["files"] = write_outputs(Path(out), pairs, rows, res, title, why)
        for f in res["files"]:
            log(f"  wrote {f}")
    return res


def write_outputs(out: Path, pairs: dict, rows: list, res: dict, title: str, why: str) -> list:
    """``crosscheck_traces.npz`` (per variable ``<key>/t`` in s, ``<key>/neurosim`` and
    ``<key>/brian2``, shape (steps, units)), ``crosscheck.json`` and ``crosscheck.png``."""
    out.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for key, (t, a, b) in pairs.items():
        arrays[f"{key}/t"], arrays[f"{key}/neurosim"], arrays[f"{key}/brian2"] = t, a, b
    tmp = out / "crosscheck_traces.tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out / "crosscheck_traces.npz")
    table = dict(title=title, tolerance=res["tolerance"], tolerance_reason=why,
                 max_rel=res["max_rel"], passed=res["passed"], rows=rows)
    (out / "crosscheck.json.tmp").write_text(json.dumps(table, indent=2))
    os.replace(out / "crosscheck.json.tmp", out / "crosscheck.json")
    return [out / "crosscheck_traces.npz", out / "crosscheck.json",
            plot_overlay(out / "crosscheck.png", pairs, rows, title)]


def plot_overlay(path: Path, pairs: dict, rows: list, title: str, max_units: int = 4) -> Path:
    """One panel per variable: the first ``max_units`` units of neurosim (lines) and Brian2
    (markers) against simulated time, with the deviation in the panel title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rel = {r["variable"]: r for r in rows}
    n = len(pairs)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, 3.4 * nrows), squeeze=False)
    for ax, (key, (t, a, b)) in zip(axes.flat, pairs.items()):
        # a phase is recorded only while it runs: break the lines between its runs
        gap = np.flatnonzero(np.diff(t) > 1.5 * np.min(np.diff(t))) + 1 if len(t) > 1 else []
        ms, a, b = (np.insert(np.asarray(v, np.float64), gap, np.nan, axis=0)
                    for v in (1e3 * t, a, b))
        every = max(1, len(t) // 40)
        for u in range(min(a.shape[1] if a.ndim == 2 else 1, max_units)):
            ya = a[:, u] if a.ndim == 2 else a
            yb = b[:, u] if b.ndim == 2 else b
            ax.plot(ms, ya, "-", lw=1.2, color=f"C{u}")
            ax.plot(ms, yb, "o", ms=3.5, mfc="none", color=f"C{u}", markevery=every)
        r = rel.get(key, {})
        ax.set_title(f"{key}: max |dev| {r.get('max_dev', math.nan):.1e} "
                     f"({r.get('rel', math.nan):.1e} of range)", fontsize=8)
        ax.set_xlabel("simulated time (ms)")
        ax.set_ylabel(("rate r" if key.split("@")[0].endswith(".r") else "drive")
                      + " (model units)")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color="k", lw=1.2, label="neurosim (float32)"),
               Line2D([], [], color="k", marker="o", mfc="none", ls="none",
                      label="Brian2 (float64)")]
    handles += [Line2D([], [], color=f"C{u}", lw=3, label=f"unit {u}")
                for u in range(min(max(a.shape[1] if a.ndim == 2 else 1
                                       for _, a, _ in pairs.values()), max_units))]
    axes.flat[0].legend(handles=handles, fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def main(args) -> int:
    from .. import scenario as sc

    settings = sc.load(args.scenario, args.overrides)
    if args.tolerance is not None and not (args.tolerance > 0 and math.isfinite(args.tolerance)):
        raise ValidationError("--tolerance", f"got {args.tolerance}, expected a number > 0.")
    res = crosscheck(settings, trials=args.trials, tolerance=args.tolerance, target=args.target,
                     data_dir=args.data, plasticity=args.plasticity,
                     softmax_as=args.softmax_as, no_dropout=args.no_dropout,
                     out=getattr(args, "out", None))
    sys.stdout.flush()
    return 0 if res["passed"] else 1
