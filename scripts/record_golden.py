"""Golden files of the engine's outputs for every scenario (issue 10, "No regression").

Written before the engine core is rewritten, so that the new core can be held to today's results:
bitwise where the sequence of floating-point operations is unchanged, within float32 tolerance
(tests/test_golden.py explains the bound) where fusion or another re-association changes it.

For every ``scenarios/<name>.toml`` this writes ``tests/golden/<name>.npz`` (plain arrays, no
pickle) and ``tests/golden/<name>.json`` (metadata). What is recorded depends on the scenario:

* Networks trained by ``neurosim run`` (PEPITA family, BP, FA, DFA, AFA, FF; steady and time
  mode; MNIST and Fashion-MNIST):

  1. after the first ``N_BATCHES`` = 20 minibatches of epoch 0 (the scenario's own settings:
     batch size, seed, learning rate, order of the first epoch over the full training set),
     every buffer named in :data:`STATE_SUFFIXES` (``*.W``: every projection's weights, fixed
     feedback and learned feedback included; ``*.V``: the optimizer's momentum; ``fa.*.B`` /
     ``dfa.*.D``: fixed random feedback; ``*.peer_mean``: FF's running peer means), each as a
     digest (:func:`digest`);
  2. every monitor trace recorded over those minibatches (the scenario's own monitors; most
     record every 94 or 938 trials, i.e. once, at trial 0), values and time stamps (``t``,
     ``trial``, ``step``), in full when small, else as a digest;
  3. (JSON) the test accuracy of ``neurosim run SCENARIO --set training.epochs=1 --set
     data.train_limit=2000`` on the full test set, the training accuracy, and how many test
     samples are "fragile" (relative top-2 margin below a threshold), from which the accuracy
     tolerance of the slow golden test is derived.

* ``teacher_student`` (its own runner; no data set): the engine part of its run,
  :func:`neurosim.teacher_student.simulate`, for each simulated rule (``pepita`` and, with
  ``compare_afa``, ``afa``), all data seeds, at the times :data:`TS_TIMES` (up to 1000 online
  steps): the order parameters Q, R, v, b and the generalisation error, in full. The ODEs are
  numpy (not the engine) and are not recorded.

* ``oja_pca``, ``bcm_selectivity``, ``pes_map`` (the local rules; their own runner on synthetic
  data from the seed, :mod:`neurosim.models.local_rules`): as the trained networks, the state
  (weights, momenta, BCM's threshold ``*.theta``) and the monitor traces after the first
  ``N_BATCHES`` minibatches of epoch 0 as the runner trains them, with the one-ulp sensitivity;
  no accuracy.

* ``crosscheck_small`` (no learning rule; made for ``neurosim crosscheck``): the neurosim side of
  the cross-check: the circuit compiled with batch 1 and one per-step monitor per monitored
  (population, variable, phase), run for :data:`XC_TRIALS` trials on the seeded uniform inputs
  the cross-check uses; the weights and traces as digests.

Arrays of at most :data:`FULL_MAX` entries are stored in full (``<key>/full``). Larger ones as a
digest: SHA-256 over the raw C-order bytes (the bitwise check), shape, dtype, float64 sum, sum of
squares and sum of absolute values, and the values at :data:`N_SAMPLE` pseudo-random flat indices
drawn from ``SAMPLE_SEED`` and the size (the indices are stored once per size as
``index/<size>``). For state buffers the files also hold the size of the change training made
(max, sum and RMS of ``|final - initial|``, and the SHA-256 of the initial values), and the JSON
holds ``ulp_sensitivity``: how far the state moves when every trained weight starts one ulp away
(:func:`ulp_sensitivity`), the measured conditioning on which the test's tolerance is built
(local-rule scenarios: every weight, fixed ones included, since the learned readout of
``pes_map`` starts at zero and its rounding enters through the fixed recurrent circuit).

Usage::

    python scripts/record_golden.py --mnist DIR --fashion-mnist DIR          # all scenarios
    python scripts/record_golden.py --mnist DIR pepita_mnist bp_mnist         # some of them
    python scripts/record_golden.py --out /tmp/g2 ...       # elsewhere (e.g. to compare two runs)
    python scripts/record_golden.py --no-accuracy ...       # skip the 1-epoch runs (minutes)
    python scripts/record_golden.py --measure --mnist DIR --fashion-mnist DIR [NAMES]
        # no files written: for each trained scenario, how far the 20-minibatch state moves from
        # the golden files when the computation is re-associated (compile_plan(fuse=False);
        # without drive reuse; training.threads = 2; run it under OPENBLAS_CORETYPE=Haswell for
        # other GEMM kernels)
        # and when the learning rate is changed by 0.1% and 1%, in units of the tolerance of
        # tests/test_golden.py (the check of the analysis behind it)

The 1-epoch runs take most of the time: about 4-35 s per scenario, but ff_mnist_time's
evaluation (ten goodness passes over the test set, 40 time steps each) takes many minutes.

``--mnist`` / ``--fashion-mnist`` name the folders holding the four IDX files; without them the
data sets are looked up as :func:`neurosim.datasets.load_dataset` does (``$NEUROSIM_DATA``, the
system folder of Debian's ``dataset-fashion-mnist``, the user cache), never downloaded. A
scenario whose data set is not found is skipped with a message.

The files are deterministic: the npz members carry a fixed time stamp and the JSON no timings,
so two recordings on the same machine and commit are identical byte for byte if the engine is
deterministic (the recorder prints the wall time of each scenario instead).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"
GOLDEN = ROOT / "tests" / "golden"

FORMAT = 1
N_BATCHES = 20            # minibatches of the state/monitor record
TRAIN_LIMIT = 2000        # training samples of the 1-epoch accuracy run
N_SAMPLE = 4096           # entries sampled per large array
FULL_MAX = 4096           # arrays up to this size are stored in full
SAMPLE_SEED = 20_240_610  # root of the index draws (fixed forever: the files depend on it)
ULP_DRAWS = 3             # sign draws of the one-ulp sensitivity runs
STATE_SUFFIXES = (".W", ".V", ".B", ".D", ".peer_mean")
TS_TIMES = (0.0, 0.01, 0.1, 1.0)   # teacher-student output times (samples / N)
XC_TRIALS = 3                      # crosscheck trials, as `neurosim crosscheck` runs by default
FRAGILE_MARGINS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)

SPECIAL = {"teacher_student": "teacher_student", "crosscheck": "crosscheck",
           "oja_pca": "local", "bcm_selectivity": "local", "pes_map": "local"}


# -- digests ----------------------------------------------------------------------------------------
def sample_index(size: int) -> np.ndarray:
    """The fixed flat indices sampled from an array of more than :data:`FULL_MAX` entries
    (sorted, int32)."""
    rng = np.random.default_rng([SAMPLE_SEED, size])
    return np.sort(rng.choice(size, N_SAMPLE, replace=False)).astype(np.int32)


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def digest(a: np.ndarray, initial: np.ndarray | None = None) -> dict:
    """The stored summary of ``a`` (see the module docstring): ``{"full": a}`` for arrays of at
    most :data:`FULL_MAX` entries, else its SHA-256, shape, dtype, float64 sum, sum of squares
    and sum of absolute values, and the ``sample`` at :func:`sample_index`. With ``initial``,
    also the size of the change ``a - initial`` (``update_max``, ``update_l1``, ``update_rms``)
    and the SHA-256 of ``initial``; the sample of an array that training left unchanged is
    omitted (it must match bit for bit anyway)."""
    a = np.ascontiguousarray(a)
    flat = a.reshape(-1)
    if flat.size <= FULL_MAX:
        out = {"full": a.copy()}
    else:
        f64 = flat.astype(np.float64)
        out = {"sha256": np.array(sha256(a)), "shape": np.array(a.shape, np.int64),
               "dtype": np.array(a.dtype.str), "sum": np.float64(f64.sum()),
               "sumsq": np.float64(np.dot(f64, f64)), "l1": np.float64(np.abs(f64).sum()),
               "sample": flat[sample_index(flat.size)].copy()}
    if initial is not None:
        d = np.abs(flat.astype(np.float64)
                   - np.ascontiguousarray(initial).reshape(-1).astype(np.float64))
        out["initial_sha256"] = np.array(sha256(initial))
        out["update_max"] = np.float64(d.max() if d.size else 0.0)
        out["update_l1"] = np.float64(d.sum())
        out["update_rms"] = np.float64(np.sqrt(np.mean(d * d)) if d.size else 0.0)
        if out["update_max"] == 0 and "sample" in out:
            del out["sample"]
    return out


def _put(arrays: dict, prefix: str, d: dict) -> None:
    for k, v in d.items():
        arrays[f"{prefix}/{k}"] = v
    if "sample" in d:
        size = int(np.prod(d["shape"]))
        arrays.setdefault(f"index/{size}", sample_index(size))


def write_npz(path: Path, arrays: dict) -> None:
    """``np.savez`` with a fixed time stamp on every member, so the bytes depend only on the
    arrays (np.load reads it as any npz; no pickled objects)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(arrays[name]), allow_pickle=False)
            z.writestr(info, member.getvalue())
    path.write_bytes(buf.getvalue())


def read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def group(arrays: dict, prefix: str) -> dict:
    """``{name: {field: array}}`` of the members ``prefix/name/field``."""
    out: dict = {}
    for key, v in arrays.items():
        if key.startswith(prefix + "/"):
            name, field = key[len(prefix) + 1:].rsplit("/", 1)
            out.setdefault(name, {})[field] = v
    return out


# -- data -----------------------------------------------------------------------------------------
def find_data(dataset: str, given: dict) -> Path | None:
    """The folder holding ``dataset``: the one given, else where :func:`load_dataset` finds it
    without downloading; None if nowhere."""
    if given.get(dataset):
        return Path(given[dataset])
    from neurosim.datasets import load_dataset
    from neurosim.errors import DataError

    try:
        return load_dataset(dataset, download=False, train_limit=1).source_dir
    except DataError:
        return None


# -- scenarios ------------------------------------------------------------------------------------
def scenario_names() -> list[str]:
    return sorted(p.stem for p in SCENARIOS.glob("*.toml"))


def load_settings(name: str, overrides=()) -> dict:
    from neurosim import scenario as sc

    return sc.load(SCENARIOS / f"{name}.toml", list(overrides))


def kind_of(settings: dict) -> str:
    """The scenario's kind: "train" (a network trained by the standard loop),
    "teacher_student", "crosscheck" or "local" (a local rule on its synthetic data)."""
    return SPECIAL.get(settings["model"]["name"], "train")


@contextlib.contextmanager
def compiled_with(optimize=None, seen=None):
    """Compile every plan made meanwhile with ``compile_plan(optimize=...)`` merged into its own
    (e.g. ``{"drive_reuse": False}``) and, with ``seen`` (a list), append each compiled plan's
    ``passes`` (the rewrites each optimisation pass made) to it."""
    from unittest import mock

    import neurosim.compiler as compiler
    import neurosim.models.forward_forward as ffm
    import neurosim.models.local_rules as local
    import neurosim.teacher_student as ts
    import neurosim.training as training

    real = compiler.compile_plan

    def patched(*args, **kw):
        if optimize:
            kw["optimize"] = {**(kw.get("optimize") or {}), **optimize}
        plan = real(*args, **kw)
        if seen is not None:
            seen.append(plan.passes)
        return plan

    with mock.patch.object(compiler, "compile_plan", patched), \
            mock.patch.object(training, "compile_plan", patched), \
            mock.patch.object(ffm, "compile_plan", patched), \
            mock.patch.object(local, "compile_plan", patched), \
            mock.patch.object(ts, "compile_plan", patched):
        yield


def unfused():
    """Compile every training plan with ``compile_plan(optimize={"fuse_momentum": False})``
    (momentum not folded into the update GEMM): the same arithmetic, re-associated. For the
    tolerance analysis only."""
    return compiled_with({"fuse_momentum": False})


def without_drive_reuse():
    """Compile every plan without linear drive reuse (``optimize={"drive_reuse": False}``): the
    operation sequence the golden files were recorded with."""
    return compiled_with({"drive_reuse": False})


def state_names(sim) -> list[str]:
    """The state buffers recorded (:data:`STATE_SUFFIXES`), in the plan's order."""
    return [n for n in sim.plan.buffer_index if n.endswith(STATE_SUFFIXES)
            and not n.startswith(("monitor", "scratch.", "stim."))]


def train_minibatches(settings: dict, data_dir, n_batches: int = N_BATCHES, perturb=(),
                      draw: int = 0):
    """The scenario's simulator after its first ``n_batches`` minibatches of epoch 0, exactly
    as :func:`neurosim.training.run` trains them; returns ``(sim, initial state)``.

    ``perturb``: projections whose nonzero initial weights are moved by one ulp, up or down at
    random (signs from the fixed stream number ``draw``), before training: the sensitivity runs
    of :func:`ulp_sensitivity`."""
    from neurosim.rng import component_rng
    from neurosim.simulator import shuffled_order
    from neurosim.training import load_data, simulator_for

    sim = simulator_for(settings)
    ds, _, _ = load_data(settings, data_dir)
    rng = component_rng(SAMPLE_SEED, f"golden:ulp:{draw}")
    for name in perturb:
        w = sim.buffer(f"{name}.W")
        up = rng.random(w.shape) < 0.5
        moved = np.where(up, np.nextafter(w, np.float32(np.inf)),
                         np.nextafter(w, np.float32(-np.inf)))
        sim.set_weights(name, np.where(w == 0, w, moved))
    initial = {n: sim.buffer(n) for n in state_names(sim)}
    tr = settings["training"]
    sim.set_lr(sim.plan.optimizer.lr_at(0))
    order = shuffled_order(tr["seed"], 0, ds.x_train.shape[0])[: n_batches * tr["batch_size"]]
    sim.train(ds.x_train, ds.y_train, order, chunk=tr["chunk"])
    return sim, initial


def train_local_minibatches(settings: dict, data_dir=None, n_batches: int = N_BATCHES,
                            perturb=(), draw: int = 0):
    """:func:`train_minibatches` for the local-rule scenarios: their simulator after the first
    ``n_batches`` minibatches of epoch 0 of their synthetic data, as their runner
    (:func:`neurosim.models.local_rules.run`) trains them; the state includes BCM's threshold.
    ``data_dir`` is unused (the data come from the seed)."""
    from neurosim.models import local_rules as lr
    from neurosim.rng import component_rng
    from neurosim.simulator import shuffled_order

    name = settings["model"]["name"]
    task = lr._TASKS[name](settings)
    sim = lr.make_simulator(settings)
    rng = component_rng(SAMPLE_SEED, f"golden:ulp:{draw}")
    for proj in perturb:
        w = sim.buffer(f"{proj}.W")
        up = rng.random(w.shape) < 0.5
        moved = np.where(up, np.nextafter(w, np.float32(np.inf)),
                         np.nextafter(w, np.float32(-np.inf)))
        sim.set_weights(proj, np.where(w == 0, w, moved))
    names = state_names(sim) + [n for n in sim.plan.buffer_index if n.endswith(".theta")]
    initial = {n: sim.buffer(n) for n in names}
    tr = settings["training"]
    sim.set_lr(sim.plan.optimizer.lr_at(0))
    sim.set_epoch(0)
    order = shuffled_order(tr["seed"], 0, len(task.X))[: n_batches * tr["batch_size"]]
    sim.train(task.X, order=order, T=task.T, chunk=tr["chunk"])
    return sim, initial


def ulp_sensitivity(settings: dict, data_dir, final: dict, initial: dict,
                    train=train_minibatches, every_weight: bool = False) -> tuple[dict, list]:
    """How much the state after the minibatches moves when every weight that training changes
    starts one ulp away (random signs): per state buffer, the RMS of the deviation divided by the
    RMS of the change training made, the largest over :data:`ULP_DRAWS` independent sign draws
    (in rules with discrete choices a draw may or may not trigger one). It measures how the
    training map amplifies rounding-sized perturbations; tests/test_golden.py builds the
    tolerance on it. Returns that dict and each draw's largest value."""
    moved = [n[:-2] for n in initial                 # "<projection>.W" that training changes
             if n.endswith(".W") and (every_weight or not np.array_equal(final[n], initial[n]))]
    out: dict = {}
    per_draw = []
    for draw in range(ULP_DRAWS):
        sim, _ = train(settings, data_dir, perturb=moved, draw=draw)
        worst = 0.0
        for n, a0 in initial.items():
            change = final[n].astype(np.float64) - a0.astype(np.float64)
            scale = np.sqrt(np.mean(change * change))
            if scale > 0:
                dev = sim.buffer(n).astype(np.float64) - final[n].astype(np.float64)
                r = float(np.sqrt(np.mean(dev * dev)) / scale)
                out[n] = max(out.get(n, 0.0), r)
                worst = max(worst, r)
        per_draw.append(worst)
    return out, per_draw


def record_train(settings: dict, data_dir, accuracy: bool, sensitivity: bool = True,
                 train=train_minibatches, every_weight: bool = False):
    sim, initial = train(settings, data_dir)
    arrays: dict = {}
    final = {n: sim.buffer(n) for n in initial}
    for n, a0 in initial.items():
        _put(arrays, f"state/{n}", digest(final[n], a0))
    for key, tr in sim.traces.items():
        for field, v in tr.to_dict().items():
            _put(arrays, f"trace/{key}/{field}", digest(v))
    meta = {"n_batches": N_BATCHES, "batch_size": settings["training"]["batch_size"],
            "trials": sim.trial, "steps": sim.step, "state": list(initial),
            "traces": sorted(sim.traces)}
    if sensitivity:
        meta["ulp_sensitivity"], meta["ulp_sensitivity_draws"] = ulp_sensitivity(
            settings, data_dir, final, initial, train, every_weight)
    if accuracy:
        meta["accuracy"] = one_epoch(settings, data_dir)
    return arrays, meta


def one_epoch(settings: dict, data_dir) -> dict:
    """``neurosim run SCENARIO --set training.epochs=1 --set data.train_limit=2000`` (the
    standard loop; for FF the same factory its runner uses), plus the fragile test samples."""
    from neurosim import training

    s = copy.deepcopy(settings)
    s["training"]["epochs"] = 1
    s["data"]["train_limit"] = TRAIN_LIMIT
    made = []

    def factory(x):
        made.append(training.simulator_for(x))
        return made[-1]

    with tempfile.TemporaryDirectory() as tmp:
        summary = training.run(s, Path(tmp) / "run", data_dir=data_dir, progress=False,
                               log=lambda *a: None, simulator_factory=factory)
    sim = made[-1]
    _, x_test, y_test = training.load_data(s, data_dir)
    scores = (sim.goodness(x_test) if hasattr(sim, "goodness") and sim.classify == "goodness"
              else sim.outputs(x_test)).astype(np.float64)
    top = np.sort(scores, axis=1)
    margin = (top[:, -1] - top[:, -2]) / np.maximum(np.abs(top[:, -1]), 1e-30)
    out = {"test_accuracy": summary["final_test_accuracy"],
           "train_accuracy": summary.get("final_train_accuracy",
                                         summary.get("final_train_accuracy_running")),
           "n_test": int(len(y_test)), "n_train": summary["n_train"],
           "predictions_sha256": sha256(np.argmax(scores, axis=1).astype(np.int64)),
           "fragile": {f"{m:g}": int(np.sum(margin < m)) for m in FRAGILE_MARGINS},
           "overrides": ["training.epochs=1", f"data.train_limit={TRAIN_LIMIT}"]}
    ev = getattr(sim, "last_evaluation", None)
    if ev:
        out["ff_goodness_accuracy"] = ev["goodness"]
        out["ff_softmax_accuracy"] = ev.get("softmax")
    return out


def record_teacher_student(settings: dict) -> tuple[dict, dict]:
    from neurosim import teacher_student as ts
    from neurosim.models import teacher_student as tsm

    m = settings["model"]
    inst = tsm.make_instance(m)
    eta_v = m["eta_v"] if m["eta_v"] is not None else m["eta"]
    arrays: dict = {}
    rules = [m["rule"], "afa"] if m["rule"] == "pepita" and m["compare_afa"] else [m["rule"]]
    for rule in rules:
        run = ts.simulate(inst, rule, eta=m["eta"], eta_v=eta_v, sigma=m["sigma"],
                          times=np.array(TS_TIMES), seeds=m["seeds"], train_v=m["train_v"],
                          last_layer_error=m["last_layer_error"])
        for field in ("Q", "R", "v", "b", "eps_g"):
            _put(arrays, f"ts/{rule}.{field}", digest(np.asarray(getattr(run, field))))
        _put(arrays, f"ts/{rule}.steps", digest(np.asarray(run.steps)))
    meta = {"rules": rules, "times": list(TS_TIMES), "seeds": list(m["seeds"]), "N": inst.N,
            "note": "engine part only (neurosim.teacher_student.simulate); the ODEs are numpy"}
    return arrays, meta


def crosscheck_simulator(settings: dict):
    """The neurosim side of ``neurosim crosscheck``: batch 1, one per-step monitor per
    monitored (population, variable, phase); returns ``(sim, X, Y)`` with its seeded inputs."""
    from neurosim import Monitor, Simulator, compile_plan
    from neurosim import scenario as sc
    from neurosim.rng import component_rng

    circuit, protocol, _, output = sc.build(settings)
    phases = [p.name for p in protocol.phases]
    variables = []
    for m in settings["monitor"]:
        pop, _, var = m["target"].rpartition(".")
        for ph in ([m["phase"]] if m["phase"] else phases):
            if (pop, var, ph) not in variables:
                variables.append((pop, var, ph))
    mons = [Monitor(f"{p}.{v}", phase=ph, every=1, per="step", sample=0, name=f"{p}.{v}@{ph}")
            for p, v, ph in variables]
    seed = settings["training"]["seed"]
    plan = compile_plan(circuit, protocol, monitors=mons, batch=1, seed=seed, output=output)
    sim = Simulator(plan, threads=1)
    rng = component_rng(seed, "crosscheck:inputs")
    X = rng.random((XC_TRIALS, plan.view("stim.x").shape[1]), dtype=np.float32)
    Y = rng.integers(0, plan.view("stim.t").shape[1], size=XC_TRIALS).astype(np.int64)
    return sim, X, Y


def record_crosscheck(settings: dict) -> tuple[dict, dict]:
    sim, X, Y = crosscheck_simulator(settings)
    for k in range(XC_TRIALS):
        sim.train(X[k:k + 1], Y[k:k + 1])
    arrays: dict = {}
    for n, w in sim.weights.items():
        _put(arrays, f"state/{n}.W", digest(np.asarray(w)))
    for key, tr in sim.traces.items():
        for field, v in tr.to_dict().items():
            _put(arrays, f"trace/{key}/{field}", digest(v))
    meta = {"trials": XC_TRIALS, "traces": sorted(sim.traces),
            "note": "neurosim side of `neurosim crosscheck` (batch 1, seeded uniform inputs)"}
    return arrays, meta


def record(name: str, data: dict, accuracy: bool = True,
           sensitivity: bool = True) -> tuple[dict, dict] | None:
    """``(arrays, meta)`` of scenario ``name``; None if its data set is not found. Without
    ``accuracy`` / ``sensitivity`` the 1-epoch run / the ulp-perturbed run are left out (the
    golden test recomputes only the minibatches)."""
    settings = load_settings(name)
    kind = kind_of(settings)
    meta = {"format": FORMAT, "scenario": name, "kind": kind, "settings": settings,
            **environment()}
    if kind == "teacher_student":
        arrays, m = record_teacher_student(settings)
    elif kind == "crosscheck":
        arrays, m = record_crosscheck(settings)
    elif kind == "local":
        meta["command"] = (f"neurosim run scenarios/{name}.toml (first {N_BATCHES} minibatches "
                           "of epoch 0)")
        arrays, m = record_train(settings, None, False, sensitivity, train_local_minibatches,
                                 every_weight=True)
    else:
        dataset = settings["data"]["dataset"]
        d = find_data(dataset, data)
        if d is None:
            return None
        meta["dataset"] = dataset
        meta["command"] = (f"neurosim run scenarios/{name}.toml --data <{dataset} folder> "
                           f"(first {N_BATCHES} minibatches of epoch 0)")
        arrays, m = record_train(settings, d, accuracy, sensitivity)
    meta.update(m)
    return arrays, meta


def environment() -> dict:
    import numba

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "neurosim", "models"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    from neurosim import __version__

    blas = blas_cores()
    return {"neurosim": __version__, "neurosim_commit": commit, "numpy": np.__version__,
            "numba": numba.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "blas": blas, "blas_threads": 1}


def blas_cores() -> list:
    """The BLAS libraries loaded, each as "api version kernel-architecture" (e.g. "openblas 0.3.30
    SkylakeX"): GEMM bits depend on the kernel, so bitwise comparisons need the same one."""
    from threadpoolctl import threadpool_info

    return sorted({f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                   for i in threadpool_info() if i.get("user_api") == "blas"})


def write(name: str, arrays: dict, meta: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_npz(out / f"{name}.npz", arrays)
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


# -- the tolerance measurement --------------------------------------------------------------------
def measure(name: str, data: dict) -> None:
    """Print how far perturbed reruns of the minibatches move the state from the golden files, in
    units of the tolerance rho of tests/test_golden.py: the run as recorded (under another BLAS
    core, e.g. ``OPENBLAS_CORETYPE=Haswell``, that is a re-association of every GEMM),
    ``compile_plan(fuse=False)``, without drive reuse (``optimize={"drive_reuse": False}``),
    ``training.threads = 2``, and the learning rate times 1.001
    and 1.01 (real changes the tolerance should see)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_golden as tg

    settings = load_settings(name)
    if kind_of(settings) != "train":
        print(f"{name}: --measure covers the trained scenarios only")
        return
    d = find_data(settings["data"]["dataset"], data)
    if d is None:
        print(f"{name}: data set not found, skipped")
        return
    gold = read_npz(GOLDEN / f"{name}.npz")
    gmeta = json.loads((GOLDEN / f"{name}.json").read_text())
    rho = tg.state_tolerance(settings, gmeta)
    lr = settings["training"]["lr"]
    variants = {"as recorded": ([], contextlib.nullcontext), "fuse=False": ([], unfused),
                "no drive reuse": ([], without_drive_reuse),
                "threads=2": (["training.threads=2"], contextlib.nullcontext),
                "lr x 1.001": ([f"training.lr={lr * 1.001!r}"], contextlib.nullcontext),
                "lr x 1.01": ([f"training.lr={lr * 1.01!r}"], contextlib.nullcontext)}
    for label, (overrides, ctx) in variants.items():
        with ctx():
            sim, initial = train_minibatches(load_settings(name, overrides), d)
        arrays: dict = {}
        for n, a0 in initial.items():
            _put(arrays, f"state/{n}", digest(sim.buffer(n), a0))
        new = group(arrays, "state")
        same = all(n in new and tg._same_bits(new[n], g) for n, g in group(gold, "state").items())
        _, devs = tg.check_state(arrays, gold, rho)
        worst = max(devs.items(), key=lambda kv: kv[1], default=("-", 0.0))
        print(f"{name:22s} {label:12s} bitwise {'yes' if same else 'no ':3s} largest deviation "
              f"{worst[1]:9.3g} rho in {worst[0]:16s} (rho = {rho:.3g})", flush=True)


# -- command line ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenarios", nargs="*", help="scenario names (default: all in scenarios/)")
    p.add_argument("--mnist", help="folder with the four MNIST IDX files")
    p.add_argument("--fashion-mnist", help="folder with the four Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(GOLDEN), help="output folder (default tests/golden)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the 1-epoch accuracy runs")
    p.add_argument("--measure", action="store_true", help="measure deviations of re-associated "
                   "runs from the golden files (writes nothing)")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    data = {"mnist": args.mnist, "fashion-mnist": args.fashion_mnist}
    names = args.scenarios or scenario_names()
    unknown = sorted(set(names) - set(scenario_names()))
    if unknown:
        p.error(f"no scenario {unknown} in {SCENARIOS} (has {scenario_names()})")
    t_all = time.perf_counter()
    with threadpool_limits(limits=1):       # numpy references and teacher: one BLAS thread
        for name in names:
            t0 = time.perf_counter()
            if args.measure:
                measure(name, data)
                continue
            got = record(name, data, accuracy=not args.no_accuracy)
            if got is None:
                print(f"{name}: data set not found, skipped", flush=True)
                continue
            arrays, meta = got
            write(name, arrays, meta, Path(args.out))
            acc = meta.get("accuracy", {}).get("test_accuracy")
            print(f"{name}: {meta['kind']}, {len(arrays)} arrays"
                  + (f", 1-epoch test accuracy {acc:.4f}" if acc is not None else "")
                  + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"total {time.perf_counter() - t_all:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
