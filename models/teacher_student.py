r"""Teacher-student scenario: online BP / FA / AFA / PEPITA on the engine beside the ODEs.

``neurosim run scenarios/teacher_student.toml`` builds a soft-committee teacher and student
(:mod:`neurosim.teacher_student`), trains the student online with the engine's rule on fresh
Gaussian samples for every data seed, integrates the ODE of :mod:`neurosim.theory` from the
same instance, and writes into the run directory:

* ``scenario.toml`` (resolved), ``summary.json`` (parameters, :math:`\Phi`, the PEPITA ~ AFA
  control parameter :math:`\eta\Phi E t`, ODE-vs-simulation deviations, wall time);
* ``teacher_student.csv``: one row per output time ``t`` (samples / N) with
  ``ode_<rule>_eps_g`` and the ODE's ``ode_<rule>_Q_kl``, ``_R_kn``, ``_v_k``, ``_b_k``,
  ``_cos_vb``; ``sim_<rule>_eps_g_seed<s>`` for every data seed, ``sim_<rule>_eps_g_mean`` and
  the seed means ``sim_<rule>_mean_Q_kl``, ``_R_kn``, ``_v_k``, ``_b_k``, ``_cos_vb`` (b is the
  first-layer feedback in use: v for BP, the fixed b for FA, -W1 F for AFA/PEPITA);
* ``teacher_student.npz``: the same arrays with every seed;
* ``teacher_student.png``: :math:`\epsilon_g(t)` on log axes, theory lines and simulation
  points, with :math:`\cos\angle(v,b)` beneath (in the spirit of Fig. 2b of Srinivasan et al.).

For ``rule = "pepita"`` an AFA simulation from the identical initialisation and data
(``compare_afa = true``) and both the AFA ODE and the PEPITA ODE (AFA + the first-order
corrections of spec §4.5) are included.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from neurosim import NeurosimError, ValidationError
from neurosim import rundir

#: What a teacher-student run writes (a new run refuses a folder holding any of them).
TS_FILES = ("scenario.toml", "summary.json", "teacher_student.csv", "teacher_student.npz",
            "teacher_student.png", "error.json")

TS_SCHEMA = {
    "rule": (("bp", "fa", "afa", "pepita"), "pepita"),
    "N": ("int+", 1000),
    "K": ("int+", 2),
    "M": ("int+", 2),
    "eta": ("float+", 0.5),
    "eta_v": ("float+?", None),          # default: eta
    "train_v": ("bool", True),
    "sigma": ("float0", 0.0),
    "w_scale": ("float+", 1.0),          # student w ~ w_scale N(0, 1)
    "v_scale": ("float+", 1.0),          # student v ~ v_scale N(0, 1)
    "v_star": (("ones", "normal"), "ones"),
    "f_scale": ("float+", 0.03),         # F entries f_scale N(0, 1) (feedback = "random")
    "feedback": (("random", "planted"), "random"),
    "phi": ("float+", 1.0),              # ||F||^2 when feedback = "planted"
    "planted_b": ("str", "0.43, -0.25"),       # b(0) = -W1 F (K numbers)
    "planted_b_star": ("str", "-0.25, -0.12"),  # b* = -W1* F (M numbers)
    "seed": ("int0", 0),                 # the instance (teacher, student, F, FA feedback)
    "seeds": ("list[int]", [0, 1, 2]),   # data streams, one simulation each
    "t_max": ("float+", 100.0),
    "t_min": ("float+", 0.05),           # first log-spaced output time after t = 0
    "n_times": ("int+", 40),
    "dt": ("float+", 0.01),              # ODE step (RK4)
    "compare_afa": ("bool", True),
    "last_layer_error": (("clean", "modulated"), "clean"),
}


def _floats(text, n, where):
    try:
        vals = [float(s) for s in str(text).replace(";", ",").split(",") if s.strip()]
    except ValueError:
        raise ValidationError(where, f"got {text!r}, expected {n} comma-separated numbers.") \
            from None
    if len(vals) != n or not all(math.isfinite(x) for x in vals):
        raise ValidationError(where, f"got {text!r}, expected {n} comma-separated finite "
                              "numbers.")
    return vals


def _check(m):
    if not m["seeds"]:
        raise ValidationError("model.seeds", "empty; expected at least one data seed.")
    if len(set(m["seeds"])) != len(m["seeds"]):
        raise ValidationError("model.seeds", f"got {m['seeds']}; data seeds must differ.")
    if m["t_min"] >= m["t_max"]:
        raise ValidationError("model.t_min", f"got {m['t_min']}, expected < t_max = "
                              f"{m['t_max']}.")


def make_instance(m) -> ts.Instance:
    """The instance described by the ``[model]`` settings."""
    from neurosim import teacher_student as ts  # lazily: it imports the theory module

    _check(m)
    inst = ts.make_instance(m["N"], m["K"], m["M"], seed=m["seed"], w_scale=m["w_scale"],
                            v_scale=m["v_scale"], v_star=m["v_star"], f_scale=m["f_scale"])
    if m["feedback"] == "planted":
        b = _floats(m["planted_b"], m["K"], "model.planted_b")
        bs = _floats(m["planted_b_star"], m["M"], "model.planted_b_star")
        try:
            inst = ts.plant_feedback(inst, b, bs, m["phi"], seed=m["seed"])
        except ValidationError as e:
            raise ValidationError("model.phi", e.message) from None
    return inst


def output_times(m) -> np.ndarray:
    """t = 0 and ``n_times`` log-spaced times in [t_min, t_max], rounded to whole steps."""
    N = m["N"]
    t = np.concatenate([[0.0], np.geomspace(m["t_min"], m["t_max"], m["n_times"])])
    steps = np.unique(np.round(t * N).astype(np.int64))
    return steps / N


def _build(settings):
    from neurosim import teacher_student as ts  # lazily: it imports the theory module

    m = settings["model"]
    inst = make_instance(m)
    c, protocol, rule = ts.build_student(inst, m["rule"],
                                         last_layer_error=m["last_layer_error"])
    return c, protocol, [rule], "output"


# -- the run --------------------------------------------------------------------------------------


def _odes_for(rule, compare_afa):
    if rule == "pepita":
        return ["pepita", "afa"] if compare_afa else ["pepita"]
    return [rule]


def _sims_for(rule, compare_afa):
    return [rule, "afa"] if (rule == "pepita" and compare_afa) else [rule]


def _pairs(K, M):
    return ([(k, l) for k in range(K) for l in range(k, K)], [(k, n) for k in range(K)
                                                               for n in range(M)])


def _rel_dev(sim_mean, ode):
    with np.errstate(invalid="ignore", divide="ignore"):
        d = sim_mean / ode - 1.0
    return d


def run(settings, out_dir, *, data_dir=None, resume=False, progress=True) -> dict:
    """Run the teacher-student scenario into ``out_dir`` (see the module docstring)."""
    from neurosim import scenario as sc

    if resume:
        raise ValidationError("--resume", "teacher_student runs keep no checkpoints (a run takes "
                              "seconds to minutes); start it again without --resume.")
    m = settings["model"]
    inst = make_instance(m)
    out = Path(out_dir)
    with rundir.FolderLock(out, "run"):       # one writer; never replaces files of others
        rundir.remove_stale_tmp(out, TS_FILES)
        rundir.check_fresh(out, TS_FILES)
        try:
            rundir.atomic_write_text(out / "scenario.toml", sc.to_toml(settings))
            return _run(m, inst, out, progress)
        except BaseException as e:
            if (out / "scenario.toml").is_file():    # the folder is a run: say what happened
                try:
                    rundir.atomic_write_text(out / "error.json", json.dumps(
                        {"error": type(e).__name__, "message": str(e)}, indent=2))
                except (NeurosimError, OSError):
                    pass
            if isinstance(e, OSError):
                raise rundir.os_error(e, e.filename or out) from None
            raise


def _run(m, inst, out: Path, progress: bool) -> dict:
    from neurosim import teacher_student as ts  # lazily: it imports the theory module

    times = output_times(m)
    eta = m["eta"]
    eta_v = m["eta_v"] if m["eta_v"] is not None else eta
    kw = dict(eta=eta, eta_v=eta_v, sigma=m["sigma"], train_v=m["train_v"])
    t0 = time.perf_counter()

    odes, ode_notes = {}, {}
    for r in _odes_for(m["rule"], m["compare_afa"]):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            odes[r] = ts.theory(inst, r, times=times, dt=m["dt"], **kw)
        ode_notes[r] = [str(x.message) for x in w]

    sims = {}
    for r in _sims_for(m["rule"], m["compare_afa"]):
        if progress:
            print(f"teacher_student: simulating {r} (N = {inst.N}, {len(times)} output times up "
                  f"to t = {times[-1]:g}, seeds {list(m['seeds'])})", file=sys.stderr,
                  flush=True)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sims[r] = ts.simulate(inst, r, times=times, seeds=m["seeds"],
                                  last_layer_error=m["last_layer_error"], **kw)
        for x in w:
            print(f"teacher_student: {x.message}", file=sys.stderr)

    op = inst.order_parameters()
    phi_info = None
    if inst.F is not None and m["rule"] in ("afa", "pepita"):
        ref = odes["afa"] if "afa" in odes else odes[m["rule"]]
        if np.all(np.isfinite(ref.eps_g)):
            p = ts.pepita_afa_product(ref, op.Phi)
        else:  # pragma: no cover - the AFA ODE does not diverge in practice
            p = dict(Phi=op.Phi, E0=float("nan"), product_t0=float("nan"),
                     integrated=np.full(len(times), np.nan))
        phi_info = dict(Phi=p["Phi"], E0=p["E0"], eta_Phi_E0_tmax=p["product_t0"],
                        eta_Phi_int_E=float(p["integrated"][-1]),
                        integrated=p["integrated"])

    _write_csv(out / "teacher_student.csv", times, odes, sims, inst.K, inst.M)
    _write_npz(out / "teacher_student.npz", times, odes, sims, phi_info)
    deviations = {}
    for sname, s in sims.items():
        mean = s.eps_g.mean(1)
        for oname, o in odes.items():
            if oname != sname and not (sname == "pepita" and oname == "afa"):
                continue
            d = _rel_dev(mean, o.eps_g)[1:]
            fin = np.isfinite(d)
            deviations[f"sim_{sname}_vs_ode_{oname}"] = dict(
                max_abs_rel=float(np.max(np.abs(d[fin]))) if fin.any() else None,
                t_of_max=float(times[1:][fin][np.argmax(np.abs(d[fin]))]) if fin.any() else None,
                at_t_max=float(d[-1]) if np.isfinite(d[-1]) else None,
                finite_until=float(times[1:][fin][-1]) if fin.any() else None)
    _plot(out / "teacher_student.png", m, inst, times, odes, sims, phi_info)
    wall = time.perf_counter() - t0
    summary = {
        "model": "teacher_student", "rule": m["rule"], "N": inst.N, "K": inst.K, "M": inst.M,
        "eta": eta, "eta_v": eta_v, "sigma": m["sigma"], "seeds": list(m["seeds"]),
        "t_max": float(times[-1]), "n_output_times": len(times),
        "initial": dict(Q=op.Q.tolist(), R=op.R.tolist(), T=op.T.tolist(),
                        v=inst.v.astype(float).tolist(), v_star=inst.v_star.astype(float).tolist(),
                        b=None if op.b is None else op.b.tolist(),
                        b_star=None if op.b_star is None else op.b_star.tolist(),
                        b_fa=inst.b_fa.astype(float).tolist()),
        "eps_g_final": {**{f"ode_{k}": _f(o.eps_g[-1]) for k, o in odes.items()},
                        **{f"sim_{k}_mean": _f(s.eps_g[-1].mean()) for k, s in sims.items()}},
        "deviations": deviations,
        "ode_t_fail": {k: o.t_fail for k, o in odes.items()},
        "ode_warnings": ode_notes,
        "sim_t_fail": {k: s.t_fail for k, s in sims.items()},
        "sim_wall_s": {k: s.wall_s for k, s in sims.items()},
        "wall_s": wall,
    }
    if phi_info is not None:
        summary["pepita_afa"] = {k: v for k, v in phi_info.items() if k != "integrated"}
    rundir.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if progress:
        for k, d in deviations.items():
            if d["max_abs_rel"] is not None:
                print(f"teacher_student: {k}: max |rel. deviation| {d['max_abs_rel']:.3%} "
                      f"(t = {d['t_of_max']:g})", file=sys.stderr)
        if phi_info is not None:
            print(f"teacher_student: Phi = {phi_info['Phi']:.3g}, eta Phi E(0) t_max = "
                  f"{phi_info['eta_Phi_E0_tmax']:.3g}, eta Phi int E dt = "
                  f"{phi_info['eta_Phi_int_E']:.3g}", file=sys.stderr)
        print(f"teacher_student: wrote {out / 'teacher_student.csv'} and "
              f"{out / 'teacher_student.png'} ({wall:.1f} s)", file=sys.stderr)
    return summary


def _f(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _columns(prefix, Q, R, v, b, cos, K, M):
    qp, rp = _pairs(K, M)
    cols = {}
    for k, l in qp:
        cols[f"{prefix}Q_{k}{l}"] = Q[:, k, l]
    for k, n in rp:
        cols[f"{prefix}R_{k}{n}"] = R[:, k, n]
    for k in range(K):
        cols[f"{prefix}v_{k}"] = v[:, k]
    for k in range(K):
        cols[f"{prefix}b_{k}"] = b[:, k]
    cols[f"{prefix}cos_vb"] = cos
    return cols


def _write_csv(path, times, odes, sims, K, M):
    cols = {"t": times}
    for name, o in odes.items():
        cols[f"ode_{name}_eps_g"] = o.eps_g
    for name, s in sims.items():
        for j, seed in enumerate(s.seeds):
            cols[f"sim_{name}_eps_g_seed{seed}"] = s.eps_g[:, j]
        cols[f"sim_{name}_eps_g_mean"] = s.eps_g.mean(1)
    for name, o in odes.items():
        cols.update(_columns(f"ode_{name}_", o.Q, o.R, o.v, o.b, o.cos_vb, K, M))
    for name, s in sims.items():
        cols.update(_columns(f"sim_{name}_mean_", s.Q.mean(1), s.R.mean(1), s.v.mean(1),
                             s.b.mean(1), s.cos_vb.mean(1), K, M))
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(list(cols))
    for i in range(len(times)):
        w.writerow([_fmt(cols[c][i]) for c in cols])
    rundir.atomic_write_text(path, fh.getvalue())


def _fmt(x):
    x = float(x)
    return "nan" if not math.isfinite(x) else repr(x)


def _write_npz(path, times, odes, sims, phi_info):
    arrays = {"t": times}
    for name, o in odes.items():
        for a in ("eps_g", "Q", "R", "v", "b"):
            arrays[f"ode_{name}_{a}"] = getattr(o, a)
    for name, s in sims.items():
        for a in ("eps_g", "Q", "R", "v", "b"):
            arrays[f"sim_{name}_{a}"] = getattr(s, a)
        arrays[f"sim_{name}_seeds"] = np.array(s.seeds)
    if phi_info is not None:
        arrays["eta_Phi_int_E"] = phi_info["integrated"]
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    rundir.atomic_write_bytes(path, buf.getvalue())


_COLORS = {"bp": "C0", "fa": "C2", "afa": "C1", "pepita": "C3"}
_LABEL = {"bp": "BP", "fa": "FA", "afa": "AFA", "pepita": "PEPITA"}


def _plot(path, m, inst, times, odes, sims, phi_info):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True,
                                 gridspec_kw=dict(height_ratios=(2.2, 1)))
    sel = times > 0
    t = times[sel]
    for name, o in odes.items():
        ls = "-" if name == m["rule"] else "--"
        lab = f"ODE {_LABEL[name]}" + (" (§4.5 corrections)" if name == "pepita" else "")
        e = o.eps_g[sel]
        ok = np.isfinite(e) & (e > 0)
        ax.plot(t[ok], e[ok], ls, color=_COLORS[name], lw=1.6, label=lab)
        c = o.cos_vb[sel]
        bx.plot(t[np.isfinite(c)], c[np.isfinite(c)], ls, color=_COLORS[name], lw=1.4)
    markers = {"pepita": "o", "afa": "s", "bp": "o", "fa": "o"}
    for name, s in sims.items():
        for j in range(s.eps_g.shape[1]):
            e = s.eps_g[sel, j]
            ok = np.isfinite(e) & (e > 0)
            ax.plot(t[ok], e[ok], "-", color=_COLORS[name], lw=0.5, alpha=0.35)
        e = s.eps_g[sel].mean(1)
        ok = np.isfinite(e) & (e > 0)
        ax.plot(t[ok], e[ok], markers[name], color=_COLORS[name], ms=4, mfc="none",
                label=f"sim {_LABEL[name]} (mean of {s.eps_g.shape[1]} seeds)")
        c = s.cos_vb[sel].mean(1)
        bx.plot(t[np.isfinite(c)], c[np.isfinite(c)], markers[name], color=_COLORS[name], ms=3,
                mfc="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # keep the learning curves legible when a run diverges (PEPITA's runaway, spec §5)
    e0 = float(next(iter(odes.values())).eps_g[0])
    lo, hi = ax.get_ylim()
    if hi > 10 * e0:
        ax.set_ylim(lo, 10 * e0)
        runaway = [f"{_LABEL[k]} sim" for k, s in sims.items()
                   if np.nanmax(s.eps_g) > 10 * e0 or any(f is not None for f in s.t_fail)]
        runaway += [f"{_LABEL[k]} ODE" for k, o in odes.items() if o.t_fail is not None]
        ax.text(0.02, 0.97, "runs away (off scale): " + ", ".join(runaway),
                transform=ax.transAxes, ha="left", va="top", fontsize=8, color="C3")
    ax.set_ylabel(r"$\epsilon_g$")
    ax.legend(fontsize=8, loc="lower left")
    eta_v = m["eta_v"] if m["eta_v"] is not None else m["eta"]
    title = (f"teacher-student {_LABEL[m['rule']]}: N={inst.N}, K={inst.K}, M={inst.M}, "
             f"η={m['eta']:g}, η_v={eta_v:g}, σ={m['sigma']:g}")
    ax.set_title(title, fontsize=9)
    if phi_info is not None:
        txt = (f"Φ = ‖F‖² = {phi_info['Phi']:.3g}\n"
               f"ηΦE(0)·t_max = {phi_info['eta_Phi_E0_tmax']:.3g}\n"
               f"ηΦ∫E dt = {phi_info['eta_Phi_int_E']:.3g}\n"
               f"(PEPITA ≈ AFA needs ≪ 1)")
        ax.text(0.98, 0.97, txt, transform=ax.transAxes, ha="right", va="top", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", ec="0.7"))
        # where eta Phi int E dt crosses 1 (the PEPITA ~ AFA horizon)
        integ = phi_info["integrated"][sel]
        if np.any(integ >= 1):
            tc = t[np.argmax(integ >= 1)]
            for a in (ax, bx):
                a.axvline(tc, color="0.6", lw=0.8, ls=":")
    bx.set_ylabel(r"$\cos\angle(v,b)$")
    bx.set_xlabel(r"$t$ = samples / N")
    bx.set_ylim(-1.05, 1.05)
    bx.axhline(0, color="0.8", lw=0.6)
    fig.tight_layout()
    try:
        rundir.atomic_write_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


def _register():
    from neurosim.scenario import register_model

    register_model("teacher_student", TS_SCHEMA, _build, runner=run)


_register()
