"""``neurosim campaign`` (issue 13, part 1): entries x seeds on dask, results tables, figures.

The default suite validates every shipped campaign (each entry's scenario with its overrides
builds its circuit) and runs one small campaign for real: 2 entries x 2 seeds of the tiny
scenario on a LocalCluster of 2 workers, then re-runs it (everything skipped). The smoke run of
each shipped campaign on the real data sets (`--set training.epochs=1 --set
data.train_limit=1000`, the issue's test) is marked slow.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import time

import pytest

from _tinyrun import MNIST, REPO, write_tiny_scenario
from neurosim import ValidationError
from neurosim import campaign as cp
from neurosim.cli import main as cli

CAMPAIGNS = sorted((REPO / "campaigns").glob("*.toml"))


def _rows(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _no_worker_processes_left():
    deadline = time.time() + 10
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.2)
    return not multiprocessing.active_children()


SMALL = """\
[campaign]
name = "small"
seeds = [0, 1]
set = ["training.epochs=2"]

[[entry]]
name = "slow"
scenario = "tiny.toml"
row = "PEPITA"
column = "eta 0.05"
anchor = "about 98.0 (a quoted figure)"

[[entry]]
name = "fast"
scenario = "tiny.toml"
set = {"training.lr" = 0.1}
row = "PEPITA"
column = "eta 0.1"

[[table]]
title = "Test accuracy"
metrics = ["final_test_accuracy", "test_accuracy@1", "trace:angle:F@last"]
labels = ["final", "epoch 1", "angle F"]

[[table]]
title = "Best, without anchors"
metrics = ["best_test_accuracy"]
anchors = false

[[figure]]
name = "curves"

[[figure]]
name = "angle"
kind = "trace"
metric = "angle:F"
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("camp")
    write_tiny_scenario(d, epochs=2)
    (d / "small.toml").write_text(SMALL)
    return d


# -- the shipped campaigns: every entry builds ----------------------------------------------------
def test_campaigns_are_shipped():
    names = {p.stem for p in CAMPAIGNS}
    assert {"rules", "mirroring", "depth", "depth_100"} <= names


@pytest.mark.parametrize("path", CAMPAIGNS, ids=lambda p: p.stem)
def test_shipped_campaign_validates(path, capsys):
    assert cli(["campaign", str(path), "--validate-only"]) == 0
    out = capsys.readouterr().out
    camp, runs = cp.plan_campaign(path)
    assert f"OK — {len(camp.entries)} entries, {len(runs)} runs" in out
    for r in runs:       # every run is a seed of its entry, with the campaign's overrides
        e = cp._entry_of(camp)[r.point["entry"]]
        assert r.settings["training"]["seed"] == r.seed and r.seed in e.seeds
        assert r.name == f"{e.name}_seed-{r.seed}"


def test_rules_campaign_covers_every_rule_and_dataset():
    camp, runs = cp.plan_campaign(REPO / "campaigns" / "rules.toml")
    have = {(r.settings["model"]["name"], r.settings["data"]["dataset"]) for r in runs}
    for model in ("pepita", "pepita_norm", "pepita_wm", "pepita_tl", "pepita_hebbian", "bp", "fa",
                  "dfa", "afa", "ff"):
        for ds in ("mnist", "fashion-mnist"):
            assert (model, ds) in have
    assert all(r.settings["training"]["epochs"] == 10 for r in runs)
    assert {len(e.seeds) for e in camp.entries} == {3}


def test_depth_campaign_covers_rules_depths_and_datasets():
    camp, runs = cp.plan_campaign(REPO / "campaigns" / "depth.toml")
    cells = {(r.settings["model"]["name"], r.settings["data"]["dataset"],
              len(r.settings["model"]["sizes"]) - 2) for r in runs}
    for model in ("pepita", "pepita_norm", "pepita_wm", "pepita_hebbian", "bp", "fa", "dfa"):
        for ds in ("mnist", "fashion-mnist"):
            for depth in (1, 2, 3):
                assert (model, ds, depth) in cells, (model, ds, depth)
    assert all(r.settings["training"]["epochs"] == 10 and
               r.settings["training"]["milestones"] == [6, 9] for r in runs)
    assert all(h == 1024 for r in runs for h in r.settings["model"]["sizes"][1:-1])
    # the rates of the probe (campaigns/depth_lr_probe.toml, the file's header): the 1-hidden
    # eta up to 2 hidden layers; with 3, eta / 10 for the rules that diverge at it
    for r in runs:
        model, depth = r.settings["model"]["name"], len(r.settings["model"]["sizes"]) - 2
        one = {"pepita_norm": 1.0}.get(model, 0.1)
        want = one / 10 if depth == 3 and model not in ("bp", "pepita_norm") else one
        assert r.settings["training"]["lr"] == pytest.approx(want), (r.name, want)


# -- planning and errors (no cluster) --------------------------------------------------------------
def test_set_applies_to_every_entry_after_the_campaigns_own(folder):
    camp, runs = cp.plan_campaign(folder / "small.toml", ["training.momentum=0.5",
                                                          "training.lr=0.2"])
    assert len(runs) == 4
    assert all(r.settings["training"]["momentum"] == 0.5 for r in runs)
    assert all(r.settings["training"]["lr"] == 0.2 for r in runs)   # --set wins over the entry
    assert all(r.settings["training"]["epochs"] == 2 for r in runs)
    _, runs = cp.plan_campaign(folder / "small.toml")
    assert {r.name: r.settings["training"]["lr"] for r in runs} == {
        "slow_seed-0": 0.05, "slow_seed-1": 0.05, "fast_seed-0": 0.1, "fast_seed-1": 0.1}


_ENTRY = '[[entry]]\nscenario = "tiny.toml"\n'


@pytest.mark.parametrize("text, fragment", [
    ('[[entry]]\nscenario = "nowhere.toml"\n', "entry[0] (nowhere).scenario: scenario file "
     "'nowhere.toml' not found"),
    (_ENTRY + "seed = [1]\n", "entry[0].seed: unknown key"),
    (_ENTRY + 'set = ["training.lrr=0.1"]\n', "entry[0] (tiny) [tiny.toml]: training.lrr: "
     "unknown key"),
    (_ENTRY + 'set = ["model.sizes=[784,10]"]\n', "entry[0] (tiny) [tiny.toml]: model.sizes"),
    (_ENTRY + "set = [3]\n", "entry[0] (tiny).set: got 3"),
    (_ENTRY + "seeds = [0, 0]\n", "repeats a seed"),
    (_ENTRY + "seeds = []\n", "expected a non-empty list of seeds"),
    (_ENTRY + _ENTRY, "entry[1].name: 'tiny' is already the name of entry[0]"),
    (_ENTRY + 'tables = ["nope"]\n', "names the table 'nope'"),
    (_ENTRY + '[[table]]\nmetrics = ["test accuracy"]\n', "table[0].metrics[0]: got 'test "
     "accuracy'"),
    (_ENTRY + '[[table]]\nmetrics = ["final_test_accuracy"]\nlabels = ["a", "b"]\n',
     "table[0].labels"),
    (_ENTRY + '[[figure]]\nname = "f"\ncolumns = ["MNIST"]\n', "figure[0].columns: 'MNIST' is no "
     "column"),
    (_ENTRY + '[[figure]]\nname = "f"\nkind = "bars"\n', "figure[0].kind: got 'bars'"),
    (_ENTRY + '[[table]]\nanchors = "no"\n', "table[0].anchors: got 'no', expected true or false"),
    ('[campaign]\nname = "x"\n', "entry: the campaign has no [[entry]]"),
    (_ENTRY + "[extra]\n", "extra: unknown section"),
    ("[[entry]\n", "not valid TOML"),
])
def test_bad_campaigns_are_rejected_before_any_worker(folder, tmp_path, data, capsys, text,
                                                      fragment):
    path = folder / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    assert cli(["campaign", str(path), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "bad.toml" in err
    assert not out.exists()
    assert not multiprocessing.active_children()


def test_bad_set_and_data_are_rejected(folder, tmp_path, data, capsys):
    out = tmp_path / "out"
    assert cli(["campaign", str(folder / "small.toml"), "--set", "training.lr=-1",
                "--data", str(data), "--out", str(out)]) == 2
    assert "entry[0] (slow) [tiny.toml]: training.lr: got -1" in capsys.readouterr().err
    assert cli(["campaign", str(folder / "small.toml"), "--data", str(tmp_path / "nowhere"),
                "--out", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert not out.exists()


def test_data_folders_per_dataset(tmp_path, folder):
    _, runs = cp.plan_campaign(folder / "small.toml")
    (tmp_path / "root" / "mnist").mkdir(parents=True)
    assert cp.data_dirs([str(tmp_path / "root")], runs) == {"mnist": str(tmp_path / "root" /
                                                                          "mnist")}
    assert cp.data_dirs([f"mnist={tmp_path}"], runs) == {"mnist": str(tmp_path)}
    assert cp.data_dirs([], runs) == {"mnist": None}
    two = runs + [r for r in cp.plan_campaign(folder / "small.toml",
                                              ['data.dataset="fashion-mnist"'])[1]]
    assert cp.data_dirs([str(tmp_path / "root")], two) == {
        "mnist": str(tmp_path / "root" / "mnist"), "fashion-mnist": None}   # looked up
    with pytest.raises(ValidationError, match="unknown data set"):
        cp.data_dirs([f"svhn={tmp_path}"], runs)


# -- the real thing --------------------------------------------------------------------------------
def _summary(out, run):
    return json.loads((out / "runs" / run / "summary.json").read_text())


def test_small_campaign_runs_then_rerun_skips(folder, tmp_path, data, capsys):
    out = tmp_path / "camp"
    argv = ["campaign", str(folder / "small.toml"), "--data", str(data), "--out", str(out),
            "--workers", "2", "--no-progress"]
    assert cli(argv) == 0
    assert "0 already finished, 4 to run" in capsys.readouterr().err
    assert _no_worker_processes_left()

    rows = _rows(out)
    assert [r["run"] for r in rows] == ["slow_seed-0", "slow_seed-1", "fast_seed-0",
                                        "fast_seed-1"]
    assert all(r["status"] == "ok" for r in rows), rows
    assert [r["entry"] for r in rows] == ["slow", "slow", "fast", "fast"]
    assert [r["column"] for r in rows] == ["eta 0.05"] * 2 + ["eta 0.1"] * 2
    for r in rows:    # the CSV holds what the run directory says
        s = _summary(out, r["run"])
        assert s["complete"] and s["epochs_done"] == 2 and s["seed"] == int(r["seed"])
        assert float(r["final_test_accuracy"]) == s["final_test_accuracy"]
        with open(out / "runs" / r["run"] / "metrics.csv", newline="") as f:
            first = next(csv.DictReader(f))
        assert float(r["test_accuracy@1"]) == pytest.approx(float(first["test_accuracy"]),
                                                            rel=1e-12)
        assert 0.0 <= float(r["trace:angle:F@last"]) <= 180.0

    # results.md: mean and sample std (n - 1) over the two seeds, read back from summary.json
    md = (out / "results.md").read_text()
    for entry in ("slow", "fast"):
        accs = [_summary(out, f"{entry}_seed-{s}")["final_test_accuracy"] for s in (0, 1)]
        mean = sum(accs) / 2
        std = math.sqrt(sum((a - mean) ** 2 for a in accs))          # n - 1 = 1
        assert f"{100 * mean:.2f} ± {100 * std:.2f} %" in md, (entry, accs, md)
    assert "| | eta 0.05, final | eta 0.05, epoch 1 | eta 0.05, angle F | eta 0.1, final" in md
    assert "| anchor (published) |" in md and "eta 0.05: about 98.0 (a quoted figure) |" in md
    assert "`training.epochs=2`" in md and "`training.lr=0.1`" in md
    second = md.split("## Best, without anchors")[1].split("## ")[0]
    assert "| | eta 0.05 | eta 0.1 |" in second and "anchor" not in second
    for name in ("curves", "angle"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}](figures/{name}.png)" in md
    spec = json.loads((out / "campaign.json").read_text())
    assert spec["name"] == "small" and len(spec["runs"]) == 4

    # re-run: nothing to do, no cluster, the run folders untouched
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    t0 = time.perf_counter()
    assert cli(argv) == 0
    assert "4 already finished, 0 to run" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 20
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert [r["status"] for r in _rows(out)] == ["ok"] * 4
    assert (out / "results.md").read_text().count(" ± ") == md.count(" ± ")

    # --set changes every entry's settings: the finished runs do not match, refused
    assert cli(argv + ["--set", "training.momentum=0.5"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert _no_worker_processes_left()


def test_a_folder_of_other_files_is_refused(folder, tmp_path, data, capsys):
    out = tmp_path / "camp"
    out.mkdir()
    (out / "results.md").write_text("mine")
    assert cli(["campaign", str(folder / "small.toml"), "--data", str(data), "--out",
                str(out)]) == 2
    assert (out / "results.md").read_text() == "mine"
    err = capsys.readouterr().err
    assert "already holds results.md" in err and "re-run the same campaign command" in err


# -- the smoke run of every shipped campaign (real MNIST and Fashion-MNIST) ---------------
def _fashion_available() -> bool:
    from neurosim.datasets import load_dataset

    try:
        load_dataset("fashion-mnist", train_limit=10, download=False)
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("path", CAMPAIGNS, ids=lambda p: p.stem)
def test_shipped_campaign_smoke_run(path, tmp_path, capsys):
    if not (MNIST / "train-images-idx3-ubyte.gz").is_file() or not _fashion_available():
        pytest.skip("needs the MNIST and Fashion-MNIST files (docs/datasets.md)")
    out = tmp_path / path.stem
    argv = ["campaign", str(path), "--set", "training.epochs=1", "--set",
            "data.train_limit=1000", "--data", f"mnist={MNIST}", "--out", str(out),
            "--workers", "2", "--no-progress"]
    assert cli(argv) == 0
    camp, runs = cp.plan_campaign(path, ["training.epochs=1", "data.train_limit=1000"])
    rows = _rows(out)
    assert len(rows) == len(runs)
    assert all(r["status"] in ("ok", "diverged") for r in rows), rows
    assert sum(r["status"] == "ok" for r in rows) >= len(rows) // 2
    md = (out / "results.md").read_text()
    for t in camp.tables:
        assert f"## {t['title']}" in md
    assert _no_worker_processes_left()
