"""The two-process warm-up of the interpreter's callees on an empty numba cache
(neurosim/kernels/warm.py): it must compile exactly the signatures run_trials asks for, so that
run_trials, compiled afterwards, loads every callee instead of compiling it again; and it must
change no result."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from neurosim.kernels import warm

# a child process with its own empty cache: trains a small PEPITA network (every op family a
# classifier run uses: GEMMs, transfers, dropout, SGD, monitors, evaluation) and reports which
# numba functions this process compiled itself, and the trained weights
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from numba.core import event as ev
    compiled = []
    class L(ev.Listener):
        def on_start(self, e): pass
        def on_end(self, e): compiled.append(e.data["dispatcher"].py_func.__name__)
    ev.register("numba:compile", L())
    from neurosim import Monitor, SGD, Simulator, compile_plan
    from neurosim.models import build_pepita_network
    net = build_pepita_network((30, 16, 5), convention="icml2022", mode="steady")
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.05),
                        monitors=[Monitor("angle:F", every=2)], batch=8, seed=0)
    rng = np.random.default_rng(0)
    X = rng.random((40, 30), dtype=np.float32)
    Y = rng.integers(0, 5, size=40).astype(np.int64)
    sim = Simulator(plan)
    sim.train(X, Y)
    acc = sim.evaluate(X, Y)
    print(json.dumps({"compiled": compiled, "W1": sim.buffer("W1.W").tolist(), "acc": acc}))
""")


def _run_child(tmp_path, warmup: str):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / f"cache-{warmup}"),
               NEUROSIM_WARMUP=warmup, NEUROSIM_QUIET="1", NUMBA_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    import json

    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_warmup_leaves_only_run_trials_to_compile(tmp_path):
    """With the warm-up, this process compiles group 0 and run_trials, nothing of group 1 (the
    child's): every signature the child cached is the one run_trials needs. Without it, the
    same functions compile here. Results are identical either way. Two cold compiles: slow."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the warm-up needs two usable cores")
    on = _run_child(tmp_path, "1")
    off = _run_child(tmp_path, "0")
    mine, childs = set(warm.GROUPS[0]), set(warm.GROUPS[1])
    assert childs & set(off["compiled"]) == childs, off["compiled"]   # the control compiles them
    assert not childs & set(on["compiled"]), on["compiled"]
    # group 0 once each (its warm-up signatures are the ones run_trials uses: no second compile)
    for name in mine & set(on["compiled"]):
        assert on["compiled"].count(name) == 1, on["compiled"]
    assert on["compiled"].count("run_trials") == 1
    assert on["W1"] == off["W1"] and on["acc"] == off["acc"]


def test_spec_records_layout_dtype_and_writability():
    a = np.zeros((3, 4), np.float32)
    f = np.asfortranarray(a)
    s = a[:, ::2]
    ro = np.zeros(5, np.int64)
    ro.setflags(write=False)
    spec = warm.spec_of((a, f, s, ro, 3))
    assert spec == {"mem": ("<f4", 2, "C", True), "bufs": ("<f4", 2, "F", True),
                    "prog": ("<f4", 2, "A", True), "fprm": ("<i8", 1, "C", False)}
    from numba import typeof

    for name in spec:   # the dummies carry the same numba types as the originals
        orig = {"mem": a, "bufs": f, "prog": s, "fprm": ro}[name]
        assert typeof(warm._dummy(spec, name)) == typeof(orig)


def test_warmup_off_with_one_core_or_when_disabled(monkeypatch):
    monkeypatch.setenv("NEUROSIM_WARMUP", "0")
    assert warm.two_process_warmup(()) is False
    monkeypatch.setenv("NEUROSIM_WARMUP", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert warm.two_process_warmup(()) is False


def test_every_group_member_has_a_warm_call():
    spec = {"mem": ("<f4", 1, "C", True), "bufs": ("<i8", 2, "C", False),
            "keys": ("<u8", 1, "C", False), "X": ("<f4", 2, "C", True),
            "Y": ("<i8", 1, "C", True), "T": ("<f4", 2, "C", True),
            "order": ("<i8", 1, "C", True), "rec": ("<f4", 1, "C", True),
            "stamps": ("<i8", 1, "C", True), "rec_meta": ("<i8", 2, "C", True),
            "rec_cnt": ("<i8", 1, "C", True), "out": ("<f4", 2, "C", True)}
    calls = warm._calls(spec)
    names = [n for g in warm.GROUPS for n in g]
    assert len(names) == len(set(names)) and set(names) == set(calls)


def test_dispatch_opt_level_only_inside_and_not_over_the_user(monkeypatch):
    """The interpreter's own first compile runs at -O DISPATCH_OPT; numba's setting is restored
    afterwards, and a user's NUMBA_OPT wins."""
    from numba.core import config

    from neurosim import backend

    before = int(config.OPT)
    monkeypatch.delenv("NUMBA_OPT", raising=False)
    with backend._first_compile_opt_level(True):
        assert int(config.OPT) == backend.DISPATCH_OPT
    assert int(config.OPT) == before
    with backend._first_compile_opt_level(False):
        assert int(config.OPT) == before
    monkeypatch.setenv("NUMBA_OPT", "3")
    with backend._first_compile_opt_level(True):
        assert int(config.OPT) == before
