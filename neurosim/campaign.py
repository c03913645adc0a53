"""``neurosim campaign``: a list of scenario runs x seeds, their tables and figures, on dask.

::

    neurosim campaign campaigns/rules.toml [--scheduler tcp://host:8786] [--workers 2] \\
        [--out runs/campaigns/rules] [--set training.epochs=1 ...] [--data DIR]

A campaign file (TOML, docs/campaigns.md) lists **entries** (a scenario file, overrides, seeds,
the row and column of the results table it fills, an optional published anchor) and the
**tables** and **figures** to make of them. Every (entry, seed) is an ordinary run directory
``OUT/runs/<entry>_seed-<seed>`` computed by one task on dask.distributed, exactly as
``neurosim sweep`` runs its grid (:mod:`neurosim.runpool`: a LocalCluster by default, an
existing scheduler with ``--scheduler``; finished runs are skipped, interrupted ones resume
from their checkpoints, a killed worker's task is rescheduled and resumes).

The campaign folder gets ``results.csv`` (one row per run: entry, seed, status, metrics),
``results.md`` (per table: mean +- sample std over the finished seeds of each entry, with the
anchor column where the campaign gives one) and ``figures/<name>.png``, rewritten as runs
finish, plus ``campaign.json`` (what was asked).

The whole campaign is validated (every entry's scenario with its overrides, every seed, every
circuit, the tables' metrics and the figures' entries) before a worker starts.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ValidationError
from .rundir import (FolderLock, atomic_write_text, check_fresh, check_inside, os_error,
                     remove_stale_tmp, safe_name)
from .runpool import (METRICS, RunSpec, check_circuits, classify, execute, fmt_csv,
                      fmt_mean_std, mean_std, positive_int, previous_rows, read_json)

HELP = "run a campaign file (scenarios x seeds -> results tables and figures) on dask"

#: What a campaign writes into its folder (a folder holding any of them without
#: ``campaign.json`` is refused: a campaign never replaces files it did not write).
CAMPAIGN_FILES = ("campaign.json", "results.csv", "results.md", "figures", "runs")

_TOP_KEYS = {"campaign", "entry", "table", "figure"}
_CAMPAIGN_KEYS = {"name", "description", "seeds", "set"}
_ENTRY_KEYS = {"name", "scenario", "set", "seeds", "row", "column", "anchor", "tables"}
_TABLE_KEYS = {"name", "title", "metrics", "labels", "note", "anchor_label", "anchors"}
_FIGURE_KEYS = {"name", "title", "kind", "metric", "entries", "columns", "rows", "ylabel"}
_FIGURE_KINDS = ("learning_curves", "trace")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# a table metric: a summary.json number (or a number inside one of its objects, slowness.s), a
# metrics.csv column at an epoch ("test_accuracy@6",
# "@last"), or a monitor trace's last record / mean of its last N records ("trace:angle:F@last",
# "trace:grad_angle:W1@last10")
_METRIC = re.compile(r"^(?:(?P<trace>trace:[^@\s]+)@(?P<tsel>last\d*)|"
                     r"(?P<col>[A-Za-z_][A-Za-z0-9_]*)@(?P<csel>\d+|last)|"
                     r"(?P<key>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?))$")


def add_arguments(p) -> None:
    p.add_argument("campaign", help="campaign file (TOML; see docs/campaigns.md and campaigns/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario key of every entry (repeatable; applied after the "
                   "campaign's own overrides), e.g. --set training.epochs=1")
    p.add_argument("--data", action="append", default=[], metavar="DIR|DATASET=DIR",
                   help="a folder with one folder per data set (mnist/, fashion-mnist/, as "
                   "$NEUROSIM_DATA), or DATASET=DIR for one data set's own files (repeatable); "
                   "a campaign on one data set also takes the folder of its files. Default: "
                   "the data set lookup of docs/datasets.md")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask scheduler (e.g. tcp://10.0.0.1:8786); "
                   "default: a LocalCluster of single-threaded worker processes")
    p.add_argument("--workers", default=None, metavar="N",
                   help="LocalCluster worker processes (default: the number of CPUs; never "
                   "more than the runs left to do)")
    p.add_argument("--out", help="campaign folder (default runs/campaigns/<campaign name>); "
                   "re-running into the same folder skips finished runs")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-run runs recorded as diverged")
    p.add_argument("--validate-only", action="store_true",
                   help="check the whole campaign (every entry builds) and print its plan; run "
                   "nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# -- the campaign file -----------------------------------------------------------------------------
@dataclass
class Entry:
    name: str
    scenario: Path
    sets: list
    seeds: list
    row: str
    column: str
    anchor: str
    tables: list | None
    where: str


@dataclass
class Campaign:
    path: Path
    name: str
    description: str
    sets: list
    entries: list
    tables: list = field(default_factory=list)
    figures: list = field(default_factory=list)


def _err(where, message, hint=None):
    return ValidationError(where, message, hint)


def _overrides(value, where) -> list[str]:
    """``set`` as a list of ``section.key=value`` strings, or a table ``{"section.key" = v}``
    (the TOML value itself)."""
    if value is None:
        return []
    if isinstance(value, list):
        bad = [v for v in value if not (isinstance(v, str) and "=" in v)]
        if bad:
            raise _err(where, f"got {bad[0]!r}, expected \"section.key=value\" strings.",
                       "write set = [\"training.epochs=10\"] or set = {\"training.epochs\" = 10}.")
        return list(value)
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            if isinstance(v, dict):      # {training = {epochs = 10}}: dotted keys unquoted
                out += [f"{k}.{kk}={_toml_value(vv, f'{where}.{k}.{kk}')}" for kk, vv in v.items()]
            else:
                out.append(f"{k}={_toml_value(v, f'{where}.{k}')}")
        return out
    raise _err(where, f"got {type(value).__name__} {value!r}, expected a list of "
               "\"section.key=value\" strings or a table of section.key = value.")


def _toml_value(v, where) -> str:
    if isinstance(v, (dict,)) or (isinstance(v, list) and any(isinstance(x, dict) for x in v)):
        raise _err(where, "a table value cannot be an override.",
                   "override one key at a time: section.key = value.")
    return json.dumps(v)        # JSON scalars and arrays are TOML values


def _seeds(value, where) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not (isinstance(value, list) and value and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise _err(where, f"got {value!r}, expected a non-empty list of seeds (integers >= 0).",
                   "e.g. seeds = [0, 1, 2].")
    if len(set(value)) != len(value):
        raise _err(where, f"repeats a seed in {value}.")
    return list(value)


def _str(value, where, default=None, required=False) -> str:
    if value is None:
        if required:
            raise _err(where, "is missing.")
        return default
    if not isinstance(value, str):
        raise _err(where, f"got {type(value).__name__} {value!r}, expected a string.")
    return value


def _bool(value, where) -> bool:
    if not isinstance(value, bool):
        raise _err(where, f"got {value!r}, expected true or false.")
    return value


def _keys(table, allowed, where, what) -> None:
    if not isinstance(table, dict):
        raise _err(where, f"got {type(table).__name__}, expected a table.")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _err(f"{where}.{unknown[0]}", "unknown key.",
                   f"the keys of {what} are {', '.join(sorted(allowed))}.")


def _resolve_scenario(text: str, base: Path, where: str) -> Path:
    """A scenario path relative to the campaign file's folder, else to the working directory,
    else to the repository root of this neurosim (where scenarios/ lives)."""
    p = Path(text)
    repo = Path(__file__).resolve().parents[1]
    tried = [p] if p.is_absolute() else [base / p, Path.cwd() / p, repo / p]
    for c in tried:
        if c.is_file():
            return c.resolve()
    raise _err(where, f"scenario file {text!r} not found (looked in "
               f"{', '.join(str(c.parent) for c in tried)}).",
               "give the path relative to the campaign file, e.g. "
               "\"../scenarios/pepita_mnist.toml\".")


def parse_metric(text: str, where: str) -> dict:
    m = _METRIC.match(text) if isinstance(text, str) else None
    if not m:
        raise _err(where, f"got {text!r}, expected a summary.json key (final_test_accuracy, "
                   "slowness.s), a "
                   "metrics.csv column at an epoch (test_accuracy@6, test_accuracy@last) or a "
                   "monitor's last records (trace:angle:F@last, trace:grad_angle:W1@last10).")
    return {k: v for k, v in m.groupdict().items() if v is not None}


def load_campaign(path, cli_sets=()) -> Campaign:
    """Read and check a campaign file (not yet the scenarios)."""
    from .scenario import _parse_toml

    path = Path(path).absolute()
    if not path.is_file():
        raise _err("campaign", f"file {str(path)!r} not found.",
                   "give a campaign file, e.g. campaigns/rules.toml.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _err(str(path), f"cannot read it ({e}).") from None
    f = str(path)
    raw = _parse_toml(text, f)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _err(f"{f}:{unknown[0]}", "unknown section.",
                   "a campaign has [campaign], [[entry]], [[table]] and [[figure]].")
    head = raw.get("campaign", {})
    _keys(head, _CAMPAIGN_KEYS, f"{f}:campaign", "[campaign]")
    name = _str(head.get("name"), f"{f}:campaign.name", path.stem)
    if not _NAME.match(name):
        raise _err(f"{f}:campaign.name", f"got {name!r}, expected letters, digits, . _ + -.")
    seeds0 = _seeds(head.get("seeds", [0]), f"{f}:campaign.seeds")
    sets0 = _overrides(head.get("set"), f"{f}:campaign.set")
    entries_raw = raw.get("entry", [])
    if not isinstance(entries_raw, list) or not entries_raw:
        raise _err(f"{f}:entry", "the campaign has no [[entry]].",
                   "add [[entry]] tables with scenario = \"...\".")
    entries, seen = [], {}
    for i, e in enumerate(entries_raw):
        w = f"{f}:entry[{i}]"
        _keys(e, _ENTRY_KEYS, w, "an [[entry]]")
        scen = _str(e.get("scenario"), f"{w}.scenario", required=True)
        ename = _str(e.get("name"), f"{w}.name", Path(scen).stem)
        if not _NAME.match(ename) or len(ename) > 80:
            raise _err(f"{w}.name", f"got {ename!r}, expected at most 80 letters, digits, "
                       ". _ + - (it names the run folders).")
        if ename in seen:
            raise _err(f"{w}.name", f"{ename!r} is already the name of entry[{seen[ename]}].",
                       "give each entry a distinct name = \"...\".")
        seen[ename] = i
        w = f"{f}:entry[{i}] ({ename})"
        tables = e.get("tables")
        if tables is not None and not (isinstance(tables, list) and
                                       all(isinstance(t, str) for t in tables)):
            raise _err(f"{w}.tables", f"got {tables!r}, expected a list of table names.")
        entries.append(Entry(
            name=ename, scenario=_resolve_scenario(scen, path.parent, f"{w}.scenario"),
            sets=sets0 + _overrides(e.get("set"), f"{w}.set") + list(cli_sets),
            seeds=_seeds(e["seeds"], f"{w}.seeds") if "seeds" in e else list(seeds0),
            row=_str(e.get("row"), f"{w}.row", ename), column=_str(e.get("column"),
                                                                  f"{w}.column", ""),
            anchor=_str(e.get("anchor"), f"{w}.anchor", ""), tables=tables, where=w))
    tables = []
    tseen = set()
    for i, t in enumerate(raw.get("table", []) or [{}]):
        w = f"{f}:table[{i}]"
        _keys(t, _TABLE_KEYS, w, "a [[table]]")
        tname = _str(t.get("name"), f"{w}.name", f"table{i + 1}" if i else "results")
        if tname in tseen:
            raise _err(f"{w}.name", f"{tname!r} is the name of another table.")
        tseen.add(tname)
        metrics = t.get("metrics", ["final_test_accuracy"])
        if isinstance(metrics, str):
            metrics = [metrics]
        if not (isinstance(metrics, list) and metrics):
            raise _err(f"{w}.metrics", f"got {metrics!r}, expected a list of metrics.")
        for j, m in enumerate(metrics):
            parse_metric(m, f"{w}.metrics[{j}]")
        labels = t.get("labels", list(metrics))
        if not (isinstance(labels, list) and len(labels) == len(metrics) and
                all(isinstance(x, str) for x in labels)):
            raise _err(f"{w}.labels", f"got {labels!r}, expected {len(metrics)} strings, one "
                       "per metric.")
        tables.append({"name": tname, "title": _str(t.get("title"), f"{w}.title", tname),
                       "metrics": list(metrics), "labels": labels,
                       "note": _str(t.get("note"), f"{w}.note", ""),
                       "anchor_label": _str(t.get("anchor_label"), f"{w}.anchor_label",
                                            "anchor (published)"),
                       "anchors": _bool(t.get("anchors", True), f"{w}.anchors")})
    for e in entries:
        for tname in e.tables or ():
            if tname not in tseen:
                raise _err(f"{e.where}.tables", f"names the table {tname!r}, which the campaign "
                           f"does not define (it has {', '.join(sorted(tseen))}).")
    figures, fseen = [], set()
    names = {e.name for e in entries}
    for i, g in enumerate(raw.get("figure", [])):
        w = f"{f}:figure[{i}]"
        _keys(g, _FIGURE_KEYS, w, "a [[figure]]")
        gname = _str(g.get("name"), f"{w}.name", required=True)
        if not _NAME.match(gname) or gname in fseen:
            raise _err(f"{w}.name", f"got {gname!r}, expected a distinct file name (letters, "
                       "digits, . _ + -).")
        fseen.add(gname)
        kind = _str(g.get("kind"), f"{w}.kind", "learning_curves")
        if kind not in _FIGURE_KINDS:
            raise _err(f"{w}.kind", f"got {kind!r}, expected one of {', '.join(_FIGURE_KINDS)}.")
        metric = _str(g.get("metric"), f"{w}.metric",
                      "test_accuracy" if kind == "learning_curves" else None,
                      required=kind == "trace")
        chosen = [e.name for e in entries]
        for key in ("entries", "columns", "rows"):
            sel = g.get(key)
            if sel is None:
                continue
            if not (isinstance(sel, list) and all(isinstance(x, str) for x in sel)):
                raise _err(f"{w}.{key}", f"got {sel!r}, expected a list of strings.")
            have = names if key == "entries" else {
                getattr(e, key[:-1]) for e in entries}
            missing = [x for x in sel if x not in have]
            if missing:
                raise _err(f"{w}.{key}", f"{missing[0]!r} is no {key[:-1]} of the campaign's "
                           f"entries (they have {', '.join(sorted(have))}).")
            attr = {"entries": "name", "columns": "column", "rows": "row"}[key]
            chosen = [e.name for e in entries if e.name in chosen and getattr(e, attr) in sel]
        if not chosen:
            raise _err(w, "selects no entry.", "check its entries / columns / rows.")
        figures.append({"name": gname, "kind": kind, "metric": metric, "entries": chosen,
                        "title": _str(g.get("title"), f"{w}.title", gname),
                        "ylabel": _str(g.get("ylabel"), f"{w}.ylabel", metric)})
    return Campaign(path=path, name=name, description=_str(head.get("description"),
                                                           f"{f}:campaign.description", ""),
                    sets=sets0, entries=entries, tables=tables, figures=figures)


def plan_campaign(path, cli_sets=()) -> tuple[Campaign, list[RunSpec]]:
    """Validate every (entry, seed) of the campaign: its scenario with the campaign's, the
    entry's and the command line's overrides. Returns the campaign and its runs."""
    from . import scenario as sc

    camp = load_campaign(path, cli_sets)
    runs = []
    for e in camp.entries:
        for seed in e.seeds:
            try:
                settings = sc.load(e.scenario, e.sets + [f"training.seed={seed}"])
            except ValidationError as err:
                raise ValidationError(f"{e.where} [{e.scenario.name}]: {err.where}",
                                      f"{err.message} (overrides given: {e.sets or 'none'})",
                                      err.hint or
                                      "fix the entry's set = [...] or the --set values.") from None
            runs.append(RunSpec(f"{e.name}_seed-{seed}", {"entry": e.name}, seed, settings))
    return camp, runs


def _entry_of(camp: Campaign) -> dict:
    return {e.name: e for e in camp.entries}


# -- data ------------------------------------------------------------------------------------------
def data_dirs(items, runs) -> dict:
    """``--data`` values -> {dataset name: folder or None (the data set lookup)}. A root folder
    is searched like ``$NEUROSIM_DATA`` (``ROOT/<dataset>/``); a data set it lacks is looked up
    as usual."""
    from .datasets import _spec

    datasets = sorted({r.settings["data"]["dataset"] for r in runs})
    explicit, roots = {}, []
    for item in items:
        name, sep, d = item.partition("=")
        if sep and not Path(item).is_dir():
            try:
                key = _spec(name).name
            except ValidationError as e:
                raise _err("--data", f"got {item!r}: {e.message}") from None
            if not Path(d).is_dir():
                raise _err("--data", f"{d!r} (for {name}) is not a folder.")
            explicit[key] = str(Path(d).resolve())
        else:
            if not Path(item).is_dir():
                raise _err("--data", f"{item!r} is not a folder.",
                           "give a folder with one folder per data set (mnist/, "
                           "fashion-mnist/), or DATASET=DIR.")
            roots.append(Path(item).resolve())
    out = {}
    for ds in datasets:
        key = _spec(ds).name
        if key in explicit:
            out[ds] = explicit[key]
            continue
        found = [r / key for r in roots if (r / key).is_dir()]
        if found:
            out[ds] = str(found[0])
        elif roots and len(datasets) == 1:
            out[ds] = str(roots[0])      # the folder of the one data set's files
        else:       # as under $NEUROSIM_DATA: the data set lookup (docs/datasets.md)
            if roots:
                print(f"neurosim campaign: note: no folder {key}/ in "
                      f"{', '.join(map(str, roots))}; {ds} is looked up as docs/datasets.md "
                      f"describes (or give --data {key}=DIR).", file=sys.stderr)
            out[ds] = None
    return out


# -- metrics of one run ----------------------------------------------------------------------------
def metric_value(run: RunSpec, metric: str):
    """The value of a table metric for a finished run (None if it has none)."""
    p = parse_metric(metric, "metric")
    if "key" in p:
        v = run.row.get(p["key"])
        if v in (None, ""):
            v = read_json(run.run_dir / "summary.json") or {}
            for k in p["key"].split("."):
                v = v.get(k) if isinstance(v, dict) else None
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
    from .report import read_metrics, read_traces

    try:
        if "col" in p:
            m = read_metrics(run.run_dir)
            col, ep = m.get(p["col"]), m.get("epoch")
            if col is None or ep is None or not len(col):
                return None
            if p["csel"] == "last":
                return float(col[-1])
            hit = [v for e, v in zip(ep, col) if e == int(p["csel"])]
            return float(hit[0]) if hit else None
        tr = read_traces(run.run_dir).get(p["trace"][len("trace:"):])
        if tr is None:
            return None
        import numpy as np

        vals = np.asarray(tr["values"], float)
        if vals.ndim != 1:
            return None
        vals = vals[np.isfinite(vals)]
        n = int(p["tsel"][4:] or 1)
        return float(vals[-n:].mean()) if len(vals) else None
    except ValidationError:
        return None


def _fill_metrics(camp: Campaign, runs) -> None:
    wanted = [m for t in camp.tables for m in t["metrics"]]
    for r in runs:
        if r.status != "ok":
            continue
        for m in wanted:
            if m not in r.row:
                r.row[m] = metric_value(r, m)


# -- outputs ---------------------------------------------------------------------------------------
def write_csv(out: Path, camp: Campaign, runs) -> None:
    ent = _entry_of(camp)
    table_metrics = list(dict.fromkeys(m for t in camp.tables for m in t["metrics"]))
    fixed = ["run", "entry", "row", "column", "status", "seed", "epochs_done", *METRICS]
    fixed += [m for m in table_metrics if m not in fixed]
    extra = sorted({k for r in runs for k in r.row} - set(fixed) - {"error"})
    fields = fixed + extra + ["error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        e = ent[r.point["entry"]]
        row = dict(r.row) if r.row else {"run": r.name, "seed": r.seed}
        row.update(status=r.status, entry=e.name, row=e.row, column=e.column)
        w.writerow({k: fmt_csv(row.get(k)) for k in fields})
    atomic_write_text(out / "results.csv", buf.getvalue())


def aggregate(camp: Campaign, runs) -> dict:
    """{entry name: {"runs", "ok", "diverged", "failed", metric: (mean, std, n)}}."""
    metrics = list(dict.fromkeys([*METRICS, *(m for t in camp.tables for m in t["metrics"])]))
    by = {e.name: [] for e in camp.entries}
    for r in runs:
        by[r.point["entry"]].append(r)
    out = {}
    for name, rs in by.items():
        ok = [r for r in rs if r.status == "ok"]
        agg = {"runs": len(rs), "ok": len(ok),
               "diverged": sum(r.status == "diverged" for r in rs),
               "failed": sum(r.status == "failed" for r in rs)}
        for m in metrics:
            agg[m] = mean_std(r.row.get(m) for r in ok)
        out[name] = agg
    return out


def _metric_kind(metric: str) -> str:
    p = parse_metric(metric, "metric")
    return p.get("key") or p.get("col") or "trace"


def _cell(agg: dict, metric: str) -> str:
    m, s, n = agg[metric]
    text = fmt_mean_std(m, s, _metric_kind(metric))
    notes = []
    if agg["ok"] < agg["runs"]:
        notes.append(f"{agg['ok']}/{agg['runs']} seeds")
    if agg["diverged"]:
        notes.append(f"{agg['diverged']} diverged")
    if agg["failed"]:
        notes.append(f"{agg['failed']} failed")
    if m is not None and n < agg["ok"]:
        notes.append(f"value in {n}")
    return text + (f" ({', '.join(notes)})" if notes else "")


def table_lines(camp: Campaign, table: dict, agg: dict) -> list[str]:
    """The markdown table: one line per distinct entry row, one column per (entry column,
    metric), and the anchor column when one of its entries has an anchor."""
    ents = [e for e in camp.entries if e.tables is None or table["name"] in e.tables]
    rows = list(dict.fromkeys(e.row for e in ents))
    cols = list(dict.fromkeys(e.column for e in ents))
    heads = []
    for c in cols:
        for lab in table["labels"]:
            heads.append(f"{c}, {lab}" if c and len(table["metrics"]) > 1 else (c or lab))
    has_anchor = table["anchors"] and any(e.anchor for e in ents)
    lines = ["| | " + " | ".join(heads) + (f" | {table['anchor_label']}" if has_anchor else "")
             + " |", "|---|" + "---|" * (len(heads) + has_anchor)]
    for rw in rows:
        cells = [rw]
        anchors = []
        for c in cols:
            hit = [e for e in ents if e.row == rw and e.column == c]
            for m in table["metrics"]:
                cells.append(_cell(agg[hit[0].name], m) if hit else "")
            for e in hit:
                if e.anchor:
                    anchors.append(f"{c}: {e.anchor}" if c and len(cols) > 1 else e.anchor)
        if has_anchor:
            cells.append("; ".join(anchors))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def write_results_md(out: Path, camp: Campaign, runs, spec: dict, timing: dict,
                     figures: list) -> str:
    agg = aggregate(camp, runs)
    counts = {s: sum(r.status == s for r in runs) for s in ("ok", "diverged", "failed", "pending")}
    lines = [f"# Campaign {camp.name}", ""]
    if camp.description:
        lines += [camp.description, ""]
    cmd = "neurosim campaign " + spec["campaign"] + "".join(
        f" --set {s}" for s in spec["cli_overrides"])
    lines += [f"- command: `{cmd}`",
              "- overrides of every entry: " + (", ".join(f"`{s}`" for s in camp.sets +
                                                           spec["cli_overrides"]) or "none"),
              f"- entries: {len(camp.entries)}; runs: {len(runs)} — {counts['ok']} finished, "
              f"{counts['diverged']} diverged, {counts['failed']} failed, {counts['pending']} "
              "not run",
              f"- this invocation: {timing.get('ran', 0)} run(s) computed, "
              f"{timing.get('skipped', 0)} skipped as already finished; wall time "
              f"{timing.get('wall_s', 0.0):.1f} s on {timing.get('where', 'no workers')}", "",
              "Cells: mean ± sample standard deviation (n - 1) over the finished seeds of each "
              "entry (no ± with one seed); accuracies in %. Anchors are published figures "
              "(docs/algorithms.md §4) for the setting the anchor text names, which may differ "
              "from the campaign's.", ""]
    for t in camp.tables:
        lines += [f"## {t['title']}", ""]
        if t["note"]:
            lines += [t["note"], ""]
        lines += table_lines(camp, t, agg) + [""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{name}](figures/{name}.png)" for name in figures] + [""]
    lines += ["## Entries", "", "| entry | scenario | overrides | seeds |", "|---|---|---|---|"]
    for e in camp.entries:
        own = e.sets[len(camp.sets):len(e.sets) - len(spec["cli_overrides"])]
        lines.append(f"| {e.name} | `{e.scenario.name}` | "
                     f"{', '.join(f'`{s}`' for s in own) or '—'} | "
                     f"{', '.join(map(str, e.seeds))} |")
    lines.append("")
    bad = [r for r in runs if r.status in ("diverged", "failed")]
    if bad:
        lines += ["## Runs that did not finish", ""]
        for r in bad:
            msg = (r.row.get("error") or "").replace("\n", " ")
            lines.append(f"- `{r.name}` ({r.status}): {msg[:300]}")
        lines.append("")
    lines += ["Per-run rows: `results.csv`; run directories: `runs/`.", ""]
    text = "\n".join(lines)
    atomic_write_text(out / "results.md", text)
    return text


def write_figures(out: Path, camp: Campaign, runs) -> list[str]:
    """Each figure: per entry, the mean over its finished seeds (band: +- 1 std) of a
    metrics.csv column per epoch (learning_curves) or of a monitor trace (trace)."""
    if not camp.figures:
        return []
    import numpy as np

    from .report import _nan_mean_sd, _plt, _save, read_metrics, run_series

    by = {}
    for r in runs:
        if r.status == "ok":
            by.setdefault(r.point["entry"], []).append(r)
    ent = _entry_of(camp)
    written = []
    for g in camp.figures:
        lines = []
        for name in g["entries"]:
            rs = by.get(name, [])
            series = []
            for r in rs:
                if g["kind"] == "learning_curves":
                    m = read_metrics(r.run_dir)
                    if "epoch" in m and g["metric"] in m and len(m["epoch"]):
                        series.append((m["epoch"], m[g["metric"]]))
                else:
                    tr = run_series(r.run_dir)["traces"].get(g["metric"])
                    if tr is not None and tr[1].ndim == 1 and len(tr[1]):
                        series.append((tr[0], tr[1]))
            if not series:
                continue
            n = min(len(y) for _, y in series)
            x = np.asarray(series[0][0][:n], float)
            mean, sd = _nan_mean_sd(np.stack([np.asarray(y[:n], float) for _, y in series]))
            e = ent[name]
            label = ", ".join(x for x in (e.row, e.column) if x) or name
            lines.append((f"{label} ({len(series)})", x, mean, sd))
        if not lines:
            continue
        plt = _plt()
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        pct = g["kind"] == "learning_curves" and g["metric"].endswith("accuracy")
        k = 100.0 if pct else 1.0
        for i, (label, x, mean, sd) in enumerate(lines):
            color = f"C{i % 10}"
            ls = "-" if i < 10 else "--"
            ax.plot(x, k * mean, ls=ls, color=color, marker="o" if len(x) <= 20 else None,
                    ms=3, label=label)
            if sd is not None:
                ok = np.isfinite(sd)
                ax.fill_between(x[ok], k * (mean - sd)[ok], k * (mean + sd)[ok], color=color,
                                alpha=0.15)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{g['ylabel']} (%)" if pct else g["ylabel"])
        ax.set_title(f"{g['title']} (mean over seeds, band ± 1 std; n seeds in brackets)",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        (out / "figures").mkdir(exist_ok=True)
        _save(fig, out / "figures" / f"{g['name']}.png")
        written.append(g["name"])
    return written


# -- the command ----------------------------------------------------------------------------------
def main(args) -> int:
    t_start = time.perf_counter()
    camp, runs = plan_campaign(args.campaign, args.overrides)
    if args.workers is not None:
        positive_int(args.workers, "--workers")
    ent = _entry_of(camp)
    check_circuits(runs, where=lambda r: f"{ent[r.point['entry']].where} "
                   f"[{ent[r.point['entry']].scenario.name}]")
    dirs = data_dirs(args.data, runs)
    for r in runs:
        r.data_dir = dirs[r.settings["data"]["dataset"]]
    if args.validate_only:
        print(f"{args.campaign}: OK — {len(camp.entries)} entries, {len(runs)} runs, "
              f"{len(camp.tables)} table(s), {len(camp.figures)} figure(s)")
        for e in camp.entries:
            print(f"  {e.name}: {e.scenario.name}, seeds {e.seeds}, "
                  f"overrides {e.sets or 'none'}")
        return 0
    if args.out:
        out = Path(args.out)
    else:   # one safe path component, inside runs/campaigns/
        out = Path("runs") / "campaigns" / safe_name(camp.name, "campaign")
        check_inside(out, Path("runs") / "campaigns", "name")
    out = out.resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, out.parent, "create the campaign folder's parent") from None
    lock = FolderLock(out, "campaign").acquire()   # one campaign per folder
    try:
        remove_stale_tmp(out, CAMPAIGN_FILES)
        if not (out / "campaign.json").is_file():
            check_fresh(out, CAMPAIGN_FILES, "campaign")
        return _campaign(args, t_start, camp, runs, out)
    finally:
        lock.release()


def _campaign(args, t_start, camp: Campaign, runs, out: Path) -> int:
    previous = previous_rows(out / "results.csv")
    for r in runs:
        r.run_dir = out / "runs" / r.name
        classify(r, previous, args.retry_failed, "campaign")
    pending = [r for r in runs if r.status == "pending"]
    if not args.scheduler and pending:
        # fail fast on missing or corrupt data, or circuits that do not fit it
        from .training import load_data

        groups = {}
        for r in pending:
            groups.setdefault((r.settings["data"]["dataset"], r.data_dir), []).append(r)
        for rs in groups.values():
            check_circuits(rs, load_data(rs[0].settings, rs[0].data_dir)[0],
                           where=lambda r: _entry_of(camp)[r.point["entry"]].where)
    try:
        (out / "runs").mkdir(exist_ok=True)
    except OSError as e:
        raise os_error(e, out / "runs", "create the runs folder") from None
    spec = {"campaign": str(args.campaign), "name": camp.name, "cli_overrides":
            list(args.overrides), "data": {r.settings["data"]["dataset"]: r.data_dir
                                           for r in runs},
            "entries": {e.name: {"scenario": str(e.scenario), "overrides": e.sets,
                                 "seeds": e.seeds, "row": e.row, "column": e.column,
                                 "anchor": e.anchor} for e in camp.entries},
            "runs": [r.name for r in runs]}
    atomic_write_text(out / "campaign.json", json.dumps(spec, indent=2))
    skipped = len(runs) - len(pending)
    timing = {"skipped": skipped, "ran": 0, "where": "no workers (nothing to run)"}

    def flush(final=False):
        timing["wall_s"] = time.perf_counter() - t_start
        _fill_metrics(camp, runs)
        write_csv(out, camp, runs)
        figures = write_figures(out, camp, runs) if final else \
            [g["name"] for g in camp.figures if (out / "figures" / f"{g['name']}.png").is_file()]
        write_results_md(out, camp, runs, spec, timing, figures)

    total = len(runs)
    print(f"campaign {camp.name}: {total} runs ({len(camp.entries)} entries x seeds) into "
          f"{out}; {skipped} already finished, {len(pending)} to run", file=sys.stderr)
    if pending:
        execute(pending, scheduler=args.scheduler, workers=args.workers,
                progress=not args.no_progress, total=total, skipped=skipped, timing=timing,
                flush=flush, command="campaign")
    flush(final=True)
    failed = [r for r in runs if r.status == "failed"]
    diverged = [r for r in runs if r.status == "diverged"]
    print(f"campaign {camp.name}: {sum(r.status == 'ok' for r in runs)}/{total} finished, "
          f"{len(diverged)} diverged, {len(failed)} failed; see {out / 'results.md'}")
    for r in failed:
        print(f"  failed: {r.name}: {r.row.get('error', '')}", file=sys.stderr)
    return 1 if failed else 0

