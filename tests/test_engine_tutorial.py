"""The tutorial of docs/engine.md ("Tutorial: a recurrent circuit that learns with a local rule")
runs as written: the code block is taken from the document and executed in a scratch folder.

Threshold: the untrained readout (D = 0) has the relative error 1. PES is least mean squares on
E's rates; their large-variance directions (the linearised circuit's response to x) contract by
~0.3 per epoch (tests/test_local_scenarios.py), so after 5 epochs what remains is the tanh's
curvature, ~0.05 for these input gains (scenario pes_map's reference, the readout exact for the
linearised circuit); 0.1 is twice that floor and ten times below the start."""

from __future__ import annotations

import re

import matplotlib
import numpy as np

from _tinyrun import REPO


def _tutorial_block() -> str:
    text = (REPO / "docs" / "engine.md").read_text()
    section = text.split("## Tutorial: a recurrent circuit", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_engine_tutorial_runs_and_learns(tmp_path, monkeypatch, capsys):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "tutorial"}
    exec(compile(_tutorial_block(), str(REPO / "docs" / "engine.md"), "exec"), ns)
    err = float(capsys.readouterr().out.split()[-1])
    assert err == round(float(ns["err"]), 3) and err < 0.1
    W, syn = ns["W"], ns["syn"]
    assert W.values.shape == (20, 2, 64) and list(W.trial) == list(range(0, 80, 4))
    assert syn.values.shape == (80, 2)
    # the chosen synapses are entries of the recorded matrices, and the last record is the
    # trained readout
    np.testing.assert_array_equal(syn.values[W.trial], W.values[:, [0, 1], [0, 5]])
    np.testing.assert_array_equal(syn.values[-1], ns["sim"].weights["D"][[0, 1], [0, 5]])
    assert (tmp_path / "pes_weights.png").stat().st_size > 10000
