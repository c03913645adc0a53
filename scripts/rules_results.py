"""Results of the PEPITA / feedback-alignment family for docs/results.md: diagnostics runs,
the table and the plots.

    python scripts/rules_results.py campaign --out DIR [--epochs 10 --milestones 6 9 ...] | sh
    python scripts/rules_results.py diag   --out DIR [--data DIR] [--pepita-run DIR]
    python scripts/rules_results.py report --campaign DIR --diag DIR --figures DIR
                                           [--pepita-run DIR]
    python scripts/rules_results.py table  --campaign DIR [--at 60] [--last10 grad_angle:W1]

``campaign`` prints the ``neurosim run`` command of every run of a campaign (one per line, run
directories ``DIR/<rule>_<dataset>-s<seed>``), for a shell or a job runner.

``diag`` computes (i) the angle between each rule's first-layer (and last-layer) update and the
exact BP gradient over the first ``--trials`` minibatches of MNIST training (the
:class:`neurosim.diagnostics.GradientAlignment` monitor, every ``--every`` minibatches), and
(ii) the PEPITA-AFA cosine of the first-layer update vs the F scale, per sample, at the initial
state and at a trained PEPITA state (the last checkpoint of ``--pepita-run``).

``report`` reads the campaign's run directories (``<rule>_<dataset>-s<seed>/``: metrics.csv,
summary.json, traces.npz), prints the markdown table (mean +- std over seeds of the final test
accuracy; slowness fits) and writes the plots.

``table`` prints, per rule and dataset of a campaign folder, the number of seeds, the final and
best test accuracy, the accuracy after chosen epochs (``--at``), the summary's slowness fit and
the last record (``--last``) or the mean of the last ten records (``--last10``) of chosen
monitors; mean +- sample std over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GA_RULES = {"bp": "bp_mnist", "fa": "fa_mnist", "dfa": "dfa_mnist", "afa": "afa_mnist",
            "pepita": "pepita_mnist", "pepita_wd": "pepita_wd_mnist",
            "pepita_norm": "pepita_norm_mnist", "pepita_wm": "pepita_wm_mnist",
            "pepita_tl": "pepita_tl_mnist"}
LABEL = {"bp": "BP", "fa": "FA", "dfa": "DFA", "afa": "AFA", "pepita": "PEPITA",
         "pepita_wd": "PEPITA + WD", "pepita_norm": "PEPITA + norm", "pepita_wm": "PEPITA + WM",
         "pepita_wmctl": "PEPITA (factorized F, no WM)", "pepita_tl": "PEPITA-TL",
         "pepita_hebbian": "PEPITA-Hebbian", "pepita_deep": "PEPITA, 3 hidden"}


def _simulator(scenario, monitors=(), overrides=(), tl_record=False):
    import dataclasses

    from neurosim import SGD, Simulator, compile_plan
    from neurosim import scenario as sc

    settings = sc.load(ROOT / "scenarios" / f"{scenario}.toml", list(overrides))
    circuit, protocol, rules, output = sc.build(settings)
    if tl_record:
        rules = [dataclasses.replace(r, record_update=True) for r in rules]
    tr = settings["training"]
    opt = SGD(lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
              style=tr["optimizer"], milestones=tuple(tr["milestones"]), gamma=tr["gamma"])
    plan = compile_plan(circuit, protocol, rules=rules, optimizer=opt, monitors=list(monitors),
                        batch=tr["batch_size"], seed=tr["seed"], output=output)
    return Simulator(plan), settings


def diag(args):
    from neurosim.datasets import load_dataset
    from neurosim.diagnostics import GradientAlignment, pepita_afa_cosine
    from neurosim.simulator import shuffled_order

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist", data_dir=args.data)
    n = args.trials * 64
    res, done = {}, {}
    if (out / "grad_alignment.npz").is_file():
        with np.load(out / "grad_alignment.npz") as z:
            done = {k: z[k] for k in z.files}
    for rule, scen in GA_RULES.items():
        if f"{rule}/W1/deg" in done:
            continue
        if rule == "pepita_tl":   # no end-of-trial update: the rule keeps its summed update
            mons = [GradientAlignment(k, every=args.every, update=f"pepita_tl.{k}.update")
                    for k in ("W1", "W2")]
            sim, settings = _simulator(scen, mons, tl_record=True)
        else:
            mons = [GradientAlignment(k, every=args.every) for k in ("W1", "W2")]
            sim, settings = _simulator(scen, mons)
        order = shuffled_order(settings["training"]["seed"], 0, ds.x_train.shape[0])[:n]
        sim.train(ds.x_train, ds.y_train, order)
        tr = sim.traces
        res[rule] = {k: (np.asarray(tr[f"grad_angle:{k}"].trial),
                         np.asarray(tr[f"grad_angle:{k}"].values)) for k in ("W1", "W2")}
        print(f"{rule:12s} W1 {np.mean(res[rule]['W1'][1][-10:]):6.1f} deg, "
              f"W2 {np.mean(res[rule]['W2'][1][-10:]):6.1f} deg (last 10 records)", flush=True)
    if res:
        done.update({f"{r}/{k}/{f}": v[i] for r, d in res.items() for k, v in d.items()
                     for i, f in enumerate(("trial", "deg"))})
        np.savez(out / "grad_alignment.npz", **done)
    if (out / "pepita_afa_cosine.npz").is_file() and not args.redo_cosine:
        return
    # PEPITA-AFA cosine vs F scale, per sample, at the initial and at a trained state
    scales = np.array([1e-3, 3e-3, 1e-2, 3e-2, 5e-2, 1e-1, 3e-1, 1.0])
    X, Y = ds.x_test[: args.samples], ds.y_test[: args.samples]
    states = {"initial": None}
    if args.pepita_run:
        # the trained weights: the run's last checkpoint arena, loaded into the same plan
        from neurosim import scenario as sc
        from neurosim.training import latest_checkpoint, make_simulator

        run = Path(args.pepita_run)
        sim = make_simulator(sc.load(run / "scenario.toml"))
        ck = latest_checkpoint(run)
        with np.load(ck) as z:
            sim.load_state_dict({"mem": z["mem"], "trial": int(z["trial"]), "step": int(z["step"])})
            ep = int(z["epoch"])
        states[f"trained PEPITA ({ep} epochs)"] = {k: sim.weights[k].copy() for k in ("W1", "W2")}
    from neurosim.diagnostics import pepita_afa_cosine_reference

    cos = {}
    for name, w in states.items():
        for batch in (1, 64):
            nX = len(X) if batch == 1 else 10 * 64
            Xb, Yb = ds.x_test[:nX], ds.y_test[:nX]
            key = f"{name}, {'per sample' if batch == 1 else 'per minibatch of 64'}"
            _, c = pepita_afa_cosine(Xb, Yb, scales, sizes=(784, 1024, 10), weights=w, seed=0,
                                     batch=batch)
            cos[key + ", engine float32"] = c
            if w is not None:
                from neurosim.models import build_pepita_network

                F1 = None
                ref = []
                for fs in scales:   # the same F as the engine's (seed 0), in float64
                    from neurosim import SGD, Simulator, compile_plan

                    net = build_pepita_network((784, 1024, 10), f_scale=float(fs), dropout=0.0)
                    p = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                                     optimizer=SGD(lr=0.1), batch=1, seed=0)
                    F1 = Simulator(p).weights["F"]
                    ref.append(pepita_afa_cosine_reference([w["W1"], w["W2"]], F1, Xb, Yb,
                                                           batch=batch))
                cos[key + ", float64 numpy"] = np.asarray(ref)
    for key, c in cos.items():
        print(key, " ".join(f"{s:g}:{m:.4f}" for s, m in zip(scales, np.nanmean(c, 1))),
              f"({int(np.isnan(c).sum())} undefined: zero PEPITA update)", flush=True)
    np.savez(out / "pepita_afa_cosine.npz", scales=scales,
             **{f"cos/{k}": v for k, v in cos.items()})


def slowness(args):
    """Sub-epoch learning curves (test accuracy every ``--eval-every`` minibatches) of PEPITA,
    PEPITA + WM and the WM control, and the slowness fit on them (in epochs)."""
    from neurosim.analysis import slowness_fit
    from neurosim.datasets import load_dataset
    from neurosim.simulator import shuffled_order

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist", data_dir=args.data)
    n = ds.x_train.shape[0]
    T = -(-n // 64)
    cfgs = {"pepita": ("pepita_mnist", []), "pepita_wm": ("pepita_wm_mnist", []),
            "pepita_wmctl": ("pepita_wm_mnist", ["model.mirroring=false"])}
    res = {}
    for seed in args.seeds:
        for name, (scen, over) in cfgs.items():
            key = f"{name}/s{seed}"
            f = out / f"slowness_{name}_s{seed}.npz"
            if f.is_file():
                z = np.load(f)
                res[key] = (z["epoch"], z["acc"])
                continue
            sim, settings = _simulator(scen, (), over + [f"training.seed={seed}"])
            opt = sim.plan.optimizer
            ep_list, acc = [0.0], [1.0 / ds.n_classes]
            for epoch in range(args.epochs):
                sim.set_lr(opt.lr_at(epoch))
                sim.set_epoch(epoch)        # epoch schedules (weight mirroring), as training.run
                order = shuffled_order(seed, epoch, n)
                for j in range(0, T, args.eval_every):
                    sub = order[j * 64:min((j + args.eval_every) * 64, n)]
                    sim.train(ds.x_train, ds.y_train, sub)
                    ep_list.append(epoch + min(j + args.eval_every, T) / T)
                    acc.append(sim.evaluate(ds.x_test, ds.y_test))
            res[key] = (np.array(ep_list), np.array(acc))
            np.savez(f, epoch=res[key][0], acc=res[key][1])
            fit = slowness_fit(res[key][0][1:], res[key][1][1:], n_classes=ds.n_classes)
            print(f"{key:16s} final {100 * acc[-1]:.2f}%  slowness s = {fit['s']:.4f} epochs, "
                  f"acc_max = {100 * fit['acc_max']:.2f}%", flush=True)


# ---------------------------------------------------------------------------------------------
def _runs(campaign):
    runs = {}
    for d in sorted(Path(campaign).iterdir()):
        if not (d / "summary.json").is_file():
            continue
        name, seed = d.name.rsplit("-s", 1)
        rule, dataset = name.rsplit("_", 1)
        s = json.loads((d / "summary.json").read_text())
        with open(d / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        runs.setdefault((rule, dataset), []).append(dict(seed=int(seed), summary=s, metrics=rows,
                                                        dir=d))
    return runs


ORDER = ["bp", "fa", "dfa", "afa", "pepita", "pepita_wd", "pepita_norm", "pepita_wmctl",
         "pepita_wm", "pepita_tl", "pepita_hebbian", "pepita_deep"]
DATASETS = {"mnist": "mnist", "fmnist": "fashion-mnist"}


def campaign(args):
    """Print one ``neurosim run`` command per (rule, dataset, seed); the WM control is the WM
    scenario with ``model.mirroring=false``."""
    import shlex

    sets = [f"training.epochs={args.epochs}"]
    if args.milestones is not None:
        sets.append(f"training.milestones=[{','.join(map(str, args.milestones))}]")
    for rule in args.rules:
        for ds in args.datasets:
            for seed in args.seeds:
                scen = f"scenarios/{'pepita_wm' if rule == 'pepita_wmctl' else rule}_{ds}.toml"
                cmd = ["neurosim", "run", scen, "--no-progress"]
                data = args.data_mnist if ds == "mnist" else args.data_fmnist
                cmd += ["--data", data] if data else []
                for item in [*sets, f"training.seed={seed}"] + (
                        ["model.mirroring=false"] if rule == "pepita_wmctl" else []):
                    cmd += ["--set", item]
                cmd += ["--out", f"{args.out}/{rule}_{ds}-s{seed}"]
                print(" ".join(shlex.quote(c) for c in cmd))
    return 0


def _ms(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    text = fmt.format(np.mean(values))
    return text + (f" +- {fmt.format(np.std(values, ddof=1))}" if len(values) > 1 else "")


def table(args):
    """The per-rule table of a campaign folder (markdown, to stdout)."""
    runs = _runs(args.campaign)
    head = ["rule", "dataset", "seeds", "final test acc. (%)", "best (epoch)"]
    head += [f"acc. at epoch {e} (%)" for e in args.at]
    head += ["slowness s (epochs)", "fit acc_max (%)"]
    head += [f"{k}, last record" for k in args.last]
    head += [f"{k}, mean of the last 10 records" for k in args.last10]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rule in ORDER:
        for ds in DATASETS:
            rs = runs.get((rule, ds), [])
            if not rs:
                continue
            acc = [[float(m["test_accuracy"]) for m in r["metrics"]] for r in rs]
            best = [(np.nanmax(a), int(np.nanargmax(a)) + 1) for a in acc]
            cells = [LABEL[rule], ds, str(len(rs)), _ms([100 * a[-1] for a in acc]),
                     _ms([100 * b for b, _ in best]) + " (" + ", ".join(str(e) for _, e in best)
                     + ")"]
            cells += [_ms([100 * a[e - 1] if len(a) >= e else None for a in acc])
                      for e in args.at]
            fits = [r["summary"].get("slowness") or {} for r in rs]
            cells += [_ms([f.get("s") for f in fits], "{:.3f}"),
                      _ms([100 * f["acc_max"] if "acc_max" in f else None for f in fits])]
            for keys, tail in ((args.last, 1), (args.last10, 10)):
                for key in keys:
                    vals = []
                    for r in rs:
                        with np.load(r["dir"] / "traces.npz") as z:
                            if f"{key}/values" in z.files:
                                v = z[f"{key}/values"].astype(float)
                                v = v[np.isfinite(v)]
                                vals.append(v[-tail:].mean() if len(v) else None)
                    cells.append(_ms(vals, "{:.1f}"))
            lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return 0


def _pepita_reference(run_dir, epochs):
    """Rows of the lead's 100-epoch PEPITA MNIST run (seed 0), cut at ``epochs``."""
    d = Path(run_dir)
    with open(d / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return dict(seed=0, summary=json.loads((d / "summary.json").read_text()), metrics=rows[:epochs],
                dir=d, full=rows)


def report(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neurosim.analysis import slowness_fit

    runs = _runs(args.campaign)
    epochs = args.epochs
    if args.pepita_run and args.pepita_rows:
        runs.setdefault(("pepita", "mnist"), []).append(_pepita_reference(args.pepita_run, epochs))
    figs = Path(args.figures)
    figs.mkdir(parents=True, exist_ok=True)
    order = ORDER
    lines = ["| rule | MNIST test acc. (%) | seeds | F-MNIST test acc. (%) | seeds |",
             "|---|---|---|---|---|"]
    curves = {}
    for rule in order:
        cells = []
        for ds in ("mnist", "fmnist"):
            rs = [r for r in runs.get((rule, ds), []) if len(r["metrics"]) >= epochs]
            accs = [100 * float(r["metrics"][epochs - 1]["test_accuracy"]) for r in rs]
            if accs:
                sd = f" +- {np.std(accs, ddof=1):.2f}" if len(accs) > 1 else ""
                cells += [f"{np.mean(accs):.2f}{sd}", str(len(accs))]
                curves[(rule, ds)] = np.array([[float(m["test_accuracy"])
                                                for m in r["metrics"][:epochs]] for r in rs])
            else:
                cells += ["-", "0"]
        lines.append(f"| {LABEL[rule]} | " + " | ".join(cells) + " |")
    print(f"Test accuracy after {epochs} epochs (mean +- sample std over seeds):\n")
    print("\n".join(lines))
    # slowness: fit on the epochs up to the first decay (the summary's own fit)
    print("\nSlowness s (epochs; acc(t) = a t / (s + t) with chance at 0, epochs up to the first "
          "decay), per seed:")
    for rule in order:
        for ds in ("mnist", "fmnist"):
            rs = [r for r in runs.get((rule, ds), []) if len(r["metrics"]) >= epochs]
            fits = [r["summary"].get("slowness") for r in rs]
            fits = [f for f in fits if f]
            if fits:
                s = [f["s"] for f in fits]
                a = [100 * f["acc_max"] for f in fits]
                print(f"  {LABEL[rule]:28s} {ds:6s} s = {np.mean(s):.3f} +- {np.std(s):.3f}, "
                      f"acc_max = {np.mean(a):.2f}  (n={len(fits)})")
    # learning curves: all rules (left) and a zoom on the 1-hidden-layer rules (right)
    cmap = plt.get_cmap("tab20")
    color = {r: cmap(2 * i % 20 + (2 * i // 20)) for i, r in enumerate(order)}
    zoom = {"mnist": (93, 98.5), "fmnist": (65, 90)}
    for ds, title in (("mnist", "MNIST"), ("fmnist", "Fashion-MNIST")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for k, ax in enumerate(axes):
            for rule in order:
                c = curves.get((rule, ds))
                if c is None or (k == 1 and rule in ("pepita_tl", "pepita_deep")):
                    continue
                ep = np.arange(1, c.shape[1] + 1)
                ax.plot(ep, 100 * c.mean(0), "o-", ms=3, color=color[rule],
                        label=f"{LABEL[rule]} (n={c.shape[0]})")
                if c.shape[0] > 1:
                    ax.fill_between(ep, 100 * c.min(0), 100 * c.max(0), alpha=0.12,
                                    color=color[rule])
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0].set_title(f"{title}: all rules (mean over seeds, band = min-max)")
        axes[1].set_title("zoom, one hidden layer of 1024")
        axes[1].set_ylim(*zoom[ds])
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(figs / f"rules_learning_curves_{ds}.png", dpi=120)
        plt.close(fig)
    # alignment angle per epoch, PEPITA with and without WM
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for rule, key, style in (("pepita_wm", "angle:F", "o-"), ("pepita_wmctl", "angle:F", "s--"),
                             ("pepita_wm", "angle:B1", "^-"), ("pepita_wm", "angle:B2", "v-")):
        for r in runs.get((rule, "mnist"), []):
            z = np.load(r["dir"] / "traces.npz")
            if f"{key}/values" not in z.files:
                continue
            v = z[f"{key}/values"]
            t = z[f"{key}/trial"] / 938.0
            lab = f"{LABEL[rule]}: {key.split(':')[1]} vs " + (
                "(W2 W1)^T" if key == "angle:F" else f"W{key[-1]}^T")
            ax.plot(t, v, style, ms=3, label=lab if r["seed"] == 0 else None,
                    color={"angle:F": "C0" if rule == "pepita_wm" else "C3",
                           "angle:B1": "C1", "angle:B2": "C2"}[key], alpha=0.8)
    if args.pepita_run:
        z = np.load(Path(args.pepita_run) / "traces.npz")
        t = z["angle:F/trial"] / 938.0
        keep = t <= epochs
        ax.plot(t[keep], z["angle:F/values"][keep], "x:", color="k",
                label="PEPITA (uniform F, ICML conv.): F vs (W2 W1)^T")
    ax.set_xlabel("epoch")
    ax.set_ylabel("angle (deg)")
    ax.set_title("Alignment on MNIST: PEPITA with and without weight mirroring")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figs / "pepita_wm_alignment.png", dpi=120)
    plt.close(fig)
    # sub-epoch curves and slowness: PEPITA vs PEPITA + WM vs the control
    if args.slowness and Path(args.slowness).is_dir():
        sd = Path(args.slowness)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        print("\nSub-epoch test curves (every 47 minibatches), slowness fit over 3 epochs:")
        for i, name in enumerate(("pepita", "pepita_wmctl", "pepita_wm")):
            ss, fin, amax = [], [], []
            for f in sorted(sd.glob(f"slowness_{name}_s*.npz")):
                z = np.load(f)
                fit = slowness_fit(z["epoch"][1:], z["acc"][1:], n_classes=10)
                ss.append(fit["s"])
                fin.append(100 * z["acc"][-1])
                amax.append(100 * fit["acc_max"])
                for ax in axes:
                    ax.plot(z["epoch"], 100 * z["acc"], "-", color=f"C{i}", lw=1,
                            label=LABEL[name] if f.name.endswith("s0.npz") else None)
                t = np.linspace(0.01, z["epoch"][-1], 200)
                axes[1].plot(t, fit["acc_max"] * 100 * t / (fit["s"] + t), ":", color=f"C{i}",
                             lw=1)
            if ss:
                sdv = lambda v: f" +- {np.std(v, ddof=1):.3f}" if len(v) > 1 else ""
                print(f"  {LABEL[name]:30s} n={len(ss)}  acc after 3 epochs {np.mean(fin):.2f}"
                      f"{sdv(fin)} %  s = {np.mean(ss):.4f}{sdv(ss)} epochs  acc_max "
                      f"{np.mean(amax):.2f} %")
        axes[0].set_ylim(85, 99)
        axes[1].set_xlim(0, 0.5)
        axes[1].set_ylim(0, 100)
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
        axes[0].set_title("MNIST, test accuracy every 47 minibatches")
        axes[1].set_title("first half epoch, with the fits a t / (s + t) (dotted)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figs / "pepita_wm_slowness.png", dpi=120)
        plt.close(fig)
    _grad_angle_over_training(runs, order, figs, epochs, plt)
    # diagnostics plots
    diagd = Path(args.diag) if args.diag else None
    if diagd and (diagd / "pepita_afa_cosine.npz").is_file():
        z = np.load(diagd / "pepita_afa_cosine.npz")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for i, k in enumerate(k for k in z.files if k.startswith("cos/")):
            c = z[k]
            lab = k.split("/", 1)[1]
            style = "--" if "float64" in lab else "-"
            axes[0].plot(z["scales"], np.maximum(1 - np.nanmedian(c, 1), 1e-9), "o" + style,
                         color=f"C{i}", label=lab)
            if "per sample" in lab:
                axes[1].errorbar(z["scales"], np.nanmean(c, 1), yerr=np.nanstd(c, 1),
                                 fmt="o" + style, capsize=3, color=f"C{i}", label=lab)
        for ax in axes:
            ax.axvline(0.05, color="gray", ls=":")
            ax.set_xscale("log")
            ax.set_xlabel("F scale (F ~ U(+-scale sqrt(6/784)); reference 0.05, dotted)")
            ax.grid(alpha=0.3)
        axes[0].set_yscale("log")
        axes[0].set_ylabel("1 - median cos(dW1 PEPITA, dW1 AFA)")
        axes[0].set_title("PEPITA vs AFA first-layer update (MNIST test data)")
        axes[0].legend(fontsize=7)
        axes[1].set_ylabel("cos, mean +- std over samples")
        axes[1].set_title("per sample: float32 engine vs float64 at the trained state")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figs / "pepita_afa_cosine.png", dpi=120)
        plt.close(fig)
        print("\nPEPITA-AFA cosine (mean over samples) vs F scale:")
        for k in z.files:
            if k.startswith("cos/"):
                c = z[k]
                print("  " + k[4:] + ": " + ", ".join(
                    f"{s:g}: {m:.4f} (median {md:.4f}, n={n})" for s, m, md, n in
                    zip(z["scales"], np.nanmean(c, 1), np.nanmedian(c, 1), np.isfinite(c).sum(1))))
    if diagd and (diagd / "grad_alignment.npz").is_file():
        z = np.load(diagd / "grad_alignment.npz")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        print("\nAngle to the BP gradient (deg), mean of the last 10 records:")
        for i, layer in enumerate(("W1", "W2")):
            ax = axes[i]
            for rule in GA_RULES:
                k = f"{rule}/{layer}"
                if f"{k}/deg" not in z.files:
                    continue
                ax.plot(z[f"{k}/trial"], z[f"{k}/deg"], label=LABEL[rule], lw=1)
                if i == 0:
                    print(f"  {LABEL[rule]:16s} W1 {np.mean(z[f'{rule}/W1/deg'][-10:]):6.1f}  "
                          f"W2 {np.mean(z[f'{rule}/W2/deg'][-10:]):6.1f}")
            ax.set_title(f"{layer}: angle between the rule's update and the BP gradient")
            ax.set_xlabel("minibatch")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("angle (deg)")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figs / "rules_gradient_alignment.png", dpi=120)
        plt.close(fig)


def _grad_angle_over_training(runs, order, figs, epochs, plt):
    """Angle between each rule's update and the BP gradient over the campaign's training (the
    scenarios' ``grad_angle:W1`` / ``grad_angle:W<last>`` monitors, ten records per epoch), mean
    over seeds, MNIST and Fashion-MNIST."""
    have = False
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True, sharey=True)
    print("\nAngle to the BP gradient over training (deg; mean over seeds of the records in "
          "epoch 1 and in the last epoch):")
    for row, ds in enumerate(("mnist", "fmnist")):
        for rule_i, rule in enumerate(order):
            rs = [r for r in runs.get((rule, ds), []) if (r["dir"] / "traces.npz").is_file()
                  and len(r["metrics"]) >= epochs]
            per_layer = {}
            for r in rs:
                z = np.load(r["dir"] / "traces.npz")
                keys = sorted(k.split("/")[0] for k in z.files
                              if k.startswith("grad_angle:") and k.endswith("/values"))
                if not keys:
                    continue
                first, last = keys[0], max(keys, key=lambda k: int(k.split(":W")[1]))
                for col, k in enumerate((first, last)):
                    per_layer.setdefault(col, []).append(
                        (z[f"{k}/trial"] / 938.0, z[f"{k}/values"].ravel()))
            summary = []
            for col, series in sorted(per_layer.items()):
                n = min(len(v) for _, v in series)
                t = series[0][0][:n]
                v = np.mean([v[:n] for _, v in series], axis=0)
                axes[row, col].plot(t, v, lw=1.2, color=plt.get_cmap("tab20")(
                    2 * rule_i % 20 + (2 * rule_i // 20)),
                                    label=f"{LABEL[rule]} (n={len(series)})")
                have = True
                summary.append(f"{v[t < 1].mean():6.1f} -> {v[t >= epochs - 1].mean():6.1f}")
            if summary:
                print(f"  {ds:6s} {LABEL[rule]:30s} W1: {summary[0]}   output layer: "
                      f"{summary[-1]}")
        for col, what in enumerate(("first layer (W1)", "output layer")):
            ax = axes[row, col]
            ax.set_title(f"{'MNIST' if ds == 'mnist' else 'Fashion-MNIST'}: {what}")
            ax.grid(alpha=0.3)
            ax.axhline(90, color="gray", lw=0.8, ls=":")
            if row == 1:
                ax.set_xlabel("epoch")
            if col == 0:
                ax.set_ylabel("angle to the BP gradient (deg)")
    if have:
        axes[0, 1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(figs / "rules_gradient_alignment_training.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("campaign", help="print the neurosim run command of every run")
    c.add_argument("--out", required=True, help="campaign folder (run directories inside)")
    c.add_argument("--epochs", type=int, default=10)
    c.add_argument("--milestones", type=int, nargs="*", default=[6, 9],
                   help="learning-rate decay epochs (default 6 9: the reference 60/90 of 100 "
                        "compressed to 10 epochs)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--rules", nargs="+", default=ORDER, choices=ORDER)
    c.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    c.add_argument("--data-mnist", default=None, help="MNIST folder (default: the lookup)")
    c.add_argument("--data-fmnist", default=None, help="Fashion-MNIST folder (default: the "
                   "lookup, which includes /usr/share/datasets/fashion-mnist)")
    t = sub.add_parser("table", help="per-rule table of a campaign folder")
    t.add_argument("--campaign", required=True)
    t.add_argument("--at", type=int, nargs="*", default=[])
    t.add_argument("--last", nargs="*", default=[], help="monitors: last record")
    t.add_argument("--last10", nargs="*", default=[], help="monitors: mean of the last 10")
    d = sub.add_parser("diag")
    d.add_argument("--out", required=True)
    d.add_argument("--data", default=None, help="the MNIST folder (default: the dataset lookup, "
                   "$NEUROSIM_DATA/mnist or the user cache)")
    d.add_argument("--pepita-run", default=None)
    d.add_argument("--trials", type=int, default=938)
    d.add_argument("--every", type=int, default=10)
    d.add_argument("--samples", type=int, default=200)
    d.add_argument("--redo-cosine", action="store_true")
    w = sub.add_parser("slowness")
    w.add_argument("--out", required=True)
    w.add_argument("--data", default=None, help="the MNIST folder (default: the dataset lookup)")
    w.add_argument("--epochs", type=int, default=3)
    w.add_argument("--eval-every", type=int, default=47, help="minibatches between evaluations")
    w.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r = sub.add_parser("report")
    r.add_argument("--campaign", required=True)
    r.add_argument("--diag", default=None)
    r.add_argument("--figures", required=True)
    r.add_argument("--pepita-run", default=None)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--pepita-rows", action="store_true",
                   help="count --pepita-run's first epochs as a PEPITA MNIST seed-0 run (only "
                        "when the campaign used the same schedule)")
    r.add_argument("--slowness", default=None, help="output folder of the slowness command")
    args = ap.parse_args(argv)
    return {"diag": diag, "slowness": slowness, "report": report, "campaign": campaign,
            "table": table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
