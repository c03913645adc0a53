"""The Simulator: owns a compiled Plan's state and runs its programs in compiled code.

Python is entered once per chunk of minibatches (or once per ``run`` call), never per time
step. Kernel status codes become :class:`SimulationError` naming the phase, step and
population or projection.
"""

from __future__ import annotations

import numpy as np

from .backend import get_backend
from .compiler import Plan, Program
from .errors import SimulationError, ValidationError
from .optable import NONFINITE_RATE, NONFINITE_WEIGHT, OK, WEIGHT_RUNAWAY
from .monitors import Trace, Traces
from .rng import component_rng
from .units import to_seconds

_HINTS = {
    NONFINITE_RATE: ("a rate became NaN or inf", "lower the learning rate or dt, bound the drive, "
                       "or check the inputs for NaN."),
    NONFINITE_WEIGHT: ("a weight became NaN or inf", "lower the learning rate (training.lr); "
                         "the last checkpoint is intact."),
    WEIGHT_RUNAWAY: ("a weight exceeded SGD.max_weight (runaway learning)",
                       "lower the learning rate (training.lr) or add weight decay; the last "
                       "checkpoint is intact."),
}


class Simulator:
    """Run a compiled :class:`~neurosim.compiler.Plan`.

    Parameters
    ----------
    plan : Plan
    threads : int
        Threads used inside the kernels (default 1: fair on shared machines). With more, the
        large matrix products are split into blocks (one single-threaded BLAS call each) and the
        large element-wise operations into row blocks, all on numba's thread pool (at most
        ``NUMBA_NUM_THREADS``, the CPU count by default). Element-wise results are identical to
        one thread; a GEMM block may differ from the whole product in the last bits only through
        the BLAS kernel's blocking. Use it on otherwise idle cores.
    """

    def __init__(self, plan: Plan, threads: int = 1, backend: str = "numba"):
        if not isinstance(plan, Plan):
            raise ValidationError("Simulator.plan", f"got {type(plan).__name__}, expected a Plan "
                                  "from neurosim.compile_plan.")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValidationError("Simulator.threads", f"got {threads!r}, expected an int >= 1.")
        self.plan = plan
        self.threads = threads
        self.backend = get_backend(backend, threads)
        self.mem = plan.init_mem.copy()          # the simulator's own arena
        self.scal = plan.scalar_init.copy()      # scalar slots (lr, epoch gates)
        self._info = np.zeros(4, np.int64)
        self.epoch = 0
        self.trial = 0          # trials (minibatches) run so far
        self.step = 0           # time steps run so far
        self._records = {m["key"]: [] for m in plan.monitor_meta}
        self._empty_x = np.zeros((1, 1), np.float32)
        self._empty_y = np.zeros(1, np.int64)
        self._empty_o = np.zeros(0, np.int64)
        self._empty_out = np.zeros((1, 1), np.float32)

    # -- state access -----------------------------------------------------------------------------
    @property
    def weights(self) -> dict:
        """Read-only views of every projection's weights, (post, pre)."""
        out = {}
        for name in self.plan.circuit.projections:
            v = self.view(f"{name}.W").view()
            v.setflags(write=False)
            out[name] = v
        return out

    def view(self, name: str, nb: int | None = None) -> np.ndarray:
        """The live buffer ``name`` of this simulator's arena (see ``plan.buffer_index``)."""
        if name not in self.plan.buffer_index:
            raise ValidationError("Simulator.view", f"no buffer {name!r} in the plan (e.g. "
                                  f"{sorted(self.plan.buffer_index)[:6]} ...).")
        return self.plan.view(name, nb, self.mem)

    def set_weights(self, name: str, value) -> None:
        """Overwrite a projection's weights (shape (post, pre))."""
        if name not in self.plan.circuit.projections:
            raise ValidationError("Simulator.set_weights", f"no projection {name!r} (has "
                                  f"{sorted(self.plan.circuit.projections)}).")
        w = self.view(f"{name}.W")
        a = np.asarray(value, np.float32)
        if a.shape != w.shape:
            raise ValidationError(f"Simulator.set_weights({name!r})", f"shape {a.shape}, expected "
                                  f"(post, pre) = {w.shape}.", "did you pass W.T?")
        w[...] = a

    def rate(self, pop: str, phase: str | None = None, nb: int | None = None) -> np.ndarray:
        """A copy of population ``pop``'s rate at the end of ``phase`` (default: first phase)."""
        phase = phase or self.plan.protocol.phases[0].name
        key = f"{pop}.r@{phase}"
        if key not in self.plan.buffer_index:
            raise ValidationError("Simulator.rate", f"no trace {pop}@{phase} (populations "
                                  f"{sorted(self.plan.circuit.populations)}, phases "
                                  f"{[p.name for p in self.plan.protocol.phases]}).")
        return self.view(key, nb).copy()

    def buffer(self, name: str) -> np.ndarray:
        """A copy of any named plan buffer (see ``plan.buffer_index``)."""
        return self.view(name).copy()

    def set_stimulus(self, name: str, value) -> None:
        """Set a stimulus for free runs: an array (batch, size) or (size,) broadcast."""
        if name not in self.plan.stimuli:
            raise ValidationError("Simulator.set_stimulus", f"no stimulus {name!r} (the protocol "
                                  f"uses {sorted(self.plan.stimuli)}).")
        v = self.view(f"stim.{name}")
        a = np.asarray(value, np.float32)
        try:
            v[...] = np.broadcast_to(a, v.shape)
        except ValueError:
            raise ValidationError(f"Simulator.set_stimulus({name!r})", f"shape {a.shape}, "
                                  f"expected {v.shape} or ({v.shape[1]},).") from None

    @property
    def traces(self) -> Traces:
        """Monitor results, key -> :class:`Trace` (with ``t`` in seconds for step monitors and in
        trials for trial monitors); unambiguous short keys work (``"E.r"`` for ``"E.r@stim"``)."""
        out = {}
        dt = self.plan.protocol.dt
        for meta in self.plan.monitor_meta:
            chunks = self._records[meta["key"]]
            if chunks:
                vals = np.concatenate([c[0] for c in chunks])
                st = np.concatenate([c[1] for c in chunks])
            else:
                vals = np.zeros((0, meta["size"]), np.float32)
                st = np.zeros((0, 2), np.int64)
            if meta["kind"] == "stat":
                vals = vals[:, 0]
            elif "shape" in meta:      # a whole weight matrix per record
                vals = vals.reshape((len(vals),) + tuple(meta["shape"]))
            if meta["per"] == "step":
                t, unit = st[:, 1] * dt, "s"
            else:
                t, unit = st[:, 0].astype(np.float64), "trial"
            out[meta["key"]] = Trace(meta["key"], vals, t, unit, st[:, 0], st[:, 1])
        return Traces(out)

    # -- reset ------------------------------------------------------------------------------------
    def reset(self, *, rates: bool = True, weights: bool = False, optimizer: bool = False,
              rule: bool = False, monitors: bool = False, everything: bool = False) -> None:
        """Reset chosen parts of the state to their initial values; nothing is reset implicitly.

        rates: population rates, drives, masks, stimuli and scratch (and the time and trial
        counters); weights: projection weights and biases; optimizer: momentum and update
        buffers and the learning rate; rule: rule and monitor state (learned feedback factors,
        running means, counters) and statistics; monitors: recorded traces. ``everything=True``
        resets all of them: the simulator is then equal to a fresh one on the same plan.
        """
        if everything:
            rates = weights = optimizer = rule = monitors = True
        kinds = set()
        if rates:
            kinds |= {"state", "stimulus", "scratch"}
        if weights:
            kinds.add("weight")
        if optimizer:
            kinds.add("optimizer")
        if rule:
            kinds |= {"rule", "stats"}
        plan = self.plan
        for name in plan.names_of_kind(*kinds):
            i = plan.buffer_index[name]
            off, r, c, b = plan.bufs[i]
            rows = plan.batch if b else r
            self.mem[off:off + rows * c] = plan.init_mem[off:off + rows * c]
        if optimizer or rule:
            self.scal[...] = plan.scalar_init
            if not everything:    # the epoch stays: its schedules' values come back
                self.set_epoch(self.epoch)
        if rates:
            self.step = 0
            self.trial = 0
        if everything:
            self.epoch = 0
        if monitors:
            self._records = {m["key"]: [] for m in plan.monitor_meta}

    # -- running ----------------------------------------------------------------------------------
    def _call(self, program: Program, blocks, X, Y, T, order, start, n_trials, step0,
              steps_total: int, out=None):
        plan = self.plan
        meta = plan.monitor_meta
        rec_meta = np.zeros((max(len(meta), 1), 8), np.int64)
        voff = soff = 0
        for m, md in enumerate(meta):
            if md["per"] == "step":
                cap = (step0 + steps_total) // md["every"] - step0 // md["every"] + 1
            else:
                cap = n_trials // md["every"] + 1
            size = md["size"]
            rec_meta[m] = (voff, size, cap, md["every"], md.get("u0", 0),
                           md.get("u0", 0) + size, md.get("sample", 0), soff)
            voff += cap * size
            soff += 2 * cap
        rec = np.zeros(max(voff, 1), np.float32)
        stamps = np.zeros(max(soff, 1), np.int64)
        cnt = np.zeros(max(len(meta), 1), np.int64)
        status = self.backend.run(self, program, blocks, X, Y, T, order, start, n_trials,
                                  self.trial, step0, rec, stamps, rec_meta, cnt, self._info,
                                  self._empty_out if out is None else out)
        for m, md in enumerate(meta):
            k = int(cnt[m])
            if k:
                off, size = rec_meta[m, 0], rec_meta[m, 1]
                vals = rec[off:off + k * size].reshape(k, size).copy()
                if md.get("update_scale") and plan.optimizer.style == "torch":
                    vals *= self.lr * md.get("lr_scale", 1.0)
                st = stamps[rec_meta[m, 7]:rec_meta[m, 7] + 2 * k].reshape(k, 2).copy()
                self._records[md["key"]].append((vals, st))
        if status != OK:
            self._raise(program, status)

    def _raise(self, program, status):
        instr, rep, trial, block = (int(v) for v in self._info)
        section, where = program.where[instr]
        phase = section.split(":")[0] if ":" in section else section
        msg, hint = _HINTS.get(status, (f"kernel status {status}", None))
        kw = {}
        if where.startswith("population "):
            kw["population"] = where.split("'")[1]
        elif where.startswith("projection "):
            kw["projection"] = where.split("'")[1]
        step = rep if section.endswith(":loop") else None
        raise SimulationError(f"{msg} at trial {trial}", phase=phase, step=step, hint=hint, **kw)

    @property
    def lr(self) -> float:
        """The current learning rate (scalar slot ``"lr"``)."""
        i = self.plan.scalar_index.get("lr")
        return float(self.scal[i]) if i is not None else float("nan")

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every optimizer step (a scalar slot: the plan is not
        changed; per-projection ``SGD.lr_scale`` factors still apply)."""
        i = self.plan.scalar_index.get("lr")
        if i is not None:
            self.scal[i] = float(lr)

    def set_epoch(self, epoch: int) -> None:
        """Enter 0-based ``epoch``: the rules' epoch schedules (e.g. weight mirroring's
        pre-mirroring epochs and period) set their scalar slots for it."""
        self.epoch = int(epoch)
        for name, fn in self.plan.schedules:
            self.scal[self.plan.scalar_index[name]] = float(fn(self.epoch))

    def train(self, X, Y=None, order=None, *, T=None, chunk: int = 64, progress=None) -> int:
        """Train on the minibatches ``order`` (default: all rows in order) of the data.

        X: inputs (samples, features); Y: integer labels (one-hot targets); T: float targets
        (samples, outputs) for plans compiled with ``targets="values"``. Returns the number of
        trials run. ``progress`` is an optional callable receiving the number of samples done
        after each chunk of ``chunk`` minibatches (chunking never changes the result).
        """
        X, Y, order = self._data(X, Y, order, "Simulator.train")
        T = self._targets(T, X, "Simulator.train")
        B = self.plan.batch
        n_trials = -(-len(order) // B)
        done = 0
        while done < n_trials:
            n = min(chunk, n_trials - done)
            step0 = self.step
            self._call(self.plan.train, self.plan.train.blocks, X, Y, T, order, done * B, n,
                       step0, n * self.plan.train.steps_per_trial)
            self.step += n * self.plan.train.steps_per_trial
            self.trial += n
            done += n
            if progress is not None:
                progress(min(done * B, len(order)))
        return n_trials

    def predict(self, X, batch: int | None = None) -> np.ndarray:
        """Class predictions: argmax of the output population after the inference phase."""
        return self._infer(X, False)

    def outputs(self, X) -> np.ndarray:
        """The output population's rates after the inference phase, (samples, outputs)."""
        return self._infer(X, True)

    def _infer(self, X, values: bool):
        plan = self.plan
        if plan.output is None:
            raise ValidationError("Simulator.predict", "the circuit has no output population to "
                                  "classify (no error population and no output= at compile).")
        X, _, order = self._data(X, None, None, "Simulator.predict")
        Y = np.zeros(len(order), np.int64)
        T = self._targets(None, X, "Simulator.predict")
        out = np.zeros((len(order), plan.circuit.populations[plan.output].size), np.float32)
        n_trials = -(-len(order) // plan.batch)
        self._run_infer(X, Y, T, order, n_trials, out)
        return out if values else np.argmax(out, axis=1).astype(np.int64)

    def _run_infer(self, X, Y, T, order, n_trials, out):
        """The inference program over all of ``order`` (no monitors, counters unchanged)."""
        rec = np.zeros(1, np.float32)
        stamps = np.zeros(1, np.int64)
        meta = np.zeros((1, 8), np.int64)
        cnt = np.zeros(1, np.int64)
        prog = self.plan.infer
        status = self.backend.run(self, prog, prog.blocks, X, Y, T, order, 0, n_trials, 0, 0,
                                  rec, stamps, meta, cnt, self._info, out)
        if status != OK:
            self._raise(prog, status)

    def evaluate(self, X, Y) -> float:
        """Classification accuracy in [0, 1]."""
        X, Y, _ = self._data(X, Y, None, "Simulator.evaluate")
        return float(np.mean(self.predict(X) == Y))

    def run(self, duration=None, *, steps: int | None = None, phase: str | None = None) -> None:
        """Free-run one phase in time mode for ``duration`` (or ``steps``), continuing the
        current state. Stimuli come from :meth:`set_stimulus`. Running 100 then 200 steps equals
        running 300."""
        plan = self.plan
        if plan.protocol.mode != "time":
            raise ValidationError("Simulator.run", "free runs need a time-mode protocol "
                                  "(Protocol(mode='time')).", "use train() for steady mode.")
        phase = phase or plan.protocol.phases[0].name
        if phase not in plan.free:
            raise ValidationError("Simulator.run.phase", f"got {phase!r}, expected one of "
                                  f"{list(plan.free)}.")
        if (duration is None) == (steps is None):
            raise ValidationError("Simulator.run", "give exactly one of duration or steps.")
        if steps is None:
            seconds = to_seconds(duration, "Simulator.run.duration", warn_bare=True)
            steps = int(round(seconds / plan.protocol.dt))
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValidationError("Simulator.run.steps", f"got {steps!r}, expected an int >= 0.")
        if steps == 0:
            return
        prog = plan.free[phase]
        blocks = prog.blocks.copy()
        for i, sec in enumerate(prog.block_sections):
            if sec.endswith(":loop"):
                blocks[i, 2] = steps
        self._call(prog, blocks, self._empty_x, self._empty_y, self._empty_x, self._empty_o, 0, 1,
                   self.step, steps)
        self.step += steps

    def _targets(self, T, X, where):
        """Float targets for ``targets="values"`` plans (zeros where none are needed)."""
        plan = self.plan
        if plan.targets != "values" or "t" not in plan.stimuli:
            if T is not None:
                raise ValidationError(f"{where}.T", "float targets given, but the plan was compiled "
                                      "with targets='onehot' (labels Y).",
                                      "compile with targets='values' for regression.")
            return self._empty_x
        need = plan.view("stim.t").shape[1]
        if T is None:
            if where.endswith("predict"):
                return np.zeros((X.shape[0], need), np.float32)
            raise ValidationError(f"{where}.T", "missing; the plan takes float targets "
                                  "(targets='values').")
        T = np.ascontiguousarray(T, np.float32)
        if T.ndim == 1:
            T = T.reshape(-1, 1)
        if T.shape != (X.shape[0], need):
            raise ValidationError(f"{where}.T", f"shape {T.shape}, expected ({X.shape[0]}, {need}).")
        return T

    def _data(self, X, Y, order, where):
        X = np.asarray(X)
        if X.ndim != 2 or X.dtype != np.float32:
            if X.ndim != 2:
                raise ValidationError(f"{where}.X", f"shape {X.shape}, expected (samples, "
                                      "features).")
            X = X.astype(np.float32)
        if not X.flags.c_contiguous:
            X = np.ascontiguousarray(X)
        if "x" in self.plan.stimuli:
            need = self.plan.view("stim.x").shape[1]
            if X.shape[1] != need:
                raise ValidationError(f"{where}.X", f"{X.shape[1]} features per sample, the "
                                      f"input expects {need}.")
        if Y is not None:
            Y = np.asarray(Y)
            if Y.shape != (X.shape[0],):
                raise ValidationError(f"{where}.Y", f"shape {Y.shape}, expected ({X.shape[0]},).")
            if Y.size and not np.issubdtype(Y.dtype, np.integer):
                if not np.issubdtype(Y.dtype, np.number) or np.any(Y != np.round(Y)):
                    raise ValidationError(f"{where}.Y", f"labels of dtype {Y.dtype} with non-integer "
                                          "values, expected integer class labels.")
            Y = Y.astype(np.int64, copy=False)
            ncls = (self.plan.view("stim.t").shape[1]
                    if "t" in self.plan.stimuli and self.plan.targets == "onehot" else None)
            if ncls is not None and len(Y) and (Y.min() < 0 or Y.max() >= ncls):
                raise ValidationError(f"{where}.Y", f"labels in [{Y.min()}, {Y.max()}], "
                                      f"expected [0, {ncls - 1}].")
        else:
            Y = np.zeros(X.shape[0], np.int64)
        if order is None:
            order = np.arange(X.shape[0], dtype=np.int64)
        else:
            o = np.asarray(order)
            if o.ndim != 1 or (o.size and not np.issubdtype(o.dtype, np.integer)):
                raise ValidationError(f"{where}.order", f"got an array of shape {o.shape} and dtype "
                                      f"{o.dtype}, expected a 1-D array of integer row indices.")
            if o.size and (o.min() < 0 or o.max() >= X.shape[0]):
                raise ValidationError(f"{where}.order", f"indices in [{o.min()}, {o.max()}], "
                                      f"expected [0, {X.shape[0] - 1}] (rows of X).")
            order = np.ascontiguousarray(o, np.int64)
        return X, Y, order

    # -- checkpoint support -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically: arena, scalar slots, counters,
        traces."""
        return {"mem": self.mem.copy(), "scal": self.scal.copy(), "trial": self.trial,
                "step": self.step, "epoch": self.epoch,
                "records": {k: [(v.copy(), s.copy()) for v, s in c]
                            for k, c in self._records.items()}}

    def load_state_dict(self, state: dict) -> None:
        mem = np.asarray(state["mem"], np.float32)
        if mem.shape != self.mem.shape:
            raise ValidationError("Simulator.load_state_dict", f"arena of {mem.shape[0]} floats, "
                                  f"this plan has {self.mem.shape[0]}; the checkpoint was "
                                  "made from another circuit or batch size.")
        self.mem[...] = mem
        if "scal" in state:
            scal = np.asarray(state["scal"], np.float64)
            if scal.shape != self.scal.shape:
                raise ValidationError("Simulator.load_state_dict", f"{scal.shape[0]} scalar "
                                      f"slots, this plan has {self.scal.shape[0]}.")
            self.scal[...] = scal
        self.trial = int(state["trial"])
        self.step = int(state["step"])
        self.epoch = int(state.get("epoch", self.epoch))
        self._records = {k: list(v) for k, v in state.get("records", {}).items()}
        for m in self.plan.monitor_meta:
            self._records.setdefault(m["key"], [])


def shuffled_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The training order of ``epoch``: a permutation drawn from the 'shuffle:<epoch>' stream."""
    return component_rng(seed, f"shuffle:{epoch}").permutation(n).astype(np.int64)
