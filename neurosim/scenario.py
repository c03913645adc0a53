"""Scenario files: TOML -> validated settings, with key-path errors.

A scenario has the sections ``[model]``, ``[data]``, ``[training]``, ``[simulation]`` and an
optional array ``[[monitor]]``. Every key is checked against :data:`SCHEMA` (unknown keys, wrong
types and bad values raise :class:`ValidationError` naming ``section.key``). ``--set
section.key=value`` overrides use the same checks. Models register a builder with
:func:`register_model`.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import sys
import warnings
from pathlib import Path

from .errors import BareTimeWarning, ValidationError
from .units import BARE_TIME_WARN_S, is_bare_number, to_seconds

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_MODELS: dict = {}


def register_model(name: str, schema: dict, builder, runner=None, simulator=None):
    """Register a model: ``schema`` lists its ``[model]`` keys as ``key: (kind, default)``;
    ``builder(settings) -> (circuit, protocol, rules, output)``.

    ``simulator(settings) -> Simulator``: the model's own simulator factory, for models that
    compile with their own optimizer or monitors or evaluate differently (Forward-Forward);
    default :func:`neurosim.training.make_simulator`. ``neurosim run``, ``validate`` and
    ``sweep`` use it. A model whose runs are not "train a classifier on a dataset" (e.g. the
    teacher-student setting) also gives ``runner(settings, out_dir, data_dir=None,
    resume=False, progress=True) -> summary dict``, which ``neurosim run`` then calls instead of
    the standard training loop."""
    _MODELS[name] = (schema, builder, runner, simulator)


def runner_for(settings: dict):
    """The model's own runner, or None for the standard training loop."""
    return _models()[settings["model"]["name"]][2]


def simulator_for(settings: dict):
    """The model's simulator factory, or None for :func:`neurosim.training.make_simulator`."""
    return _models()[settings["model"]["name"]][3]


def _models():
    if not _MODELS:
        import neurosim.models  # noqa: F401  (registers the ready-made models)
    return _MODELS


# kind: "int+", "int0", "float+", "float0", "prob", "bool", "str", "time", "list[int]", "pairs", "every",
# choice tuple
SCHEMA = {
    "name": ("str", "scenario"),
    "description": ("str", ""),
    "data": {
        "dataset": (("mnist", "fashion-mnist", "cifar10", "cifar100"), "mnist"),
        "train_limit": ("int+?", None),
        "test_limit": ("int+?", None),
        "dir": ("str?", None),
        "verify": ("bool", True),
    },
    "training": {
        "epochs": ("int+", 1),
        "batch_size": ("int+", 64),
        "lr": ("float+", 0.1),
        "momentum": ("mom", 0.9),
        "weight_decay": ("float0", 0.0),
        "optimizer": (("reference", "torch"), "reference"),
        "milestones": ("list[int]", []),
        "gamma": ("float+", 0.1),
        "schedule": (("step", "linear_decay"), "step"),
        "decay_start": ("prob", 0.5),
        "max_weight": ("float+", 1e4),
        "seed": ("int0", 0),
        "threads": ("int+", 1),
        "backend": (("numba", "numpy"), "numba"),
        "eval_every": ("int+", 1),
        "train_eval": ("int0", 0),
        "keep_checkpoints": ("int+", 2),
        "chunk": ("int+", 32),
    },
    "simulation": {
        "mode": (("steady", "time"), "steady"),
        "dt": ("time", 1e-3),
        "tau": ("time", 0.01),
        "phase_duration": ("time", 0.1),
        "method": (("euler", "exp_euler"), "euler"),
    },
}
MONITOR_SCHEMA = {"target": ("str", None), "phase": ("str?", None), "every": ("every", 1),
                  "per": (("step", "trial", None), None), "units": ("list[int]?", None),
                  "sample": ("sample", 0), "name": ("str?", None),
                  "synapses": ("pairs?", None)}


def _check(kind, value, where):
    optional = isinstance(kind, str) and kind.endswith("?")
    if optional:
        if value is None:
            return None
        kind = kind[:-1]
    if isinstance(kind, tuple):
        if value not in kind:
            close = difflib.get_close_matches(str(value), [str(k) for k in kind if k], n=1)
            raise ValidationError(where, f"got {value!r}, expected one of "
                                  f"{[k for k in kind if k is not None]}.",
                                  f"did you mean {close[0]!r}?" if close else None)
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise ValidationError(where, f"got {type(value).__name__} {value!r}, expected a string.")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValidationError(where, f"got {value!r}, expected true or false.")
        return value
    if kind in ("int+", "int0"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(where, f"got {type(value).__name__} {value!r}, expected an integer.")
        low = 1 if kind == "int+" else 0
        if value < low:
            raise ValidationError(where, f"got {value}, expected an integer >= {low}.")
        return value
    if kind in ("float+", "float0", "mom", "prob"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(where, f"got {type(value).__name__} {value!r}, expected a number.")
        try:
            v = float(value)
        except OverflowError:
            v = math.inf
        if not math.isfinite(v):
            raise ValidationError(where, f"got {value!r}, expected a finite number.")
        if kind == "float+" and v <= 0:
            raise ValidationError(where, f"got {v}, expected a number > 0.")
        if kind == "float0" and v < 0:
            raise ValidationError(where, f"got {v}, expected a number >= 0.")
        if kind in ("mom", "prob") and not 0 <= v < 1:
            raise ValidationError(where, f"got {v}, expected a number in [0, 1).")
        return v
    if kind == "time":
        try:
            seconds = to_seconds(value, where, allow_zero=False)
        except OverflowError:  # float() of a huge integer inside a unit string
            raise ValidationError(where, f"got {value!r}, expected a finite time.") from None
        if seconds >= BARE_TIME_WARN_S and is_bare_number(value):
            warnings.warn(f"{where}: the bare number {value!r} is read as {seconds:g} s (times "
                          f"without a unit are in seconds). Write \"{value} ms\" if you meant "
                          f"milliseconds, or \"{value} s\" to keep seconds and silence this warning.",
                          BareTimeWarning, stacklevel=2)
        return seconds
    if kind == "every":
        if isinstance(value, str):
            if epochs_of(value) is None:
                raise ValidationError(where, f"got {value!r}, expected a whole number of trials "
                                      "(minibatches) or a positive number of epochs such as "
                                      "\"0.1 epoch\".")
            return value
        return _check("int+", value, where)
    if kind == "list[int]":
        if not isinstance(value, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
            raise ValidationError(where, f"got {value!r}, expected a list of non-negative integers.")
        return list(value)
    if kind == "pairs":
        if not isinstance(value, list) or not value or not all(
                isinstance(p, list) and len(p) == 2 and all(
                    isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)
                for p in value):
            raise ValidationError(where, f"got {value!r}, expected a list of [post, pre] index "
                                  "pairs, e.g. [[0, 0], [3, 12]].")
        return [list(p) for p in value]
    if kind == "sample":
        if value == "mean":
            return value
        return _check("int0", value, where)
    raise ValidationError(where, f"internal: unknown kind {kind!r}")  # pragma: no cover


_EPOCHS = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*epochs?\s*$")


def epochs_of(every):
    """The number of epochs of a monitor interval written in epochs (``"0.1 epoch"``,
    ``"2 epochs"``): a finite float > 0; None for anything else (an int counts trials)."""
    m = _EPOCHS.match(every) if isinstance(every, str) else None
    if m is None:
        return None
    x = float(m.group(1))
    return x if math.isfinite(x) and x > 0 else None


# training-set sizes of the canonical datasets, for resolving epoch intervals before the data
# are loaded (a run recompiles if the loaded set turns out to have another size)
_TRAIN_SIZES = {"mnist": 60000, "fashion-mnist": 60000, "cifar10": 50000, "cifar100": 50000}


def nominal_train_size(settings: dict) -> int:
    """The training-set size the scenario asks for: ``data.train_limit`` if set, else the
    canonical size of ``data.dataset`` (60000 for MNIST and Fashion-MNIST, 50000 for CIFAR)."""
    full = _TRAIN_SIZES[settings["data"]["dataset"]]
    limit = settings["data"]["train_limit"]
    return min(limit, full) if limit else full


def has_epoch_intervals(settings: dict) -> bool:
    """True if some monitor's ``every`` is given in epochs."""
    return any(epochs_of(m["every"]) is not None for m in settings.get("monitor", ()))


def with_trial_intervals(settings: dict, n_train: int | None = None) -> dict:
    """``settings`` itself when no monitor interval is in epochs, else
    :func:`resolve_intervals` for ``n_train`` samples (default :func:`nominal_train_size`)."""
    if not has_epoch_intervals(settings):
        return settings
    return resolve_intervals(settings, nominal_train_size(settings) if n_train is None
                             else n_train)


def resolve_intervals(settings: dict, n_train: int) -> dict:
    """A copy of ``settings`` whose monitor intervals given in epochs are whole numbers of
    trials (minibatches), for a training set of ``n_train`` samples.

    ``every = "x epoch"`` becomes ``max(1, round(x * ceil(n_train / batch_size)))`` trials, and
    such a monitor counts trials (``per = "trial"``) even for a population variable in time
    mode. Intervals already in trials are kept. The run directory's ``scenario.toml`` keeps the
    interval as written, so a run resumed on the same data resolves it the same way."""
    out = copy.deepcopy(settings)
    per_epoch = math.ceil(n_train / settings["training"]["batch_size"])
    for m in out.get("monitor", ()):
        x = epochs_of(m["every"])
        if x is not None:
            m["every"] = max(1, round(x * per_epoch))
            if m["per"] is None:
                m["per"] = "trial"
    return out


def _check_section(raw, schema, where) -> dict:
    if not isinstance(raw, dict):
        raise ValidationError(where, f"got {type(raw).__name__}, expected a table [{where}].")
    out = {}
    for key, value in raw.items():
        if not isinstance(key, str) or key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            raise ValidationError(f"{where}.{key}", f"unknown key; {where} takes "
                                  f"{sorted(schema)}.", f"did you mean {close[0]!r}?" if close else None)
        kind, _ = schema[key]
        out[key] = _check(kind, value, f"{where}.{key}")
    for key, (kind, default) in schema.items():
        if key not in out:
            if default is None and not (isinstance(kind, str) and kind.endswith("?")) and \
                    not (isinstance(kind, tuple) and None in kind):
                raise ValidationError(f"{where}.{key}", "missing; this key is required.")
            out[key] = copy.deepcopy(default)
    return out


def validate(raw: dict) -> dict:
    """Validate a parsed scenario dict; returns settings with every default filled in."""
    if not isinstance(raw, dict):
        raise ValidationError("scenario", f"got {type(raw).__name__}, expected a table.")
    out = {}
    known = set(SCHEMA) | {"model", "monitor"}
    for key in raw:
        if not isinstance(key, str) or key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise ValidationError(key, f"unknown top-level key; a scenario has {sorted(known)}.",
                                  f"did you mean {close[0]!r}?" if close else None)
    for key, spec in SCHEMA.items():
        if isinstance(spec, dict):
            out[key] = _check_section(raw.get(key, {}), spec, key)
        else:
            out[key] = _check(spec[0], raw.get(key, spec[1]), key)
    model = raw.get("model")
    if not isinstance(model, dict):
        raise ValidationError("model", "missing or not a table; a scenario needs [model] with a "
                              f"'name' (one of {sorted(_models())}).")
    name = model.get("name")
    models = _models()
    if not isinstance(name, str) or name not in models:
        close = difflib.get_close_matches(str(name), list(models), n=1)
        raise ValidationError("model.name", f"got {name!r}, expected one of {sorted(models)}.",
                              f"did you mean {close[0]!r}?" if close else None)
    schema = dict(models[name][0])
    schema["name"] = ("str", name)
    out["model"] = _check_section(model, schema, "model")
    mons = raw.get("monitor", [])
    if not isinstance(mons, list):
        raise ValidationError("monitor", "expected an array of tables [[monitor]].")
    out["monitor"] = [_check_section(m, MONITOR_SCHEMA, f"monitor[{i}]") for i, m in enumerate(mons)]
    tr = out["training"]
    if tr["milestones"] != sorted(tr["milestones"]) or 0 in tr["milestones"]:
        raise ValidationError("training.milestones", f"got {tr['milestones']}, expected increasing "
                              "epochs >= 1.")
    _check_simulation(out["simulation"])
    _check_monitors(out["monitor"])
    return out


def _check_simulation(sim: dict) -> None:
    """Cross-key checks of [simulation] that the circuit builders would otherwise report under
    their own (non-scenario) names."""
    if sim["mode"] != "time":
        return
    if sim["phase_duration"] < sim["dt"]:
        raise ValidationError("simulation.phase_duration", f"got {sim['phase_duration']} s, "
                              f"shorter than simulation.dt = {sim['dt']} s.",
                              "a phase needs at least one time step.")
    if sim["method"] == "euler" and sim["dt"] > sim["tau"]:
        raise ValidationError("simulation.dt", f"got {sim['dt']} s, larger than simulation.tau = "
                              f"{sim['tau']} s; forward Euler overshoots for dt > tau.",
                              "lower simulation.dt or set simulation.method = \"exp_euler\".")


def _check_monitors(mons: list) -> None:
    seen = {}
    for i, m in enumerate(mons):
        where = f"monitor[{i}]"
        target = m["target"]
        if not target or not ("." in target or target.startswith(("angle:", "grad_angle:"))):
            raise ValidationError(f"{where}.target", f"got {target!r}, expected 'population.r', "
                                  "'population.drive', 'projection.norm', "
                                  "'projection.update_norm', 'angle:F' or 'grad_angle:W1'.")
        if epochs_of(m["every"]) is not None and m["per"] == "step":
            raise ValidationError(f"{where}.per", f"got 'step' with every = {m['every']!r}; an "
                                  "interval in epochs counts trials (minibatches).",
                                  "leave per unset (or 'trial'), or give every in time steps.")
        if target.startswith("grad_angle:") and m["per"] == "step":
            raise ValidationError(f"{where}.per", "got 'step'; grad_angle compares the rule's "
                                  "update with the gradient once per trial.",
                                  "leave per unset (or 'trial').")
        u = m["units"]
        if u is not None and (len(u) != 2 or not u[0] < u[1]):
            raise ValidationError(f"{where}.units", f"got {u!r}, expected [start, stop] with "
                                  "0 <= start < stop.")
        key = m["name"] or (f"{target}@{m['phase']}" if m["phase"] and
                            target.endswith((".r", ".drive")) else target)
        if key in seen:
            raise ValidationError(f"{where}.name", f"records under the key {key!r}, like "
                                  f"monitor[{seen[key]}].", "give one of them a distinct name.")
        seen[key] = i


def load(path, overrides=()) -> dict:
    """Read a TOML scenario file, apply ``section.key=value`` overrides, and validate."""
    path = Path(path)
    if not path.is_file():
        raise ValidationError("scenario", f"file {str(path)!r} not found.",
                              "give the path to a .toml file, e.g. scenarios/pepita_mnist.toml.")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValidationError(str(path), f"not valid TOML: {e}.") from None
    apply_overrides(raw, overrides)
    return validate(raw)


def apply_overrides(raw: dict, overrides) -> None:
    """Apply ``section.key=value`` strings in place; values are parsed as TOML (``lr=0.05``,
    ``mode="time"`` or ``mode=time``)."""
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValidationError("--set", f"got {item!r}, expected section.key=value.")
        path, value = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) != 2 or not all(keys):
            raise ValidationError("--set", f"got {path!r}, expected section.key (e.g. training.lr).")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value.strip()
        section = raw.setdefault(keys[0], {})
        if not isinstance(section, dict):
            raise ValidationError(f"--set {path}", f"{keys[0]!r} is not a section.")
        section[keys[1]] = parsed


def to_toml(settings: dict) -> str:
    """The resolved scenario as TOML (None values omitted). Times of 1 s or more are written
    with their unit (``"2.0 s"``), so that reading the file back does not warn about a bare
    number of seconds."""
    import tomli_w

    def clean(x, schema=None):
        if isinstance(x, dict):
            return {k: clean(v, (schema or {}).get(k)) for k, v in x.items() if v is not None}
        if isinstance(x, list):
            return [clean(v) for v in x]
        if isinstance(schema, tuple) and schema[0] == "time" and isinstance(x, (int, float)) \
                and x >= BARE_TIME_WARN_S:
            return f"{x!r} s"
        return x

    schema = dict(SCHEMA)
    name = settings.get("model", {}).get("name")
    if name in _models():
        schema["model"] = _models()[name][0]
    return tomli_w.dumps(clean(settings, schema))


def build(settings: dict):
    """Build ``(circuit, protocol, rules, output)`` for validated settings.

    The builders receive times already converted to seconds, so their own bare-number warnings
    are silenced here (the scenario keys were checked by :func:`validate`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BareTimeWarning)
        return _models()[settings["model"]["name"]][1](settings)
