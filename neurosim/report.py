"""``neurosim report DIR``: plots and a markdown summary of a run or a sweep folder.

For a run directory (``neurosim run``) it writes, beside the results:

- ``report-learning-curves.png``: test accuracy, the running training accuracy (counted while
  the epoch trains, with dropout) and, when measured, the training accuracy evaluated after the
  epoch, per epoch (and the learning rate when it changes);
- ``report-alignment-angles.png``: every ``angle:*`` and ``grad_angle:*`` monitor (degrees)
  against epochs;
- ``report-goodness.png``: the goodness of every recorded population rate (sum of squared
  rates, as in Forward-Forward) and any monitor named ``*goodness*``, one panel per population
  with one curve per phase;
- ``report-traces.png``: every monitored trace (scalars as lines, population rates as a few
  unit lines and their mean);
- ``report.md``: summary, epoch table, monitors, the convergence fit (or why there is none),
  and the plots.

Every plot is readable for runs of any length: series with few points get markers, a single
epoch gets an axis around it, axes carry units and every curve is named in a legend.

For a sweep folder (``neurosim sweep``) the same kinds of plots aggregate the runs per grid
point (mean and +- one standard deviation over seeds), plus ``report-final-metrics.png``, and
``report.md`` holds the per-point table. A plot whose data the run does not have (e.g. no
angle monitor) is skipped and the markdown says so.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from .errors import ValidationError
from .rundir import atomic_write_bytes, atomic_write_file, remove_dead_tmp, safe_name

HELP = "plot a run or a sweep (learning curves, angles, goodness, traces) and summarise it"


def add_arguments(p) -> None:
    p.add_argument("dir", help="a run directory (neurosim run) or a sweep folder (neurosim sweep)")
    p.add_argument("--runs", action="store_true",
                   help="for a sweep: also write a report inside every run directory")


def main(args) -> int:
    d = Path(args.dir)
    written = report(d, runs=getattr(args, "runs", False))
    for p in written:
        print(p)
    return 0


def report(d, runs: bool = False) -> list[Path]:
    """Write the report of run directory or sweep folder ``d``; returns the files written."""
    d = Path(d)
    if not d.is_dir():
        raise ValidationError("report", f"{str(d)!r} is not a folder.",
                              "give a run directory or a sweep folder.")
    if (d / "sweep.json").is_file() or (d / "sweep.csv").is_file():
        return report_sweep(d, runs=runs)
    if any((d / n).is_file() for n in ("metrics.csv", "summary.json", "error.json")):
        return report_run(d)
    raise ValidationError("report", f"{str(d)!r} holds neither a run (metrics.csv, summary.json) "
                          "nor a sweep (sweep.csv).",
                          "run it first: neurosim run SCENARIO --out DIR, or neurosim sweep.")


# -- reading --------------------------------------------------------------------------------------
def _read_json(path: Path):
    """The JSON object (dict) in ``path``; None if there is no such file."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValidationError(str(path), f"cannot read it ({type(e).__name__}: {e}); it is corrupt "
                              "or truncated.") from None
    if not isinstance(obj, dict):
        raise ValidationError(str(path), f"holds a JSON {type(obj).__name__}, expected an object "
                              "({...}); it is not the file neurosim wrote.",
                              "restore or delete it.")
    return obj


def _num(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def read_metrics(run_dir: Path) -> dict:
    """metrics.csv as columns of floats (empty if absent)."""
    path = Path(run_dir) / "metrics.csv"
    cols: dict = {}
    if not path.is_file():
        return cols
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                for k, v in row.items():
                    if k is not None:
                        cols.setdefault(k, []).append(_num(v))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ValidationError(str(path), f"cannot read it ({e}).") from None
    return {k: np.asarray(v, float) for k, v in cols.items()}


def read_traces(run_dir: Path) -> dict:
    """traces.npz as ``{key: {"values", "t", "trial", "step"}}``."""
    path = Path(run_dir) / "traces.npz"
    out: dict = {}
    if not path.is_file():
        return out
    try:
        with np.load(path, allow_pickle=False) as z:
            for name in z.files:
                key, _, fieldname = name.rpartition("/")
                out.setdefault(key, {})[fieldname] = z[name]
    except Exception as e:
        raise ValidationError(str(path), f"cannot read it ({type(e).__name__}: {e}); it is "
                              "corrupt or truncated.") from None
    return {k: v for k, v in out.items() if "values" in v}


def _trials_per_epoch(run_dir: Path, summary: dict | None):
    from . import scenario as sc

    try:
        settings = sc.load(Path(run_dir) / "scenario.toml")
        n = (summary or {}).get("n_train")
        if n:
            return math.ceil(n / settings["training"]["batch_size"])
    except Exception:  # the report works without it (x axis in trials)
        pass
    return None


def run_series(run_dir: Path) -> dict:
    """Everything the plots need from one run directory."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    metrics = read_metrics(run_dir)
    traces = read_traces(run_dir)
    tpe = _trials_per_epoch(run_dir, summary)
    series = {"summary": summary or {}, "metrics": metrics, "angles": {}, "goodness": {},
              "traces": {}}
    for key, tr in traces.items():
        values = np.asarray(tr["values"], float)
        t = np.asarray(tr.get("t", np.arange(len(values))), float)
        trial = np.asarray(tr.get("trial", t), float)
        is_step = values.ndim == 2 and "step" in tr and len(t) and not np.allclose(t, trial)
        if is_step:
            x, xlabel = t, "simulated time (s)"
        elif tpe:
            x, xlabel = (trial + 1) / tpe, "epoch"
        else:
            x, xlabel = trial, "trial"
        entry = (x, values, xlabel)
        series["traces"][key] = entry
        if key.startswith(("angle:", "grad_angle:", "pepita_afa_angle:")):
            series["angles"][key] = entry
        if "goodness" in key.lower():
            series["goodness"][key] = (x, values if values.ndim == 1 else values.sum(1), xlabel)
        elif values.ndim == 2 and key.split("@")[0].endswith(".r"):
            series["goodness"][f"goodness of {key}"] = (x, (values ** 2).sum(1), xlabel)
    return series


def describe(key: str) -> tuple[str, str]:
    """(what a trace is, its y-axis label with unit) from its key."""
    base, _, phase = key.partition("@")
    during = f" in phase {phase}" if phase else ""
    if key.startswith("goodness of "):
        pop = key[len("goodness of "):].partition("@")[0].rsplit(".", 1)[0]
        return f"goodness of {pop}{during}", "goodness (sum of r² over recorded units)"
    if "goodness" in base.lower():
        return f"goodness of {base.rsplit('.', 1)[0]}{during}", "goodness (sum of r²)"
    if base.startswith("angle:"):
        return (f"∠({base[6:]}, transposed forward chain)", "angle (degrees)")
    if base.startswith("grad_angle:"):
        return f"∠(rule's update of {base[11:]}, BP gradient)", "angle (degrees)"
    if base.startswith("pepita_afa_angle:"):
        return f"∠(PEPITA's update of {base[17:]}, AFA's)", "angle (degrees)"
    if base.endswith(".update_norm"):
        return f"‖Δ{base[:-12]}‖ (Frobenius norm of the update)", "norm (weight units)"
    if base.endswith(".norm"):
        return f"‖{base[:-5]}‖ (Frobenius norm)", "norm (weight units)"
    if base.endswith(".r"):
        return f"rate of {base[:-2]}{during}", "rate r (model units)"
    if base.endswith(".drive"):
        return f"drive of {base[:-6]}{during}", "drive (model units)"
    return key, "value"


def _goodness_panel(key: str) -> tuple[str, str]:
    """(panel = population, curve = phase) of a goodness series key."""
    base, _, phase = key.removeprefix("goodness of ").partition("@")
    return base.rsplit(".", 1)[0], phase or base


def _style(n: int) -> dict:
    """Markers where points are few (every point visible, even a single one)."""
    if n <= 40:
        return dict(marker="o", ms=4)
    if n <= 200:
        return dict(marker="o", ms=2)
    return {}


def _single_x(ax, x) -> None:
    """An axis around a series with one distinct x (one epoch, one record)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if len(x) and np.ptp(x) == 0:
        half = 0.5 if abs(x[0]) >= 0.5 else max(abs(x[0]), 0.05)
        ax.set_xlim(x[0] - half, x[0] + half)


# -- plotting -------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _plt()
    try:
        fig.tight_layout()
        # no lock is held while reporting: a temporary name of this call's own
        atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110),
                          unique=True)
    finally:
        plt.close(fig)
    return path


def _grid(n):
    cols = min(n, 3)
    return (n + cols - 1) // cols, cols


_LEARNING_LINES = (("test", "-", "o", "test"),
                   ("running", "--", "s", "train, running (during the epoch, with dropout)"),
                   ("eval", "-.", "^", "train, evaluated after the epoch"))


def plot_learning(path: Path, curves: list, title: str) -> Path:
    """curves: (label, epochs, test, test_std, train, train_std, lr[, train_eval,
    train_eval_std]); ``train`` is the running training accuracy (with dropout), ``train_eval``
    the optional evaluation on the training set. Every series with data gets its own legend
    entry; markers show every point of short runs."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lrs, all_ep = [], []
    for k, curve in enumerate(curves):
        label, ep, test, test_sd, train, train_sd, lr = curve[:7]
        ev, ev_sd = (curve[7], curve[8]) if len(curve) > 7 else (None, None)
        for j, ((kind, ls, marker, what), y, sd) in enumerate(zip(
                _LEARNING_LINES, (test, train, ev), (test_sd, train_sd, ev_sd))):
            # one run: a colour per kind of accuracy; several: a colour per run
            color = f"C{j}" if len(curves) == 1 else f"C{k % 10}"
            if y is None:
                continue
            ok = np.isfinite(y)
            if not ok.any():
                continue
            n = int(ok.sum())
            ax.plot(ep[ok], 100 * y[ok], ls=ls, marker=marker, ms=5 if n <= 40 else 2,
                    color=color, alpha=1.0 if kind == "test" else 0.75,
                    label=f"{label}: {what}" if label else what)
            if sd is not None and n == 1:      # a band around one point is invisible
                ax.errorbar(ep[ok], 100 * y[ok], yerr=100 * sd[ok], color=color, capsize=4,
                            ls="none")
            elif sd is not None:
                ax.fill_between(ep[ok], 100 * (y - sd)[ok], 100 * (y + sd)[ok], color=color,
                                alpha=0.15)
            if n == 1 and len(curves) == 1:
                ax.annotate(f"{100 * y[ok][0]:.1f} %", (ep[ok][0], 100 * y[ok][0]),
                            textcoords="offset points", xytext=(8, -3), fontsize=8)
            all_ep.extend(ep[ok])
        if lr is not None and np.isfinite(lr).all() and len(np.unique(lr)) > 1:
            lrs.append((ep, lr, "C7" if len(curves) == 1 else f"C{k % 10}"))
    _single_x(ax, all_ep)
    if len(set(all_ep)) <= 10 and all_ep:
        ax.set_xticks(sorted(set(all_ep)))
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        for ep, lr, color in lrs:
            ax2.step(ep, lr, where="mid", color=color, alpha=0.4, lw=1)
        ax2.set_yscale("log")
        ax2.set_ylabel("learning rate")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_scalar_series(path: Path, groups: dict, title: str, ylabel) -> Path:
    """groups: {panel title: [(label, x, y, y_std, xlabel)]}, one panel per entry; ``ylabel``
    is a string or a function of the panel title. Every curve is in the panel's legend (an
    unlabelled curve under the panel's title)."""
    plt = _plt()
    rows, cols = _grid(len(groups))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, groups.items()):
        xs = []
        for k, (label, x, y, sd, xlabel) in enumerate(lines):
            color = f"C{k % 10}"
            ax.plot(x, y, "-", lw=1.2, color=color, label=label or panel, **_style(len(y)))
            if sd is not None and len(y) == 1:
                ax.errorbar(x, y, yerr=sd, color=color, capsize=4, ls="none")
            elif sd is not None:
                ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.2)
            ax.set_xlabel(xlabel)
            xs.extend(np.asarray(x, float))
        _single_x(ax, xs)
        ax.set_title(panel, fontsize=9)
        ax.set_ylabel(ylabel(panel) if callable(ylabel) else ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_traces(path: Path, traces: dict, title: str) -> Path:
    """One panel per trace: a scalar as one curve, a population variable as up to 8 unit
    curves and their mean; markers where points are few, units on both axes."""
    plt = _plt()
    rows, cols = _grid(len(traces))
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    for ax, (key, (x, values, xlabel)) in zip(axes.flat, traces.items()):
        what, ylabel = describe(key)
        style = _style(len(values))
        if values.ndim == 2 and values.shape[1] == 1:   # one unit or one statistic per record
            values = values[:, 0]
        if values.ndim == 1:
            ax.plot(x, values, "-", lw=1.2, label=what, **style)
        else:
            shown = min(values.shape[1], 8)
            for u in range(shown):
                ax.plot(x, values[:, u], "-", lw=0.8, alpha=0.6, color=f"C{u}",
                        label=(f"units 0-{shown - 1} (one curve each)" if shown > 1 else
                               "unit 0") if u == 0 else None,
                        **{**style, "ms": style.get("ms", 0) * 0.6})
            if values.shape[1] > 1:
                ax.plot(x, values.mean(1), "k-", lw=1.6,
                        label=f"mean over the {values.shape[1]} recorded units", **style)
        if len(values):
            _single_x(ax, x)
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(traces):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_final(path: Path, labels: list, metrics: dict, title: str) -> Path:
    """metrics: {name: (means, stds)} over the grid points ``labels``."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.5, 0.9 * len(labels) + 2) *
                                                      len(metrics), 3.8), squeeze=False)
    x = np.arange(len(labels))
    for ax, (name, (m, s)) in zip(axes.flat, metrics.items()):
        scale = 100 if name.endswith("accuracy") else 1
        ax.errorbar(x, scale * np.asarray(m, float), yerr=scale * np.nan_to_num(s), fmt="o",
                    capsize=4)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(name + (" (%)" if scale == 100 else ""), fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# -- a run ----------------------------------------------------------------------------------------
def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if isinstance(v, float):
        return f"{100 * v:.2f} %" if pct else f"{v:.4g}"
    return str(v)


def report_run(d: Path) -> list[Path]:
    remove_dead_tmp(d)          # left by a report that was killed while writing
    s = run_series(d)
    summary, m = s["summary"], s["metrics"]
    name = summary.get("scenario", d.name)
    written, notes = [], []
    md = [f"# Report: {name}", "", f"Run directory `{d}`.", ""]
    if summary:
        md += ["| | |", "|---|---|"]
        for key in ("model", "dataset", "mode", "epochs_done", "epochs", "seed", "n_train",
                    "final_test_accuracy", "best_test_accuracy", "final_train_accuracy_running",
                    "final_train_accuracy_eval", "final_train_accuracy", "wall_s",
                    "mean_samples_per_s", "complete"):
            if key in summary:
                md.append(f"| {key} | {_fmt(summary[key], 'accuracy' in key)} |")
        md.append("")
    err = _read_json(d / "error.json")
    if err:
        md += [f"**The run stopped with an error** ({err.get('error')}): {err.get('message')}", ""]
    if "epoch" in m and len(m["epoch"]):
        nan = np.full(len(m["epoch"]), np.nan)
        cols = {k: m.get(k, nan) for k in ("test_accuracy", "lr", "samples_per_s")}
        cols["running"], cols["eval"] = _train_columns(m)
        written.append(plot_learning(d / "report-learning-curves.png", [(
            "", m["epoch"], cols["test_accuracy"], None, cols["running"], None, m.get("lr"),
            cols["eval"], None)], f"{name}: learning curves"))
        md += ["## Epochs", "",
               "Train running: counted while the epoch trains (dropout on, weights changing); "
               "train eval: evaluated after the epoch like the test set "
               "(`training.train_eval` samples; — when off).", "",
               "| epoch | test accuracy | train running | train eval | lr | samples/s |",
               "|---|---|---|---|---|---|"]
        rows = list(range(len(m["epoch"])))
        if len(rows) > 30:
            rows = rows[:10] + [None] + rows[-10:]
        for i in rows:
            if i is None:
                md.append("| … | | | | | |")
                continue
            ep = int(m["epoch"][i]) if math.isfinite(m["epoch"][i]) else "—"
            md.append(f"| {ep} | {_fmt(cols['test_accuracy'][i], True)} | "
                      f"{_fmt(cols['running'][i], True)} | {_fmt(cols['eval'][i], True)} | "
                      f"{_fmt(cols['lr'][i])} | {_fmt(cols['samples_per_s'][i])} |")
        md.append("")
    else:
        notes.append("no epochs recorded (metrics.csv missing or empty): no learning curves.")
    written += _monitor_plots(d, {"": s}, name, notes)
    if s["traces"]:
        md += ["## Monitors", "", "| trace | records | first | last |", "|---|---|---|---|"]
        for key, (x, v, _) in s["traces"].items():
            v = v[:, 0] if v.ndim == 2 and v.shape[1] == 1 else v
            first = v[0] if v.ndim == 1 else v[0].mean()
            last = v[-1] if v.ndim == 1 else v[-1].mean()
            suffix = "" if v.ndim == 1 else " (mean over units)"
            md.append(f"| `{key}` | {len(v)} | {_fmt(float(first)) if len(v) else '—'}{suffix} | "
                      f"{_fmt(float(last)) if len(v) else '—'} |")
        md.append("")
    slow = summary.get("slowness")
    if isinstance(slow, dict) and slow:
        md += ["## Convergence fit", "", "acc(t) = acc_max t / (s + t) on the test accuracy up to "
               "the first learning-rate decay, chance prepended at epoch 0 (Srinivasan et al. "
               "2024):", "", "```", json.dumps(slow, indent=2), "```", ""]
    elif summary:
        from .analysis import SLOWNESS_MIN_POINTS

        note = summary.get("slowness_note") or (
            f"fewer than {SLOWNESS_MIN_POINTS} test accuracies up to the first learning-rate "
            "decay, or the fit did not converge")
        md += ["## Convergence fit", "", f"No fit of acc(t) = acc_max t / (s + t): {note}.", ""]
    md += _plots_md(d, written, notes)
    written.append(_write_md(d / "report.md", md))
    return written


def _train_columns(m: dict):
    """(running, eval) training accuracies of a metrics table; run directories of neurosim
    0.1 have the running one as ``train_accuracy``."""
    nan = np.full(len(m.get("epoch", ())), np.nan)
    return m.get("train_accuracy_running", m.get("train_accuracy", nan)), \
        m.get("train_accuracy_eval", nan)


def _monitor_plots(d: Path, series: dict, name: str, notes: list) -> list[Path]:
    """Angle, goodness and trace plots; ``series`` maps a label (grid point, or "") to the
    run_series of one run or to a list of them (averaged)."""
    written = []
    for kind, fname, ylabel, title in (
            ("angles", "report-alignment-angles.png", "angle (degrees)", "alignment angles"),
            ("goodness", "report-goodness.png", "goodness (sum of r²)", "goodness")):
        groups: dict = {}
        for label, runs in series.items():
            runs = runs if isinstance(runs, list) else [runs]
            keys = sorted({k for r in runs for k in r[kind]})
            for key in keys:
                line = _mean_line([r[kind][key] for r in runs if key in r[kind]])
                if line is None:
                    continue
                if kind == "goodness":   # one panel per population, one curve per phase
                    panel, curve = _goodness_panel(key)
                    panel = f"goodness of {panel}"
                else:
                    panel, curve = key, describe(key)[0]
                groups.setdefault(panel, []).append(
                    (f"{label}: {curve}" if label else curve, *line))
        if groups:
            written.append(plot_scalar_series(d / fname, groups, f"{name}: {title}", ylabel))
        else:
            notes.append(f"no {title} to plot (no {'angle:* monitor' if kind == 'angles' else 'population-rate or *goodness* monitor'}).")
    single = [v for v in series.values() if not isinstance(v, list)]
    if single and single[0]["traces"]:
        written.append(plot_traces(d / "report-traces.png", single[0]["traces"],
                                   f"{name}: monitored traces"))
    elif not single:
        groups = {}
        for label, runs in series.items():
            keys = sorted({k for r in runs for k, (_, v, _) in r["traces"].items() if v.ndim == 1})
            for key in keys:
                line = _mean_line([r["traces"][key] for r in runs if key in r["traces"]])
                if line is not None:
                    groups.setdefault(key, []).append((label, *line))
        if groups:
            written.append(plot_scalar_series(d / "report-traces.png", groups,
                                              f"{name}: monitored traces (mean over seeds)",
                                              lambda key: describe(key)[1]))
        else:
            notes.append("no scalar monitored traces to plot.")
    else:
        notes.append("no monitored traces (no [[monitor]] in the scenario).")
    return written


def _mean_line(entries):
    """Mean and std over runs of (x, y, xlabel) scalar series (cut to the shortest)."""
    entries = [(x, y if y.ndim == 1 else y.mean(1), xl) for x, y, xl in entries if len(y)]
    if not entries:
        return None
    n = min(len(y) for _, y, _ in entries)
    ys = np.stack([y[:n] for _, y, _ in entries])
    sd = ys.std(0, ddof=1) if len(ys) > 1 else None
    return entries[0][0][:n], ys.mean(0), sd, entries[0][2]


def _plots_md(d: Path, written, notes) -> list:
    md = ["## Plots", ""]
    for p in written:
        md += [f"![{p.stem}]({p.name})", ""]
    for n in notes:
        md.append(f"- {n}")
    if notes:
        md.append("")
    return md


def _write_md(path: Path, lines) -> Path:
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode(), unique=True)
    return path


# -- a sweep --------------------------------------------------------------------------------------
def report_sweep(d: Path, runs: bool = False) -> list[Path]:
    from .runpool import mean_std as _mean_std

    remove_dead_tmp(d)
    spec = _read_json(d / "sweep.json") or {}
    grid = spec.get("grid") or {}
    try:
        with open(d / "sweep.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        rows = [{"run": n, "status": "?"} for n in spec.get("runs", [])]
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise ValidationError(str(d / "sweep.csv"), f"cannot read it ({e}).") from None
    name = spec.get("scenario_name", d.name)
    written, notes = [], []
    # a run is read (and with --runs written) only under runs/<one safe name component>
    unsafe = [r for r in rows if not (isinstance(r.get("run"), str) and r["run"] and
                                      safe_name(r["run"], "") == r["run"])]
    if unsafe:
        notes.append(f"{len(unsafe)} row(s) of sweep.csv name no run folder (empty or unsafe "
                     "run names); skipped.")
        rows = [r for r in rows if not any(r is u for u in unsafe)]
    if not isinstance(grid, dict):
        raise ValidationError(str(d / "sweep.json"), f"'grid' is a {type(grid).__name__}, "
                              "expected an object; it is not the file neurosim wrote.")
    points: dict = {}
    for r in rows:
        label = ", ".join(f"{k.split('.')[-1]}={r.get(k, '')}" for k in grid) or "base"
        points.setdefault(label, []).append(r)
    series: dict = {}
    curves = []
    finals = {m: ([], []) for m in ("final_test_accuracy", "final_train_accuracy_running",
                                    "wall_s")}
    table = []
    for label, rs in points.items():
        ok = [r for r in rs if r.get("status") == "ok" and (d / "runs" / r["run"]).is_dir()]
        ss = [run_series(d / "runs" / r["run"]) for r in ok]
        if runs:
            for r in ok:
                written += report_run(d / "runs" / r["run"])
        series[label] = ss
        eps = [s["metrics"] for s in ss if "epoch" in s["metrics"] and len(s["metrics"]["epoch"])]
        if eps:
            n = min(len(m["epoch"]) for m in eps)
            stack = lambda k: np.stack([m.get(k, np.full(n, np.nan))[:n] for m in eps])  # noqa: E731
            test = stack("test_accuracy")
            train = np.stack([_train_columns(m)[0][:n] for m in eps])
            ev = np.stack([_train_columns(m)[1][:n] for m in eps])
            curves.append((label, eps[0]["epoch"][:n], *_nan_mean_sd(test), *_nan_mean_sd(train),
                           eps[0].get("lr", None), *_nan_mean_sd(ev)))
        cells = [label, f"{len(ok)}/{len(rs)}"]
        for m in finals:
            mean, std, k = _mean_std(r.get(m) for r in ok)
            finals[m][0].append(math.nan if mean is None else mean)
            finals[m][1].append(0.0 if std is None else std)
            cells.append(_fmt_ms(mean, std, m))
        table.append(cells)
    if curves:
        written.append(plot_learning(d / "report-learning-curves.png", curves,
                                     f"sweep {name}: mean over seeds (band: ± 1 std)"))
    else:
        notes.append("no finished runs with metrics: no learning curves.")
    if any(np.isfinite(finals["final_test_accuracy"][0])):
        written.append(plot_final(d / "report-final-metrics.png", list(points),
                                  {k: v for k, v in finals.items()
                                   if any(np.isfinite(v[0]))}, f"sweep {name}: final metrics"))
    written += _monitor_plots(d, series, f"sweep {name}", notes)
    status = {}
    for r in rows:
        status[r.get("status", "?")] = status.get(r.get("status", "?"), 0) + 1
    md = [f"# Sweep report: {name}", "", f"Sweep folder `{d}`: {len(rows)} runs ("
          + ", ".join(f"{v} {k}" for k, v in sorted(status.items())) + ").", "",
          "Grid: " + (", ".join(f"`{k}` in {{{', '.join(map(str, v))}}}" for k, v in grid.items())
                      or "none") + f"; {spec.get('seeds', '?')} seed(s) per point.", "",
          "Mean ± std over the finished seeds of each point.", "",
          "| point | finished | final test accuracy | final train accuracy (running) | wall s |",
          "|---|---|---|---|---|"]
    md += ["| " + " | ".join(c) + " |" for c in table]
    md.append("")
    bad = [r for r in rows if r.get("status") in ("diverged", "failed")]
    if bad:
        md += ["## Runs that did not finish", ""]
        md += [f"- `{r['run']}` ({r['status']}): {(r.get('error') or '')[:300]}" for r in bad]
        md.append("")
    md += _plots_md(d, written, notes)
    written.append(_write_md(d / "report.md", md))
    return written


def _nan_mean_sd(a: np.ndarray):
    """Mean and std (None for one run) over runs, ignoring NaN, without warnings for columns
    that are all NaN (e.g. an evaluation that was off)."""
    ok = np.isfinite(a)
    n = ok.sum(0)
    with np.errstate(all="ignore"):
        mean = np.where(n > 0, np.nansum(np.where(ok, a, 0.0), 0) / np.maximum(n, 1), np.nan)
        if len(a) < 2:
            return mean, None
        dev = np.where(ok, a - mean, 0.0)
        sd = np.where(n > 1, np.sqrt((dev ** 2).sum(0) / np.maximum(n - 1, 1)), np.nan)
    return mean, sd


def _fmt_ms(mean, std, metric):
    if mean is None:
        return "—"
    scale, unit = (100, " %") if metric.endswith("accuracy") else (1, "")
    if std is None:
        return f"{scale * mean:.4g}{unit}"
    return f"{scale * mean:.4g} ± {scale * std:.2g}{unit}"
