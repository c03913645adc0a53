"""Running a scenario: data, epochs, evaluation, metrics, checkpoints, plots.

A run directory holds ``scenario.toml`` (resolved), ``metrics.csv`` (one row per epoch),
``summary.json``, ``traces.npz`` (monitor traces), ``learning_curve.png`` and
``checkpoints/epoch-NNNN.npz`` (the last ``training.keep_checkpoints``, each written to a
temporary file and renamed, so a killed run never leaves a half-written checkpoint).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from . import scenario as sc
from .compiler import compile_plan
from .errors import SimulationError, ValidationError
from .monitors import Monitor
from .plasticity.optim import SGD
from .simulator import Simulator, shuffled_order

METRIC_FIELDS = ["epoch", "test_accuracy", "train_accuracy", "lr", "samples_per_s", "wall_s",
                 "epoch_s"]


def make_simulator(settings: dict) -> Simulator:
    """Build and compile the scenario's circuit; returns a ready Simulator."""
    circuit, protocol, rules, output = sc.build(settings)
    tr = settings["training"]
    opt = SGD(lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"],
              style=tr["optimizer"], milestones=tuple(tr["milestones"]), gamma=tr["gamma"],
              max_weight=tr["max_weight"])
    mons = [Monitor(m["target"], phase=m["phase"], every=m["every"], per=m["per"],
                    units=tuple(m["units"]) if m["units"] else None, sample=m["sample"],
                    name=m["name"]) for m in settings["monitor"]]
    plan = compile_plan(circuit, protocol, rules=rules, optimizer=opt, monitors=mons,
                        batch=tr["batch_size"], seed=tr["seed"], output=output)
    return Simulator(plan, threads=tr["threads"])


def scenario_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str):
    _atomic_write_bytes(path, text.encode())


def save_checkpoint(path: Path, sim: Simulator, epoch: int, metrics: list, settings: dict):
    """Write a checkpoint atomically (temporary file + rename)."""
    import io

    state = sim.state_dict()
    arrays = {"mem": state["mem"], "trial": np.int64(state["trial"]),
              "step": np.int64(state["step"]), "epoch": np.int64(epoch),
              "metrics": np.frombuffer(json.dumps(metrics).encode(), np.uint8),
              "scenario_hash": np.frombuffer(scenario_hash(settings).encode(), np.uint8)}
    for k, chunks in state["records"].items():
        if chunks:
            arrays[f"rec_values:{k}"] = np.concatenate([c[0] for c in chunks])
            arrays[f"rec_stamps:{k}"] = np.concatenate([c[1] for c in chunks])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, sim: Simulator, settings: dict) -> tuple[int, list]:
    """Restore a checkpoint into ``sim``; returns (epochs done, metrics rows)."""
    try:
        with np.load(path) as z:
            h = bytes(z["scenario_hash"]).decode()
            if h != scenario_hash(settings):
                raise ValidationError(str(path), "the checkpoint belongs to another scenario "
                                      "(its settings hash differs).",
                                      "resume with the run directory's own scenario.toml.")
            records = {}
            for key in z.files:
                if key.startswith("rec_values:"):
                    name = key.split(":", 1)[1]
                    records[name] = [(z[key], z[f"rec_stamps:{name}"])]
            sim.load_state_dict({"mem": z["mem"], "trial": int(z["trial"]),
                                 "step": int(z["step"]), "records": records})
            return int(z["epoch"]), json.loads(bytes(z["metrics"]).decode())
    except ValidationError:
        raise
    except Exception as e:  # zip/npz corruption, missing keys, truncated file
        raise ValidationError(str(path), f"cannot read the checkpoint ({type(e).__name__}: {e}); "
                              "it is corrupt or truncated.",
                              "delete it to resume from the previous checkpoint.") from None


def latest_checkpoint(run_dir: Path):
    ck = sorted((run_dir / "checkpoints").glob("epoch-*.npz"))
    return ck[-1] if ck else None


def load_data(settings: dict, data_dir=None):
    from .datasets import load_dataset

    d = settings["data"]
    ds = load_dataset(d["dataset"], data_dir=data_dir or d["dir"], train_limit=d["train_limit"])
    x_test, y_test = ds.x_test, ds.y_test
    if d["test_limit"]:
        x_test, y_test = x_test[: d["test_limit"]], y_test[: d["test_limit"]]
    return ds, x_test, y_test


def run(settings: dict, out_dir, *, data_dir=None, resume: bool = False, progress: bool = True,
        log=print) -> dict:
    """Run a validated scenario into ``out_dir``; returns the summary dict."""
    out = Path(out_dir)
    sim = make_simulator(settings)           # validates the whole circuit before any I/O
    ds, x_test, y_test = load_data(settings, data_dir)
    tr = settings["training"]
    opt = sim.plan.optimizer
    metrics, start_epoch = [], 0
    if resume:
        ck = latest_checkpoint(out)
        if ck is not None:
            start_epoch, metrics = load_checkpoint(ck, sim, settings)
            log(f"resumed from {ck} (epoch {start_epoch})")
    else:
        if (out / "metrics.csv").exists():
            raise ValidationError("--out", f"{str(out)!r} already holds a run.",
                                  "choose another --out, or continue it with --resume.")
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    _atomic_write_text(out / "scenario.toml", sc.to_toml(settings))
    n = ds.x_train.shape[0]
    wall0 = time.perf_counter() - (metrics[-1]["wall_s"] if metrics else 0.0)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=tr["epochs"] * n, initial=start_epoch * n, unit="sample",
                   unit_scale=True, dynamic_ncols=True, disable=None)
    stats = sim.plan.buffer_index.get("stats.correct")
    try:
        for epoch in range(start_epoch, tr["epochs"]):
            lr = opt.lr_at(epoch)
            sim.set_lr(lr)
            if stats is not None:
                sim.plan.view("stats.correct")[...] = 0
            order = shuffled_order(tr["seed"], epoch, n)
            done = [0]

            def step(k):
                if bar is not None:
                    bar.update(k - done[0])
                    done[0] = k
            t0 = time.perf_counter()
            try:
                sim.train(ds.x_train, ds.y_train, order, chunk=tr["chunk"], progress=step)
            except SimulationError as e:
                raise SimulationError(f"epoch {epoch + 1}: {e}", hint="the last checkpoint in "
                                      f"{out / 'checkpoints'} is intact.") from e
            t_train = time.perf_counter() - t0
            row = {"epoch": epoch + 1, "lr": lr, "samples_per_s": n / t_train,
                   "epoch_s": t_train}
            if stats is not None:
                c = sim.plan.view("stats.correct")
                row["train_accuracy"] = float(c[0, 0] / max(c[0, 1], 1))
            else:
                row["train_accuracy"] = float("nan")
            if (epoch + 1) % tr["eval_every"] == 0 or epoch + 1 == tr["epochs"]:
                row["test_accuracy"] = sim.evaluate(x_test, y_test)
            else:
                row["test_accuracy"] = float("nan")
            row["wall_s"] = time.perf_counter() - wall0
            metrics.append(row)
            _write_outputs(out, sim, settings, metrics, ds)
            ck = out / "checkpoints" / f"epoch-{epoch + 1:04d}.npz"
            save_checkpoint(ck, sim, epoch + 1, metrics, settings)
            for old in sorted((out / "checkpoints").glob("epoch-*.npz"))[:-tr["keep_checkpoints"]]:
                old.unlink()
            if bar is not None:
                bar.set_postfix(test=f"{row['test_accuracy']:.4f}", lr=f"{lr:g}")
            else:
                log(f"epoch {epoch + 1}/{tr['epochs']}: test {row['test_accuracy']:.4f} "
                    f"train {row['train_accuracy']:.4f} {row['samples_per_s']:.0f} samples/s")
    finally:
        if bar is not None:
            bar.close()
    summary = _write_outputs(out, sim, settings, metrics, ds, final=True)
    return summary


def _write_outputs(out: Path, sim, settings, metrics, ds, final=False) -> dict:
    with open(out / "metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for r in metrics:
            w.writerow({k: r.get(k) for k in METRIC_FIELDS})
    os.replace(out / "metrics.csv.tmp", out / "metrics.csv")
    traces = sim.traces
    arrays = {}
    for k, t in traces.items():
        for field, v in t.to_dict().items():
            arrays[f"{k}/{field}"] = v
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write_bytes(out / "traces.npz", buf.getvalue())
    accs = [r["test_accuracy"] for r in metrics if not np.isnan(r["test_accuracy"])]
    from .analysis import slowness_fit

    summary = {
        "scenario": settings["name"], "model": settings["model"]["name"],
        "dataset": settings["data"]["dataset"], "epochs_done": len(metrics),
        "epochs": settings["training"]["epochs"], "seed": settings["training"]["seed"],
        "final_test_accuracy": accs[-1] if accs else None,
        "best_test_accuracy": max(accs) if accs else None,
        "final_train_accuracy": metrics[-1]["train_accuracy"] if metrics else None,
        "wall_s": metrics[-1]["wall_s"] if metrics else 0.0,
        "mean_samples_per_s": float(np.mean([r["samples_per_s"] for r in metrics])) if metrics else None,
        "n_train": int(ds.x_train.shape[0]), "threads": settings["training"]["threads"],
        "mode": settings["simulation"]["mode"], "complete": bool(final),
        "neurosim_version": _version(),
        "slowness": slowness_fit([r["epoch"] for r in metrics], [r["test_accuracy"] for r in metrics],
                                 n_classes=ds.n_classes,
                                 before=(settings["training"]["milestones"] or [None])[0]),
    }
    _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_json_default))
    _plot(out, metrics, settings)
    return summary


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def _version():
    from . import __version__

    return __version__


def _plot(out: Path, metrics, settings):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [r["epoch"] for r in metrics]
    ax.plot(ep, [100 * r["test_accuracy"] for r in metrics], "o-", ms=3, label="test")
    ax.plot(ep, [100 * r["train_accuracy"] for r in metrics], "s--", ms=2, label="train (clean pass)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{settings['name']}: {settings['model']['name']} on {settings['data']['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out / "learning_curve.tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out / "learning_curve.png")
