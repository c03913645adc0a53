"""Saving and loading simulators, and opening the folders of ``neurosim run``.

A saved simulator is one ``.npz`` file (no pickle) holding:

* the plan's **description**: circuit, protocol, rules, optimizer, monitors and the compile
  arguments (batch, seed, output, targets, fuse, optimize), as JSON written generically from
  the frozen dataclasses, each object tagged with the name of its type in a registry of allowed
  types (:func:`register_type`); arrays inside descriptions (``Given`` weights, biases) are
  members of the file. Loading rebuilds the descriptions and compiles the plan again;
* the state **by name**: every buffer of the arena except constants (weights, optimizer and
  rule state, statistics, held rates, stimuli, scratch), the scalar slots (learning rate, epoch
  gates), the counters (trial, step, epoch) and the monitor records; loading checks names and
  shapes, not arena offsets;
* the simulator's class (``Simulator`` or a registered subclass such as Forward-Forward's
  ``FFSimulator``, with the constructor arguments it names in ``save_args``), its backend and
  threads;
* a fingerprint of the compiled plan (layout, programs, constants), checked against the plan
  compiled on load, and a SHA-256 over every member, checked before anything is rebuilt.

A loaded simulator continues bit-identically: training more minibatches gives the same bits as
the original continuing. :func:`load_run` opens a run directory of ``neurosim run`` at its last
checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import NeurosimWarning, ValidationError

FORMAT = "neurosim-simulator"
FORMAT_VERSION = 1
_SAVED_KINDS = ("weight", "optimizer", "rule", "stats", "state", "stimulus", "scratch")
"""Buffer kinds a file holds; constants are compiled again (and covered by the fingerprint)."""
_PERSISTENT = ("weight", "optimizer", "rule", "stats")
"""Kinds that must be found, by name and shape, in the plan compiled on load."""

# -- the type registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, type] = {}
_NAMES: dict[type, str] = {}


def register_type(cls, name: str | None = None):
    """Allow instances of ``cls`` in saved simulators (usable as a class decorator).

    ``cls`` is a dataclass whose constructor accepts its fields as keyword arguments (rules,
    monitors, initialisers, populations, network records), or a :class:`~neurosim.Simulator`
    subclass whose ``save_args`` names the keyword arguments of its constructor to record (read
    from the attributes of the same name). ``name`` (default: the class name) is what files
    store; register the type in the module that defines it, so that loading finds it too.

    neurosim's own descriptions (populations, projections, phases, protocols, initialisers,
    rules, monitors and the optimizer, including those of ``neurosim.models``) need no
    registration.
    """
    from .simulator import Simulator

    if not isinstance(cls, type) or not (dataclasses.is_dataclass(cls)
                                         or issubclass(cls, Simulator)):
        raise ValidationError("register_type.cls", f"got {cls!r}, expected a dataclass or a "
                              "Simulator subclass.")
    name = cls.__name__ if name is None else name
    if not isinstance(name, str) or not name or name.startswith("$"):
        raise ValidationError("register_type.name", f"got {name!r}, expected a non-empty name.")
    if _REGISTRY.get(name, cls) is not cls:
        other = _REGISTRY[name]
        raise ValidationError("register_type.name", f"{name!r} is already registered for "
                              f"{other.__module__}.{other.__qualname__}.",
                              f"register {cls.__qualname__} under another name: "
                              f"register_type({cls.__qualname__}, name='...').")
    _REGISTRY[name] = cls
    _NAMES[cls] = name
    return cls


def _discover() -> None:
    """Register neurosim's own description types: the fixed ones, and every public dataclass
    subclass of the description bases defined in a ``neurosim`` module (so rules added later
    need no list kept in step)."""
    from .circuit import Circuit, ErrorPopulation, Population, Projection
    from .init import AbstractInit
    from .monitors import AbstractMonitor, Monitor
    from .plasticity.base import PlasticityRule
    from .plasticity.optim import SGD
    from .protocol import Phase, Protocol
    from .simulator import Simulator
    from . import diagnostics, plasticity  # noqa: F401  (defines the rules and monitors)

    if Circuit not in _NAMES:   # not a dataclass: written as its populations and projections
        _REGISTRY["Circuit"], _NAMES[Circuit] = Circuit, "Circuit"
    for cls in (Population, ErrorPopulation, Projection, Phase, Protocol, Monitor, SGD,
                Simulator):
        if cls not in _NAMES:
            register_type(cls)
    todo = [PlasticityRule, AbstractInit, AbstractMonitor, Population]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if (sub not in _NAMES and dataclasses.is_dataclass(sub)
                    and sub.__module__.startswith("neurosim.")
                    and not sub.__name__.startswith("_")):
                register_type(sub)


def _name_of(cls) -> str | None:
    if cls not in _NAMES:
        _discover()
    return _NAMES.get(cls)


def _type_named(name: str):
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        import neurosim.models  # noqa: F401  (defines and registers the models' types)

        _discover()
    return _REGISTRY.get(name)


# -- descriptions <-> JSON ---------------------------------------------------------------------
class _Encoder:
    """Descriptions to JSON values; arrays go to ``arrays``; an object met again becomes a
    reference to its first occurrence (the FF network shares the plan's circuit)."""

    def __init__(self, where: str):
        self.where = where
        self.arrays: dict[str, np.ndarray] = {}
        self._ids: dict[int, int] = {}
        self._keep: list = []

    def __call__(self, x, path: str):
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (np.ndarray, np.generic)):
            key = f"desc.{len(self.arrays)}"
            self.arrays[key] = np.array(x)
            return {"$array": key, "scalar": isinstance(x, np.generic)}
        if type(x) is int:
            return x
        if type(x) is float:
            return x if math.isfinite(x) else {"$float": repr(x)}
        if type(x) is list:
            return [self(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if type(x) is tuple:
            return {"$tuple": [self(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if type(x) is dict:
            return {"$dict": [[self(k, f"{path} key"), self(v, f"{path}[{k!r}]")]
                              for k, v in x.items()]}
        if id(x) in self._ids:
            return {"$ref": self._ids[id(x)]}
        name = _name_of(type(x))
        if name is None or (not dataclasses.is_dataclass(x) and name != "Circuit"):
            t = type(x)
            raise ValidationError(
                self.where, f"{path} is a {t.__module__}.{t.__qualname__}, which is not a "
                "registered description type, so it cannot be written to a file.",
                f"make it a frozen dataclass and call neurosim.register_type({t.__qualname__}) "
                "in the module that defines it (loading needs that module imported).")
        if name == "Circuit":
            fields = {"name": x.name,
                      "populations": [self(p, f"{path}.populations[{p.name!r}]")
                                      for p in x.populations.values()],
                      "projections": [self(p, f"{path}.projections[{p.name!r}]")
                                      for p in x.projections.values()]}
        else:
            fields = {f.name: self(getattr(x, f.name), f"{path}.{f.name}")
                      for f in dataclasses.fields(x) if f.init}
        n = len(self._ids)
        self._ids[id(x)] = n
        self._keep.append(x)
        return {"$type": name, "$id": n, "fields": fields}


class _Decoder:
    def __init__(self, where: str, arrays: dict):
        self.where = where
        self.arrays = arrays
        self._objs: dict[int, object] = {}

    def __call__(self, v, path: str):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self(x, f"{path}[{i}]") for i, x in enumerate(v)]
        if not isinstance(v, dict):
            raise ValueError(f"{path}: unexpected JSON value {v!r:.60}")
        if "$float" in v:
            return float(v["$float"])
        if "$tuple" in v:
            return tuple(self(x, f"{path}[{i}]") for i, x in enumerate(v["$tuple"]))
        if "$dict" in v:
            return {self(k, path): self(x, f"{path}[{k!r}]") for k, x in v["$dict"]}
        if "$array" in v:
            a = self.arrays[v["$array"]]
            return a[()] if v["scalar"] else a.copy()
        if "$ref" in v:
            return self._objs[v["$ref"]]
        name = v["$type"]
        cls = _type_named(name)
        if cls is None:
            raise ValidationError(self.where, f"{path} is of type {name!r}, which is not "
                                  "registered in this process.",
                                  "import the module that defines it and registers it with "
                                  "neurosim.register_type before loading.")
        kw = {k: self(x, f"{path}.{k}") for k, x in v["fields"].items()}
        try:
            if name == "Circuit":
                obj = cls(kw["name"])
                for item in kw["populations"] + kw["projections"]:
                    obj.add(item)
            else:
                obj = cls(**kw)
        except (ValidationError, TypeError) as e:
            raise ValidationError(self.where, f"cannot rebuild {path} ({name}): "
                                  f"{type(e).__name__}: {e}",
                                  "the file was written by another version of that type.") from None
        self._objs[v["$id"]] = obj
        return obj


def describe(plan, where: str = "describe") -> tuple[dict, dict]:
    """The plan's description as a JSON-ready dict and the arrays it refers to (what
    :meth:`Simulator.save` writes; :func:`compile_description` reverses it)."""
    enc = _Encoder(where)
    desc = {"circuit": enc(plan.circuit, "plan.circuit"),
            "protocol": enc(plan.protocol, "plan.protocol"),
            "rules": enc(tuple(plan.rules), "plan.rules"),
            "optimizer": enc(plan.optimizer, "plan.optimizer"),
            "monitors": enc(tuple(plan.monitors), "plan.monitors"),
            "batch": int(plan.batch), "seed": int(plan.seed), "output": plan.output,
            "targets": plan.targets, "fuse": bool(getattr(plan, "fuse", True)),
            "optimize": dict(getattr(plan, "optimize", {}))}
    return desc, enc


# -- the plan fingerprint -------------------------------------------------------------------------
def plan_fingerprint(plan) -> str:
    """SHA-256 of what a compiled plan runs: buffer table (names, kinds, shapes, offsets),
    counter-RNG keys, scalar slots, every program, monitor layouts and constant values. Two
    plans with the same fingerprint run the same operations on the same layout."""
    h = hashlib.sha256()

    def put(*parts):
        for p in parts:
            h.update(p.tobytes() if isinstance(p, np.ndarray) else repr(p).encode())
            h.update(b"\0")

    put(plan.batch, plan.seed, plan.output, plan.error, plan.targets, tuple(plan.plastic),
        sorted(plan.stimuli.items()), np.ascontiguousarray(plan.bufs), np.asarray(plan.keys))
    put(sorted(plan.buffer_index.items()), sorted(plan.buffer_kind.items()))
    put(sorted(plan.scalar_index.items()), np.asarray(plan.scalar_init))
    progs = [("train", plan.train), ("infer", plan.infer)] + sorted(plan.free.items())
    for name, p in progs:
        put(name, p.prog, p.fprm, p.blocks, p.steps_per_trial, tuple(p.block_sections))
    put(json.dumps(list(plan.monitor_meta), sort_keys=True, default=repr))
    for name in sorted(plan.names_of_kind("constant")):
        put(name, np.ascontiguousarray(plan.view(name)))
    return h.hexdigest()


# -- save -----------------------------------------------------------------------------------------
def _checksum(arrays: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_simulator(sim, path) -> Path:
    """Write ``sim`` to ``path`` (see the module docstring); returns the path. The file is
    written to a temporary name and renamed, so a failed save never leaves a partial file."""
    path = Path(path)
    where = f"Simulator.save({str(path)!r})"
    cls_name = _name_of(type(sim))
    if cls_name is None:
        t = type(sim)
        raise ValidationError(where, f"the simulator is a {t.__module__}.{t.__qualname__}, "
                              "which is not registered.",
                              f"set {t.__qualname__}.save_args to the constructor arguments to "
                              f"record and call neurosim.register_type({t.__qualname__}).")
    plan = sim.plan
    desc, enc = describe(plan, where)
    fingerprint = plan_fingerprint(plan)
    _check_recompiles(desc, enc.arrays, fingerprint, where)
    sim_args = {a: enc(getattr(sim, a), f"simulator.{a}") for a in type(sim).save_args}
    arrays = dict(enc.arrays)
    buffers = []
    for name, kind in plan.buffer_kind.items():
        if kind not in _SAVED_KINDS:
            continue
        key = f"buffer.{len(buffers)}"
        arrays[key] = sim.view(name).copy()
        buffers.append([name, kind, key])
    scalars = sorted(plan.scalar_index, key=plan.scalar_index.get)
    arrays["scalars"] = np.array([sim.scal[plan.scalar_index[n]] for n in scalars], np.float64)
    records = []
    for k, chunks in sim._records.items():
        meta = next(m for m in plan.monitor_meta if m["key"] == k)
        vals = (np.concatenate([c[0] for c in chunks]) if chunks
                else np.zeros((0, meta["size"]), np.float32))
        stamps = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0, 2), np.int64)
        i = len(records)
        arrays[f"record.{i}.values"], arrays[f"record.{i}.stamps"] = vals, stamps
        records.append(k)
    from . import __version__

    header = {"format": FORMAT, "version": FORMAT_VERSION, "neurosim_version": __version__,
              "simulator": {"type": cls_name, "args": sim_args},
              "backend": getattr(sim.backend, "name", type(sim.backend).__name__),
              "threads": int(sim.threads),
              "plan": desc, "fingerprint": fingerprint,
              "counters": {"trial": int(sim.trial), "step": int(sim.step),
                           "epoch": int(sim.epoch)},
              "buffers": buffers, "scalars": scalars, "records": records}
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    arrays["sha256"] = np.frombuffer(_checksum(arrays).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write(path, buf.getvalue())
    return path


def _check_recompiles(desc, arrays, fingerprint, where) -> None:
    """Compile the description as a load would and compare fingerprints, so that a file that
    saves also loads: this catches a circuit changed after ``compile_plan`` and a registered type
    whose fields do not rebuild it."""
    try:
        plan, _ = compile_description(json.loads(json.dumps(desc)), arrays, where)
    except ValidationError as e:
        raise ValidationError(where, f"the plan's description does not compile again: "
                              f"{e.where}: {e.message}", e.hint) from None
    if plan_fingerprint(plan) != fingerprint:
        raise ValidationError(where, "the plan's description (circuit, protocol, rules, "
                              "monitors) compiles to another plan than the simulator's: was a "
                              "description changed after compile_plan, or does a registered type "
                              "not rebuild from its fields?",
                              "compile the plan again from the current descriptions and save a "
                              "simulator of that plan.")


# -- load -----------------------------------------------------------------------------------------
def _read(path: Path, where: str) -> tuple[dict, dict]:
    """(header, arrays) of a saved simulator, checked against its SHA-256."""
    if not path.is_file():
        raise ValidationError(where, f"no file {str(path)!r}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}   # reads (and CRC-checks) every member
    except Exception as e:  # not a zip/npz, truncated, corrupt member, object arrays
        raise ValidationError(where, f"cannot read {str(path)!r} as a saved simulator "
                              f"({type(e).__name__}: {e}); it is corrupt, truncated or not an "
                              ".npz file.") from None
    if "header" not in arrays or "sha256" not in arrays:
        what = ("a training checkpoint of `neurosim run`" if "mem" in arrays and "scenario_hash"
                in arrays else "an .npz file of something else")
        raise ValidationError(where, f"{str(path)!r} is {what}, not a saved simulator.",
                              "open a run directory with neurosim.load_run(run_dir)"
                              if "mem" in arrays else "give a file written by Simulator.save.")
    want = bytes(arrays.pop("sha256")).decode(errors="replace")
    if _checksum(arrays) != want:
        raise ValidationError(where, f"the SHA-256 of {str(path)!r} does not match the one it "
                              "records: the file is corrupt or was modified.")
    try:
        header = json.loads(bytes(arrays["header"]).decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValidationError(where, f"the header of {str(path)!r} is not valid JSON ({e}).") \
            from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValidationError(where, f"{str(path)!r} is not a saved simulator (format "
                              f"{header.get('format') if isinstance(header, dict) else None!r}).")
    if header.get("version", 0) > FORMAT_VERSION:
        raise ValidationError(where, f"the file has format version {header['version']}; this "
                              f"neurosim reads up to {FORMAT_VERSION}.",
                              "load it with the neurosim version that wrote it "
                              f"({header.get('neurosim_version')}) or newer.")
    return header, arrays


def compile_description(desc: dict, arrays: dict, where: str = "compile_description"):
    """Rebuild the descriptions written by :func:`describe` and compile them; returns
    ``(plan, decoder)`` (the decoder resolves later references to the same objects)."""
    from .compiler import compile_plan

    dec = _Decoder(where, arrays)
    with warnings.catch_warnings():
        # the descriptions warned (bare times, deprecated arguments) when they were first made
        warnings.simplefilter("ignore", NeurosimWarning)
        parts = {k: dec(desc[k], f"plan.{k}")
                 for k in ("circuit", "protocol", "rules", "optimizer", "monitors")}
    plan = compile_plan(parts["circuit"], parts["protocol"], rules=list(parts["rules"]),
                        optimizer=parts["optimizer"], monitors=list(parts["monitors"]),
                        batch=desc["batch"], seed=desc["seed"], output=desc["output"],
                        targets=desc["targets"], fuse=desc["fuse"],
                        optimize=_optimize_of(desc))
    return plan, dec


def _optimize_of(desc: dict) -> dict:
    """The passes a saved plan was compiled with. A file written before ``optimize`` existed
    (only ``fuse``) was compiled without the passes added since (drive reuse), so they stay off
    and the plan compiles to the same fingerprint."""
    from .compiler import PASSES

    saved = desc.get("optimize")
    if saved is None:
        return {"drive_reuse": False}
    return {k: bool(v) for k, v in saved.items() if k in PASSES}


def load_simulator(path, *, expected=None, threads: int | None = None,
                   backend: str | None = None, strict: bool = True):
    """Read a file written by :meth:`Simulator.save` and return the simulator, continuing
    where the saved one was. ``threads`` and ``backend`` default to the saved ones.

    With ``strict`` (default) the plan compiled now must have the saved plan's fingerprint
    (same layout, programs and constants), so that continuing is bit-identical; a file written
    by another neurosim version whose compiler differs then raises, and ``strict=False``
    restores the state by name into the plan compiled now (buffers of the kinds weight,
    optimizer, rule and stats must still match by name and shape; others the new plan lacks or
    adds keep their initial values)."""
    path = Path(path)
    where = str(path)
    header, arrays = _read(path, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NeurosimWarning)
            plan, dec = compile_description(header["plan"], arrays, where)
            sim_info = header["simulator"]
            cls = _type_named(sim_info["type"])
            if cls is None:
                raise ValidationError(where, f"the simulator class {sim_info['type']!r} is not "
                                      "registered in this process.",
                                      "import the module that defines it before loading.")
            kwargs = {k: dec(v, f"simulator.{k}") for k, v in sim_info["args"].items()}
    except ValidationError as e:
        if e.where == where:
            raise
        raise ValidationError(where, f"the saved description does not compile: {e.where}: "
                              f"{e.message}", e.hint) from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValidationError(where, f"the description in the file is malformed "
                              f"({type(e).__name__}: {e}).") from None
    if expected is not None and not issubclass(cls, expected):
        raise ValidationError(where, f"the file holds a {cls.__name__}, not a "
                              f"{expected.__name__}.", f"load it with {cls.__name__}.load or "
                              "neurosim.Simulator.load.")
    if strict and plan_fingerprint(plan) != header["fingerprint"]:
        raise ValidationError(where, "the plan compiled from the saved description differs "
                              "from the saved plan (written by neurosim "
                              f"{header.get('neurosim_version')}), so continuing would not be "
                              "bit-identical.", "pass strict=False to restore the state by name "
                              "into the plan this version compiles.")
    try:
        sim = cls(plan, threads=header["threads"] if threads is None else threads,
                  backend=header["backend"] if backend is None else backend, **kwargs)
        _restore(sim, header, arrays, where, strict)
    except ValidationError as e:
        if e.where == where:
            raise
        raise ValidationError(where, f"{e.where}: {e.message}", e.hint) from None
    except (KeyError, TypeError, ValueError) as e:
        raise ValidationError(where, f"the state in the file is malformed "
                              f"({type(e).__name__}: {e}).") from None
    return sim


def _restore(sim, header, arrays, where, strict):
    plan = sim.plan
    seen = set()
    for name, kind, key in header["buffers"]:
        a = arrays[key]
        if name not in plan.buffer_index or plan.buffer_kind[name] != kind:
            if kind in _PERSISTENT or strict:
                raise ValidationError(where, f"the file has the {kind} buffer {name!r}, which "
                                      "the compiled plan lacks.")
            continue
        v = sim.view(name)
        if v.shape != a.shape:
            if kind in _PERSISTENT or strict:
                raise ValidationError(where, f"buffer {name!r}: shape {a.shape} in the file, "
                                      f"{v.shape} in the compiled plan.")
            continue
        v[...] = a
        seen.add(name)
    missing = [n for n in plan.names_of_kind(*_PERSISTENT) if n not in seen]
    if missing:
        raise ValidationError(where, f"the file lacks the buffers {missing} of the compiled plan.")
    for i, name in enumerate(header["scalars"]):
        if name not in plan.scalar_index:
            raise ValidationError(where, f"the file has the scalar slot {name!r}, which the "
                                  "compiled plan lacks.")
        sim.scal[plan.scalar_index[name]] = arrays["scalars"][i]
    c = header["counters"]
    sim.trial, sim.step, sim.epoch = int(c["trial"]), int(c["step"]), int(c["epoch"])
    keys = {m["key"] for m in plan.monitor_meta}
    for i, key in enumerate(header["records"]):
        if key not in keys:
            raise ValidationError(where, f"the file has records of monitor {key!r}, which the "
                                  f"compiled plan lacks (has {sorted(keys)}).")
        vals, stamps = arrays[f"record.{i}.values"], arrays[f"record.{i}.stamps"]
        sim._records[key] = [(vals, stamps)] if len(vals) else []


# -- run directories ------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedRun:
    """A run directory of ``neurosim run`` opened at its last checkpoint (:func:`load_run`).

    Attributes
    ----------
    path : the run directory
    settings : the run's resolved scenario (``scenario.toml``, validated)
    metrics : one dict per epoch, from ``metrics.csv`` (numbers as float, ``epoch`` as int,
        empty cells as None)
    summary : ``summary.json`` (None if absent)
    simulator : the simulator at the last checkpoint, with the learning rate and epoch
        schedules of the next epoch set (``simulator.epoch`` = epochs done)
    checkpoint : the checkpoint file it was loaded from
    epochs_done : epochs in that checkpoint
    """

    path: Path
    settings: dict
    metrics: list
    summary: dict | None
    simulator: object
    checkpoint: Path
    epochs_done: int

    def load_data(self, data_dir=None):
        """The run's data: ``(dataset, x_test, y_test)`` (:func:`neurosim.training.load_data`;
        ``data_dir`` default: the run's ``data.dir``)."""
        from . import training

        return training.load_data(self.settings, data_dir)

    def train_epoch(self, x_train, y_train) -> int:
        """Train the next epoch as ``neurosim run`` would (its learning rate, epoch schedules
        and training order), leaving the simulator ready for the epoch after; returns the
        number of epochs done. Metrics and checkpoints are not written."""
        from .simulator import shuffled_order

        sim, tr = self.simulator, self.settings["training"]
        epoch = sim.epoch
        _enter_epoch(sim, epoch)
        if "stats.correct" in sim.plan.buffer_index:
            sim.view("stats.correct")[...] = 0
        sim.train(x_train, y_train, shuffled_order(tr["seed"], epoch, len(x_train)),
                  chunk=tr["chunk"])
        _enter_epoch(sim, epoch + 1)
        return epoch + 1


def _enter_epoch(sim, epoch: int) -> None:
    if sim.plan.optimizer is not None:
        sim.set_lr(sim.plan.optimizer.lr_at(epoch))
    sim.set_epoch(epoch)


def _metric(key, value):
    if value in ("", None):
        return None
    if key == "epoch":
        return int(value)
    try:
        return float(value)
    except ValueError:
        return value


def load_run(run_dir, *, overrides=(), data_dir=None) -> LoadedRun:
    """Open a run directory of ``neurosim run``: its scenario, its metrics and a simulator at
    the last checkpoint, ready for ``evaluate``, ``predict`` or more training
    (:meth:`LoadedRun.train_epoch`).

    ``overrides`` (``"section.key=value"``) may change settings that do not change what the
    run computes (``training.epochs``, ``training.threads``, ``training.backend``); others make
    the checkpoint's scenario check fail. ``data_dir`` is not read here; it only replaces
    ``data.dir`` in the returned settings."""
    from . import scenario as sc
    from . import training

    run = Path(run_dir)
    where = f"load_run({str(run_dir)!r})"
    if not run.is_dir():
        raise ValidationError(where, f"{str(run)!r} is not a directory.",
                              "give the --out folder of a `neurosim run`.")
    if not (run / "scenario.toml").is_file():
        raise ValidationError(where, f"{str(run)!r} has no scenario.toml, so it is not the "
                              "folder of a `neurosim run`.",
                              "give the --out folder of a `neurosim run`.")
    settings = sc.load(run / "scenario.toml", overrides)
    if data_dir is not None:
        settings["data"]["dir"] = str(Path(data_dir))
    if sc.runner_for(settings) is not None and sc.simulator_for(settings) is None:
        raise ValidationError(where, f"the run is of model {settings['model']['name']!r}, which "
                              "has its own runner and writes no simulator checkpoints.",
                              "read its output files directly.")
    ck = training.latest_checkpoint(run)
    if ck is None:
        raise ValidationError(where, f"{str(run)!r} holds no checkpoint: the run did not "
                              "complete an epoch.", "resume it with `neurosim run --resume`.")
    summary = None
    if (run / "summary.json").is_file():
        try:
            summary = json.loads((run / "summary.json").read_text())
        except ValueError as e:
            raise ValidationError(str(run / "summary.json"), f"not valid JSON ({e}).") from None
    metrics = []
    if (run / "metrics.csv").is_file():
        with open(run / "metrics.csv", newline="") as f:
            metrics = [{k: _metric(k, v) for k, v in row.items()} for row in csv.DictReader(f)]
    # the run compiled its monitors for the training set it had (intervals in epochs)
    n_train = (summary or {}).get("n_train")
    sim = training.simulator_for(settings, n_train)
    epochs_done, _ = training.load_checkpoint(ck, sim, settings)
    _enter_epoch(sim, epochs_done)
    return LoadedRun(run, settings, metrics, summary, sim, ck, epochs_done)
