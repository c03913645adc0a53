"""Saving and loading simulators (``Simulator.save`` / ``Simulator.load``) and opening run
directories (``neurosim.load_run``), issue 12 item 3.

The contract is bit-identity: a simulator saved after some minibatches and loaded again holds
the same bits in every buffer, scalar slot, counter and monitor record, and training both further
(the original and the loaded one, the same minibatches, into the next epoch) gives the same bits
again. Every comparison here is of raw bytes, not within a tolerance. Data: the tiny synthetic
MNIST-format set of tests/_tinyrun.py and the small random sets of conftest.py.
"""

from __future__ import annotations

import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from _tinyrun import dataset_scenarios, write_tiny_scenario
from conftest import make_data
from neurosim import (SGD, Circuit, Given, Monitor, Normal, Oja, PEPITA, Phase, Protocol,
                      Simulator, ValidationError, compile_plan, load_run, register_type)
from neurosim import saving
from neurosim import scenario as sc
from neurosim import training
from neurosim.cli import main as cli
from neurosim.diagnostics import GradientAlignment
from neurosim.init import AbstractInit
from neurosim.models import build_pepita_network
from neurosim.models.forward_forward import FFSimulator
from neurosim.simulator import shuffled_order

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = dataset_scenarios()


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_state(a: Simulator, b: Simulator):
    """Every bit of the state: arena, scalar slots, counters, monitor records."""
    assert type(a) is type(b)
    assert same_bits(a.mem, b.mem)
    assert same_bits(a.scal, b.scal)
    assert (a.trial, a.step, a.epoch) == (b.trial, b.step, b.epoch)
    ta, tb = a.traces, b.traces
    assert list(ta) == list(tb)
    for k in ta:
        for field in ("values", "t", "trial", "step"):
            assert same_bits(getattr(ta[k], field), getattr(tb[k], field)), (k, field)


def enter_epoch(sim, epoch):
    sim.set_lr(sim.plan.optimizer.lr_at(epoch))
    sim.set_epoch(epoch)


# -- every shipped scenario --------------------------------------------------------------------------
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_round_trips_bit_identically(name, data, tmp_path):
    settings = sc.load(REPO / "scenarios" / name, [f"data.dir={data}", "data.verify=false",
                                                   "data.dataset=mnist"])
    ds, x_test, _ = training.load_data(settings)
    x, y = ds.x_train, ds.y_train
    n, B, seed = len(y), settings["training"]["batch_size"], settings["training"]["seed"]
    # monitor intervals in epochs resolved for this data set, as `neurosim run` does: records
    sim = training.simulator_for(settings, n)
    o0, o1, o2 = (shuffled_order(seed, e, n) for e in range(3))
    enter_epoch(sim, 0)
    sim.train(x, y, o0[:2 * B + 5])       # two minibatches and a partial one
    enter_epoch(sim, 1)                   # saved within epoch 1: its schedules' slot values
    sim.train(x, y, o1[:B])
    path = sim.save(tmp_path / "sim.npz")
    loaded = Simulator.load(path)
    assert_same_state(sim, loaded)
    assert loaded.backend.name == sim.backend.name and loaded.threads == sim.threads
    for s in (sim, loaded):               # the rest of epoch 1, then epoch 2
        s.train(x, y, o1[B:2 * B])
        enter_epoch(s, 2)
        s.train(x, y, o2[:2 * B])
    assert_same_state(sim, loaded)
    assert sim.trial == 7
    assert same_bits(sim.predict(x_test[:64]), loaded.predict(x_test[:64]))
    if sim.plan.monitors:
        assert any(len(t.values) for t in loaded.traces.values()), name


def test_forward_forward_loads_as_ffsimulator(data, tmp_path):
    settings = sc.load(REPO / "scenarios" / "ff_mnist.toml",
                       [f"data.dir={data}", "data.verify=false", "model.sizes=[784, 40, 30, 20]",
                        "model.classify=softmax", "model.eval_batch=50"])
    ds, x_test, y_test = training.load_data(settings)
    sim = training.simulator_for(settings, len(ds.y_train))
    enter_epoch(sim, 0)
    sim.train(ds.x_train, ds.y_train, np.arange(200))
    sim.evaluate(x_test, y_test)          # builds the evaluation plan; not part of the state
    loaded = Simulator.load(sim.save(tmp_path / "ff.npz"))
    assert isinstance(loaded, FFSimulator)
    assert (loaded.classify, loaded.eval_batch) == ("softmax", 50)
    assert loaded.network.circuit is loaded.plan.circuit      # one object, as when built
    assert loaded.network.layers == sim.network.layers
    assert loaded.network.rules == sim.network.rules
    assert_same_state(sim, loaded)
    for s in (sim, loaded):
        s.train(ds.x_train, ds.y_train, np.arange(200, 384))
    assert_same_state(sim, loaded)
    assert loaded.evaluate(x_test, y_test) == sim.evaluate(x_test, y_test)
    assert loaded.last_evaluation["goodness"] == sim.last_evaluation["goodness"]
    # FFSimulator.load accepts its own files; a plain simulator's file is refused by it
    assert isinstance(FFSimulator.load(tmp_path / "ff.npz"), FFSimulator)


# -- circuits built in Python ----------------------------------------------------------------------
def test_pepita_network_from_the_python_api(data_30_5, tmp_path):
    X, Y = data_30_5
    net = build_pepita_network((30, 20, 5), dropout=0.2, convention="iclr2024")
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule],
                        optimizer=SGD(lr=0.05, momentum=0.9, weight_decay=1e-4,
                                      milestones=(1,), gamma=0.5),
                        monitors=[Monitor("W1.norm", every=2), GradientAlignment("W1"),
                                  Monitor("hidden.r", phase="modulated", units=(2, 7),
                                          sample="mean"),
                                  Monitor("W2.w", every=2), Monitor("W1.dw", every=3),
                                  Monitor("W1.w", synapses=[(0, 1), (7, 29)], name="syn")],
                        batch=8, seed=11, fuse=False)
    sim = Simulator(plan)
    enter_epoch(sim, 0)
    sim.train(X[:24], Y[:24])
    enter_epoch(sim, 1)                 # the milestone halves the learning rate (a scalar slot)
    sim.train(X[24:], Y[24:])
    loaded = Simulator.load(sim.save(tmp_path / "pepita.npz"))
    assert loaded.plan.fuse is False and loaded.lr == 0.025
    assert_same_state(sim, loaded)
    for s in (sim, loaded):
        s.train(X, Y, np.arange(39, -1, -1))
    assert_same_state(sim, loaded)


def _recurrent_circuit():
    """A user's own circuit: input -> E (tanh, tau 20 ms, a bias per unit) with a fixed
    recurrent projection given as an array, Oja's rule on the input weights, a stimulus phase
    and a delay phase in time mode."""
    rng = np.random.default_rng(5)
    c = Circuit("recurrent")
    c.population("inp", 6)
    c.population("E", 8, tau="20 ms", transfer="tanh", bias=np.linspace(-0.1, 0.1, 8))
    c.project("inp", "E", name="Win", init=Normal(mean=0.0, std=0.3))
    c.project("E", "E", name="Wrec", plastic=False,
              init=Given(rng.normal(0.0, 0.2, (8, 8)).astype(np.float32)))
    proto = Protocol((Phase("stim", clamp={"inp": "x"}, duration="30 ms"),
                      Phase("delay", duration="20 ms", reset=False)), mode="time", dt="1 ms")
    return compile_plan(c, proto, rules=[Oja("Win", phase="stim", timing="continuous")],
                        optimizer=SGD(lr=0.02, momentum=0.5),
                        monitors=[Monitor("E.r", phase="delay", every=5), Monitor("Win.norm"),
                                  Monitor("E.drive", phase="stim", per="trial", sample=1)],
                        batch=4, seed=7)


def test_recurrent_time_mode_circuit_with_free_runs(data_6_3, tmp_path):
    X, _ = data_6_3
    sim = Simulator(_recurrent_circuit())
    sim.train(X[:8])
    sim.set_stimulus("x", X[8:12])
    sim.run(steps=13, phase="stim")
    loaded = Simulator.load(sim.save(tmp_path / "rec.npz"))
    assert_same_state(sim, loaded)
    assert same_bits(loaded.weights["Wrec"], sim.weights["Wrec"])
    for s in (sim, loaded):   # the free run continues from the held state and stimulus
        s.run(steps=7, phase="stim")
        s.run("5 ms", phase="delay")
        s.train(X[8:])
    assert_same_state(sim, loaded)
    assert len(loaded.traces["E.r"].values) > 3


def test_state_reset_values_and_other_backend(data_30_5, tmp_path):
    """A loaded simulator's initial values are the compiled ones (reset(everything=True) gives a
    fresh simulator), and the numpy backend can continue a file saved from the numba one."""
    X, Y = data_30_5
    net = build_pepita_network((30, 20, 5))
    plan = compile_plan(net.circuit, net.protocol, rules=[net.rule], optimizer=SGD(lr=0.05),
                        batch=8, seed=2)
    sim = Simulator(plan)
    sim.train(X, Y)
    path = sim.save(tmp_path / "s.npz")
    loaded = Simulator.load(path, backend="numpy")
    assert loaded.backend.name == "numpy"
    assert same_bits(loaded.mem, sim.mem)
    loaded.reset(everything=True)
    assert same_bits(loaded.mem, Simulator(plan).mem)


# -- what cannot be saved, and files that cannot be loaded ------------------------------------------
@dataclass(frozen=True)
class MyPEPITA(PEPITA):
    """A user's rule type (PEPITA's build function through the class hierarchy)."""

    note: str = "mine"


class ScaledOnes(AbstractInit):
    """An initialiser that is not a dataclass."""

    def sample(self, shape, rng):
        return np.full(shape, 0.01, np.float32)


def _pepita_plan(rule=None, init=None):
    net = build_pepita_network((30, 20, 5), dropout=0.0)
    if init is not None:
        c = Circuit("custom")
        for p in net.circuit.populations.values():
            c.add(p)
        for p in net.circuit.projections.values():
            c.project(p.pre, p.post, name=p.name, init=init if p.name == "W1" else p.init,
                      role=p.role, phases=p.phases, plastic=p.plastic, gain=p.gain)
        net = type(net)(c, net.protocol, net.rule, net.layers, net.feedback)
    return compile_plan(net.circuit, net.protocol, rules=[rule or net.rule],
                        optimizer=SGD(lr=0.05), batch=8, seed=1)


def test_unregistered_types_are_refused_at_save_time(tmp_path, data_30_5, monkeypatch):
    X, Y = data_30_5
    sim = Simulator(_pepita_plan(MyPEPITA(convention="icml2022", feedback="F")))
    sim.train(X, Y)
    with pytest.raises(ValidationError, match=r"plan\.rules\[0\] is a .*MyPEPITA.*not a "
                       r"registered") as e:
        sim.save(tmp_path / "a.npz")
    assert "register_type(MyPEPITA)" in e.value.hint
    assert not (tmp_path / "a.npz").exists()
    with pytest.raises(ValidationError, match="ScaledOnes") as e:
        Simulator(_pepita_plan(init=ScaledOnes())).save(tmp_path / "b.npz")
    assert "frozen dataclass" in e.value.hint
    # registered, it saves and loads
    monkeypatch.setattr(saving, "_REGISTRY", dict(saving._REGISTRY))
    monkeypatch.setattr(saving, "_NAMES", dict(saving._NAMES))
    register_type(MyPEPITA)
    loaded = Simulator.load(sim.save(tmp_path / "a.npz"))
    assert loaded.plan.rules[0] == sim.plan.rules[0]
    assert_same_state(sim, loaded)
    # a process that has not registered it cannot load the file, and says why
    del saving._REGISTRY["MyPEPITA"]
    del saving._NAMES[MyPEPITA]
    with pytest.raises(ValidationError, match="'MyPEPITA', which is not registered"):
        Simulator.load(tmp_path / "a.npz")
    with pytest.raises(ValidationError, match="already registered"):
        register_type(MyPEPITA, name="PEPITA")


def test_a_circuit_changed_after_compile_is_refused_at_save_time(tmp_path):
    net = build_pepita_network((30, 20, 5))
    sim = Simulator(compile_plan(net.circuit, net.protocol, rules=[net.rule],
                                 optimizer=SGD(lr=0.05), batch=8))
    net.circuit.population("extra", 3)
    with pytest.raises(ValidationError, match="compiles to another plan"):
        sim.save(tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()


def _rewrite(path: Path, out: Path, edit_header=None, edit_arrays=None, keep_sha=False):
    """A copy of a saved file with the header or arrays edited; the SHA-256 recomputed (as
    another program writing a valid file would) unless ``keep_sha``."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(bytes(arrays["header"]).decode())
    if edit_header:
        edit_header(header)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    if edit_arrays:
        edit_arrays(arrays)
    if not keep_sha:
        del arrays["sha256"]
        arrays["sha256"] = np.frombuffer(saving._checksum(arrays).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    out.write_bytes(buf.getvalue())
    return out


def test_corrupt_truncated_and_foreign_files(tmp_path, data_30_5):
    X, Y = data_30_5
    sim = Simulator(_pepita_plan())
    sim.train(X, Y)
    good = sim.save(tmp_path / "good.npz")
    raw = good.read_bytes()

    def refused(path, pattern):
        with pytest.raises(ValidationError, match=pattern) as e:
            Simulator.load(path)
        assert str(path) in str(e.value)
        return e.value

    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    refused(tmp_path / "cut.npz", "corrupt, truncated")
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    (tmp_path / "flip.npz").write_bytes(bytes(flipped))
    refused(tmp_path / "flip.npz", "corrupt")

    def bump(arrays):
        key = next(k for k in arrays if k.startswith("buffer."))
        arrays[key] = arrays[key] + np.float32(1.0)
    refused(_rewrite(good, tmp_path / "edited.npz", edit_arrays=bump, keep_sha=True),
            "SHA-256 .* does not match")
    (tmp_path / "text.npz").write_text("not an archive")
    refused(tmp_path / "text.npz", "cannot read")
    np.savez(tmp_path / "other.npz", a=np.arange(3))
    refused(tmp_path / "other.npz", "not a saved simulator")
    refused(tmp_path / "missing.npz", "no file")
    refused(_rewrite(good, tmp_path / "nobuffers.npz", edit_header=lambda h: h.pop("buffers")),
            "malformed")
    e = refused(_rewrite(good, tmp_path / "future.npz",
                         edit_header=lambda h: h.update(version=99)), "format version 99")
    assert "neurosim version" in e.hint
    with pytest.raises(ValidationError, match="holds a Simulator, not a FFSimulator"):
        FFSimulator.load(good)


def test_a_plan_compiled_differently_is_refused_unless_not_strict(tmp_path, data_30_5):
    """The fingerprint: a file whose plan differs from the one compiled now (another neurosim
    version) is refused; strict=False restores the state by name."""
    X, Y = data_30_5
    sim = Simulator(_pepita_plan())
    sim.train(X, Y)
    other = _rewrite(sim.save(tmp_path / "s.npz"), tmp_path / "other.npz",
                     edit_header=lambda h: h.update(fingerprint="0" * 64))
    with pytest.raises(ValidationError, match="differs from the saved plan") as e:
        Simulator.load(other)
    assert "strict=False" in e.value.hint
    assert_same_state(sim, Simulator.load(other, strict=False))

    def rename(h):
        h["buffers"] = [[n.replace("W1.W", "W9.W"), k, key] for n, k, key in h["buffers"]]
    with pytest.raises(ValidationError, match="weight buffer 'W9.W', which the compiled plan "
                       "lacks"):
        Simulator.load(_rewrite(tmp_path / "s.npz", tmp_path / "renamed.npz",
                                edit_header=rename), strict=False)


def test_description_round_trip_is_exact(data):
    """Every shipped scenario's description: written, read back and written again gives the
    same JSON and arrays (so the recompiled plan is the same plan)."""
    for name in SCENARIOS:
        settings = sc.load(REPO / "scenarios" / name, [f"data.dir={data}"])
        plan = training.simulator_for(settings).plan
        desc, enc = saving.describe(plan)
        again, _ = saving.compile_description(json.loads(json.dumps(desc)), enc.arrays)
        desc2, enc2 = saving.describe(again)
        assert desc2 == desc, name
        assert all(same_bits(enc.arrays[k], enc2.arrays[k]) for k in enc.arrays), name
        assert saving.plan_fingerprint(again) == saving.plan_fingerprint(plan), name


# -- run directories -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data):
    """A real `neurosim run` output folder: the tiny PEPITA scenario, 2 epochs."""
    root = tmp_path_factory.mktemp("run")
    scen = write_tiny_scenario(root, epochs=2)
    out = root / "out"
    assert cli(["run", str(scen), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    return out


def test_load_run_evaluates_and_trains_on(tiny_run, tmp_path):
    run = load_run(tiny_run)
    assert run.settings["name"] == "tiny" and run.epochs_done == 2
    assert run.checkpoint.name == "epoch-0002.npz"
    assert [r["epoch"] for r in run.metrics] == [1, 2]
    assert run.summary["epochs_done"] == 2
    sim = run.simulator
    assert (sim.epoch, sim.trial) == (2, 2 * 12)            # 384 samples / batch 32
    ds, x_test, y_test = run.load_data()
    # the same bits as the run's own evaluation after its last epoch
    assert sim.evaluate(x_test, y_test) == run.metrics[-1]["test_accuracy"]
    assert sim.predict(x_test).shape == (len(y_test),)
    assert len(sim.traces["W1.norm"].values) == 2 * 12 // 3
    # one more epoch here, and the same run resumed for a third epoch by the command line
    assert run.train_epoch(ds.x_train, ds.y_train) == 3
    acc = sim.evaluate(x_test, y_test)
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    assert cli(["run", "--resume", str(resumed), "--set", "training.epochs=3",
                "--no-progress"]) == 0
    ref = load_run(resumed)
    assert ref.epochs_done == 3 and ref.metrics[-1]["test_accuracy"] == acc
    assert same_bits(sim.mem, ref.simulator.mem)
    assert_same_state(sim, ref.simulator)
    # a loaded run's simulator saves and loads like any other
    assert_same_state(sim, Simulator.load(sim.save(tmp_path / "from-run.npz")))


def test_load_run_refuses_folders_that_are_not_runs(tiny_run, tmp_path):
    with pytest.raises(ValidationError, match="is not a directory"):
        load_run(tmp_path / "nothing")
    with pytest.raises(ValidationError, match="has no scenario.toml"):
        load_run(tmp_path)
    empty = tmp_path / "no-checkpoint"
    empty.mkdir()
    shutil.copy(tiny_run / "scenario.toml", empty / "scenario.toml")
    with pytest.raises(ValidationError, match="holds no checkpoint"):
        load_run(empty)
    # a checkpoint is not a saved simulator, and says where to go
    with pytest.raises(ValidationError, match="training checkpoint") as e:
        Simulator.load(tiny_run / "checkpoints" / "epoch-0002.npz")
    assert "load_run" in e.value.hint
    # a checkpoint of another scenario is refused by the checkpoint loader
    with pytest.raises(ValidationError, match="another scenario"):
        load_run(tiny_run, overrides=["training.lr=0.5"])
