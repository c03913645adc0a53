"""Analysis that works on every run (issue 12, items 2 and 4): a 1-epoch run on a small training
set still gets traces of at least 3 points and plots with something drawn in them; the report
refuses a convergence fit it cannot make; ``neurosim run`` logs one line per epoch when stdout is
not a terminal.

The default suite runs two shipped scenarios on the tiny synthetic MNIST-format data; the slow
test runs every shipped training scenario for one epoch on 2000 genuine samples.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _tinyrun import HAVE_MNIST, MNIST, REPO, write_tiny_scenario
from neurosim import report, training
from neurosim import scenario as sc

FASHION = Path("/usr/share/datasets/fashion-mnist")
PLOTS = ("report-learning-curves.png", "report-alignment-angles.png", "report-goodness.png",
         "report-traces.png")
# not trained on a data set by `neurosim run`: the Brian2 cross-check circuit (no rule; its own
# command), the teacher-student ODE comparison and the local-rule scenarios (their own runners
# on synthetic data, tests/test_local_scenarios.py)
NOT_TRAINED = {"crosscheck_small.toml", "teacher_student.toml", "oja_pca.toml",
               "bcm_selectivity.toml", "pes_map.toml"}
TRAINED = sorted(p for p in (REPO / "scenarios").glob("*.toml") if p.name not in NOT_TRAINED)


def _visible(line) -> bool:
    """A data line shows something: a marker on a finite point, or a line through two."""
    y = np.asarray(line.get_ydata(), float)
    finite = int(np.isfinite(y).sum())
    marker = line.get_marker() not in (None, "", " ", "None", "none")
    dashed = line.get_linestyle() not in ("", " ", "None", "none")
    return line.get_visible() and finite > 0 and (marker or (dashed and finite > 1))


@pytest.fixture
def figures(monkeypatch):
    """What every saved figure shows, by file name: per drawn axes, (curves with data that
    cannot be seen, curves with data, x label, y label, legend texts). Recorded at savefig time
    (neurosim's plots close their figures)."""
    from matplotlib.figure import Figure

    seen = {}
    save = Figure.savefig

    def spy(fig, fname, *args, **kwargs):
        panels = []
        for ax in fig.axes:
            if not ax.axison or not ax.lines:
                continue
            legend = ax.get_legend()
            data = [ln for ln in ax.lines
                    if np.isfinite(np.asarray(ln.get_ydata(), float)).any()]
            panels.append((len(data) - sum(_visible(ln) for ln in data), len(data),
                           ax.get_xlabel(), ax.get_ylabel(),
                           [t.get_text() for t in legend.get_texts()] if legend else []))
        # saved under a temporary name beside the file (.../x.png.tmp, or .x.png.PID-XXXX.tmp)
        m = re.fullmatch(r"\.?(.+?\.png)\b.*", Path(fname).name)
        seen[m.group(1) if m else Path(fname).name] = panels
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def check_short_run(out: Path, figures: dict) -> dict:
    """Every trace has >= 3 points; every plot shows every panel's data (markers where points
    are few), with both axes labelled and a legend naming the curves."""
    with np.load(out / "traces.npz") as z:
        counts = {k.rsplit("/", 1)[0]: len(z[k]) for k in z.files if k.endswith("/values")}
    assert counts, "no traces"
    short = {k: n for k, n in counts.items() if n < 3}
    assert not short, f"traces with fewer than 3 points: {short}"
    written = [p.name for p in report.report(out)]
    assert "report-learning-curves.png" in written and "report-traces.png" in written
    for name in ["learning_curve.png", *(n for n in written if n.endswith(".png"))]:
        assert (out / name).stat().st_size > 1000, name
        assert figures.get(name), f"{name}: no panel with data"
        for hidden, curves, xlabel, ylabel, legend in figures[name]:
            assert curves > 0 and hidden == 0, f"{name}: {hidden} of {curves} curves invisible"
            assert xlabel and ylabel, f"{name}: unlabelled axis ({xlabel!r}, {ylabel!r})"
            assert ylabel == "learning rate" or len(legend) >= 1, f"{name}: no legend"
    return counts


@pytest.mark.parametrize("name,extra", [("pepita_wm_mnist.toml", []),
                                        ("ff_mnist.toml", ["data.test_limit=64"])])
def test_one_short_epoch_of_a_shipped_scenario(tmp_path, data, name, extra, figures):
    # 384 samples: 6 minibatches of 64 (PEPITA) or 4 of 100 (FF); "0.1 epoch" rounds to one
    settings = sc.load(REPO / "scenarios" / name, ["training.epochs=1", "data.verify=false",
                                                   *extra])
    out = tmp_path / "run"
    run = sc.runner_for(settings) or training.run
    kw = {"log": lambda *a: None} if run is training.run else {}
    run(settings, out, data_dir=data, progress=False, **kw)
    counts = check_short_run(out, figures)
    if name.startswith("ff"):
        assert set(counts) >= {"h1.goodness@positive", "h1.goodness@negative"}
        # one panel per layer, the positive and the negative phase as two named curves
        assert [p[4] for p in figures["report-goodness.png"]] == [["negative", "positive"]] * 3
    else:
        assert set(counts) >= {"angle:F", "angle:B1", "grad_angle:W1"}


def test_epoch_lines_when_stdout_is_not_a_terminal(tmp_path, data):
    """With the progress bar on (the default) and stdout a pipe, every epoch is logged."""
    scen = write_tiny_scenario(tmp_path, epochs=2)
    p = subprocess.run([sys.executable, "-m", "neurosim.cli", "run", str(scen), "--data",
                        str(data), "--out", str(tmp_path / "run")], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "test " in lines[0] and "train running " in lines[0] and "samples/s" in lines[0]


def test_convergence_fit_is_refused_below_four_points(tmp_path, data):
    scen = write_tiny_scenario(tmp_path, epochs=2)
    short, long = tmp_path / "short", tmp_path / "long"
    training.run(sc.load(scen), short, data_dir=data, progress=False, log=lambda *a: None)
    s = json.loads((short / "summary.json").read_text())
    assert s["slowness"] is None
    assert s["slowness_note"] == ("2 test accuracies up to the first learning-rate decay; the "
                                  "2-parameter fit needs at least 4")
    report.report(short)
    assert "No fit of acc(t) = acc_max t / (s + t): 2 test accuracies" in \
        (short / "report.md").read_text()
    training.run(sc.load(scen, ["training.epochs=4"]), long, data_dir=data, progress=False,
                 log=lambda *a: None)
    s = json.loads((long / "summary.json").read_text())
    assert s["slowness"]["n_points"] == 5 and "slowness_note" not in s


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MNIST, reason=f"the genuine MNIST is not in {MNIST}")
@pytest.mark.parametrize("path", TRAINED, ids=lambda p: p.stem)
def test_every_scenario_one_epoch_on_2000_samples(tmp_path, path, figures):
    # 1000 test samples: Forward-Forward classifies by ten passes per sample, and in time mode
    # each pass is 120 steps; the whole test set would cost minutes and test nothing more here
    settings = sc.load(path, ["training.epochs=1", "data.train_limit=2000",
                              "data.test_limit=1000"])
    data = {"mnist": MNIST, "fashion-mnist": FASHION}.get(settings["data"]["dataset"])
    if data is None or not (data / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no {settings['data']['dataset']} files")
    out = tmp_path / "run"
    run = sc.runner_for(settings) or training.run
    run(settings, out, data_dir=data, progress=False)
    check_short_run(out, figures)
