"""``neurosim report`` on a run directory and on a sweep folder (issue 6, part 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _tinyrun import write_tiny_scenario
from neurosim import scenario as sc
from neurosim import sweep as sw
from neurosim import training
from neurosim.cli import main as cli

PNG = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = ["report-learning-curves.png", "report-alignment-angles.png", "report-goodness.png",
             "report-traces.png"]


@pytest.fixture(scope="module")
def scen(tmp_path_factory):
    return write_tiny_scenario(tmp_path_factory.mktemp("scen"), epochs=2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data, scen):
    out = tmp_path_factory.mktemp("run") / "run"
    training.run(sc.load(scen), out, data_dir=data, progress=False, log=lambda *a: None)
    return out


def _check_files(d: Path, names):
    for name in names:
        p = d / name
        assert p.is_file() and p.stat().st_size > 1000, name
        assert p.read_bytes()[:8] == PNG, name


def test_report_of_a_run(run_dir, capsys):
    assert cli(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    _check_files(run_dir, RUN_PLOTS)
    md = (run_dir / "report.md").read_text()
    assert md.startswith("# Report: tiny")
    for name in RUN_PLOTS:
        assert f"]({name})" in md and str(run_dir / name) in printed
    assert "| final_test_accuracy |" in md and "## Epochs" in md and "| 2 |" in md
    assert "`angle:F`" in md and "`W1.norm`" in md and "`hidden.r@modulated`" in md


def test_report_without_monitors_says_what_is_missing(tmp_path, data, scen):
    plain = tmp_path / "plain.toml"
    plain.write_text(scen.read_text().split("[[monitor]]")[0])
    out = tmp_path / "run"
    training.run(sc.load(plain, ["training.epochs=1"]), out, data_dir=data, progress=False,
                 log=lambda *a: None)
    assert cli(["report", str(out)]) == 0
    _check_files(out, ["report-learning-curves.png"])
    md = (out / "report.md").read_text()
    assert "no alignment angles to plot" in md and "no monitored traces" in md
    assert not (out / "report-alignment-angles.png").exists()


def test_report_of_a_diverged_run_mentions_the_error(tmp_path, data, scen):
    out = tmp_path / "run"
    with pytest.raises(Exception):
        training.run(sc.load(scen, ["training.milestones=[1]", "training.gamma=1e7"]), out,
                     data_dir=data, progress=False, log=lambda *a: None)
    assert cli(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "stopped with an error" in md and "SimulationError" in md


def test_report_of_a_sweep(tmp_path, data, scen):
    """A sweep folder built with the sweep's own pieces, run in-process (no cluster)."""
    out = tmp_path / "sweep"
    grid, base, runs = sw.plan_sweep(scen, ["training.lr=0.05,0.1"], "2", ["training.epochs=1"])
    for r in runs:
        r.run_dir = out / "runs" / r.name
        res = sw.run_one(r.settings, str(r.run_dir), str(data))
        r.status = res["status"]
        r.row = sw._row(r, res["summary"], res["error"])
    spec = {"scenario": str(scen), "scenario_name": "tiny", "grid": grid, "seeds": 2,
            "seed0": 0, "overrides": [], "data": str(data), "runs": [r.name for r in runs]}
    (out / "sweep.json").write_text(json.dumps(spec))
    sw.write_csv(out, grid, runs)
    sw.write_summary(out, spec, grid, runs, {"ran": 4, "skipped": 0, "wall_s": 1.0})
    assert cli(["report", str(out)]) == 0
    _check_files(out, RUN_PLOTS + ["report-final-metrics.png"])
    md = (out / "report.md").read_text()
    assert md.startswith("# Sweep report: tiny")
    assert "| lr=0.05 | 2/2 |" in md and "| lr=0.1 | 2/2 |" in md and " ± " in md
    assert not (runs[0].run_dir / "report.md").exists()     # only with --runs


def test_report_of_something_else(tmp_path, capsys):
    assert cli(["report", str(tmp_path)]) == 2
    assert "holds neither a run" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "metrics.csv").write_text("epoch,test_accuracy\n1,0.5\n")
    (tmp_path / "traces.npz").write_bytes(b"garbage")
    assert cli(["report", str(tmp_path)]) == 2
    assert "traces.npz" in capsys.readouterr().err
