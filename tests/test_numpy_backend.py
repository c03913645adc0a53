"""The numpy (array-API) reference backend.

Every op of the op table runs as a one-instruction program on random operands (plain and
batch-shaped buffers, a full and a short minibatch, the broadcasting forms of the binary ops)
and is compared with a float64 numpy computation written in tests/_oneop.py from the op's
documented meaning, within a tolerance derived there from the float32 roundings of the op.
This validates the op table's reference semantics. The same cases run on array_api_strict
(a minimal, strict implementation of the standard) to show the backend and the reference
functions use nothing outside the array API. Program-level tests cover guards, blocks, loops
and steps, the short last minibatch, the monitors, failures, and starting without numba.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import array_api_strict
import numpy as np
import pytest
from _oneop import (CASES, MODES, PROGRAMS, ZERO_DENOMINATOR, Prog, all_ops, check_case,
                    code_variants, execute, make_case, overwrite_program, sgd_program)

from neurosim.backends.numpy_backend import run_trials
from neurosim.errors import ValidationError
from neurosim.optable import NONFINITE_RATE, NONFINITE_WEIGHT, OK, OPS, WEIGHT_RUNAWAY

REPO = Path(__file__).resolve().parents[1]


def test_every_op_has_a_case():
    assert sorted(CASES) == sorted(OPS)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", all_ops())
def test_op_against_float64(op, mode, seed):
    c = make_case(op, seed, mode)
    check_case(c, execute(run_trials, c.prog, c.run, xp=np))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op, code, mask", code_variants())
def test_every_transfer_code(op, code, mask, mode):
    """Every transfer code (and mask or none) of TRANSFER, EULER, APPLY and DERIV."""
    c = make_case(op, 3, mode, code=code, mask=mask)
    check_case(c, execute(run_trials, c.prog, c.run, xp=np))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", all_ops())
def test_op_on_array_api_strict(op, mode):
    c = make_case(op, 7, mode)
    check_case(c, execute(run_trials, c.prog, c.run, xp=array_api_strict))


def test_namespace_from_the_arena():
    """xp = None: the namespace is array_api_compat's for the arena's arrays."""
    c = make_case("GEMM", 1, "batch")
    check_case(c, execute(lambda xp, *a: run_trials(None, *a), c.prog, c.run))


# ---- program-level tests -------------------------------------------------------------------
def test_guard_skips_unless_trial_divides():
    """GUARD(every 3, skip 2) before two counters: they count the trials divisible by 3 of
    trials 4..13 (6, 9, 12); the instruction after the skipped ones always runs."""
    p, run = PROGRAMS["guard"]()
    res = execute(run_trials, p, run)
    assert res.status == OK
    assert res.get("a")[0, 0] == 3 and res.get("b")[0, 0] == 6 and res.get("c")[0, 0] == 10


def test_blocks_loops_and_steps():
    """Blocks run in order each trial; a loop block's repeats each advance the step counter
    first (from step0, across trials); RECORD per step sees the step, per trial the trial."""
    p, run = PROGRAMS["loops"]()
    res = execute(run_trials, p, run)
    assert res.status == OK
    # trial 5: steps 11, 12, 13 (n = 1, 2, 3); trial 6: steps 14, 15, 16 (n = 4, 5, 6)
    assert res.get("n")[0, 0] == 6
    assert res.get("pre")[0, 0] == 0 + 3 and res.get("post")[0, 0] == 3 + 6
    assert res.rec_cnt.tolist() == [3, 2]
    np.testing.assert_array_equal(res.rec[:3], [2.0, 4.0, 6.0])          # steps 12, 14, 16
    np.testing.assert_array_equal(res.stamps[:6], [5, 12, 6, 14, 6, 16])
    np.testing.assert_array_equal(res.rec[20:22], [3.0, 6.0])
    np.testing.assert_array_equal(res.stamps[40:44], [5, 13, 6, 16])


def test_short_last_minibatch():
    """11 rows in minibatches of 4: the third has 3 rows; batch-shaped buffers take nb rows,
    GATHER and OUTPUT see the right rows, a batch mean divides by nb, 1/nb scales updates."""
    p, run = PROGRAMS["short"]()
    res = execute(run_trials, p, run)
    assert res.status == OK
    rows = run.X[run.order].astype(np.float64)
    np.testing.assert_array_equal(res.out, run.X[run.order])
    # sums of <= 11 terms in [0, 1): within 11 U sum|x| <= 1e-6 relative
    np.testing.assert_allclose(res.get("tot")[0], rows.sum(axis=0), rtol=1e-6)
    np.testing.assert_allclose(res.get("last")[0], rows[8:].sum(axis=0), rtol=1e-6)
    means = [rows[0:4].mean(0), rows[4:8].mean(0), rows[8:11].mean(0)]
    np.testing.assert_allclose(res.rec.reshape(3, 3), means, rtol=1e-6)
    # W -= 1/nb per trial: 1/4 + 1/4 + 1/3
    assert abs(res.get("w")[0, 0] + (0.5 + 1 / 3)) < 1e-6
    # the rows past nb of the batch buffer still hold minibatch 2's last row
    np.testing.assert_array_equal(res.get("x")[3], run.X[run.order[7]])


def test_record_sample_row_units_and_capacity():
    """A monitor of units 1..2 of sample row 1, every 2 trials, capacity 2: trials 0 and 2
    are recorded, trial 4 finds it full; another monitor stays untouched."""
    p, run = PROGRAMS["capacity"]()
    res = execute(run_trials, p, run)
    assert res.status == OK
    assert res.rec_cnt.tolist() == [2, 0]
    np.testing.assert_array_equal(res.rec[:4].reshape(2, 2),
                                  run.X[run.order[[1, 9]]][:, 1:3])
    np.testing.assert_array_equal(res.stamps[:4], [0, 0, 2, 0])
    assert np.isnan(res.rec[4:]).all() and (res.stamps[4:] == -1).all()


def test_failing_op_stops_the_call_with_status_and_info():
    """The 8th repeat is trial 3's second: the call stops there with NONFINITE_RATE and info
    (instruction 5, repeat 1, trial 3, block 1); nothing after the failing op runs."""
    p, run = PROGRAMS["failing"]()
    with np.errstate(divide="ignore"):
        res = execute(run_trials, p, run)
    assert res.status == NONFINITE_RATE
    assert res.info.tolist() == [5, 1, 3, 1]
    assert res.get("r")[0, 0] == -np.inf
    assert res.get("cnt")[0, 0] == 8
    assert res.get("after")[0, 0] == 7


@pytest.mark.parametrize("name", sorted(ZERO_DENOMINATOR))
def test_zero_denominator_is_ieee_and_reported(name):
    """x / 0 and 1 / 0 follow IEEE (inf, NaN), and the rate they reach is reported."""
    p, run = ZERO_DENOMINATOR[name]()
    with np.errstate(divide="ignore", invalid="ignore"):
        res = execute(run_trials, p, run)
    assert res.status == NONFINITE_RATE and res.info.tolist() == [1, 0, 0, 0]
    q = res.get("q")[0]
    want = [np.inf, -np.inf, np.nan] if name == "div_zero" else [np.inf] * 3
    np.testing.assert_array_equal(q, want)


def test_out_operand_is_overwritten():
    p, run = overwrite_program()
    res = execute(run_trials, p, run)
    np.testing.assert_array_equal(res.get("d"), [[3.0, 3.0]])


@pytest.mark.parametrize("w0, status", [([1.0, -2.0], OK), ([1.0, -4.0], WEIGHT_RUNAWAY),
                                        ([np.inf, 9.0], NONFINITE_WEIGHT),
                                        ([np.nan, 1.0], NONFINITE_WEIGHT)])
def test_sgd_statuses(w0, status):
    """SGD (limit 3) reports a runaway |W| > limit, and a non-finite weight before a runaway
    one."""
    p, run = sgd_program(w0, 3.0)
    with np.errstate(invalid="ignore"):
        r = execute(run_trials, p, run)
    assert r.status == status
    if status != OK:
        assert r.info.tolist() == [0, 0, 0, 0]


def test_mask_compares_keep_in_float64():
    """A uniform draw equal to float32(keep) < keep (float64) is kept, as in the compiled
    kernel: keep is not rounded to float32 before the comparison."""
    p, run = PROGRAMS["mask_edge"]()
    res = execute(run_trials, p, run)
    assert (res.get("m") > 0).all()


# ---- bad input -------------------------------------------------------------------------------
def _one_op_arrays():
    p = Prog()
    p.buf("a", 2, 2)
    p.op("ZERO", dst="a")
    return p


def _call(p, mutate):
    mem, bufs, prog, fprm, blocks, rec, stamps, rec_meta, rec_cnt = p.arrays()
    args = dict(mem=mem, bufs=bufs, prog=prog, fprm=fprm, blocks=blocks)
    mutate(args)
    z = np.zeros((1, 1), np.float32)
    return run_trials(np, args["mem"], args["bufs"], args["prog"], args["fprm"], args["blocks"],
                      z, np.zeros(1, np.int64), z, np.zeros(0, np.int64), 0, 1, 1, 0, 0,
                      np.zeros(0, np.uint64), np.zeros(0), rec, stamps, rec_meta, rec_cnt,
                      np.zeros(4, np.int64), z)


@pytest.mark.parametrize("mutate, where", [
    (lambda a: a["prog"].__setitem__((0, 0), 99), "prog[0, 0]"),
    (lambda a: a["prog"].__setitem__((0, 1), 5), "prog[0, 1]"),
    (lambda a: a["prog"].__setitem__((0, 1), -1), "prog[0, 1]"),     # ZERO's dst is not opt
    (lambda a: a["bufs"].__setitem__((0, 1), 1000), "bufs[0]"),
    (lambda a: a["blocks"].__setitem__((0, 1), 7), "blocks[0]"),
])
def test_bad_program_is_a_clear_error(mutate, where):
    with pytest.raises(ValidationError, match=r"run_trials\." + where.replace("[", r"\[")
                       .replace("]", r"\]")):
        _call(_one_op_arrays(), mutate)


def test_a_namespace_without_views_is_refused():
    """A namespace whose reshape copies cannot update the arena through views."""
    import types

    fake = types.SimpleNamespace(**{k: getattr(np, k) for k in ("zeros", "float32", "asarray")})
    fake.__name__ = "copying_numpy"
    fake.reshape = lambda a, s: np.reshape(a, s).copy()
    p = _one_op_arrays()
    mem, bufs, prog, fprm, blocks, rec, stamps, rec_meta, rec_cnt = p.arrays()
    z = np.zeros((1, 1), np.float32)
    with pytest.raises(ValidationError, match="run_trials.xp: namespace copying_numpy"):
        run_trials(fake, mem, bufs, prog, fprm, blocks, z, np.zeros(1, np.int64), z,
                   np.zeros(0, np.int64), 0, 1, 1, 0, 0, np.zeros(0, np.uint64), np.zeros(0),
                   rec, stamps, rec_meta, rec_cnt, np.zeros(4, np.int64), z)


# ---- starting without numba ------------------------------------------------------------------
_NO_NUMBA = textwrap.dedent("""
    import sys
    sys.modules["numba"] = None            # any "import numba" now raises ImportError
    import neurosim
    import numpy as np
    from neurosim.backends.numpy_backend import run_trials
    from neurosim.optable import code, col
    mem = np.zeros(8, np.float32)
    bufs = np.array([[0, 2, 2, 1], [4, 1, 2, 0]], np.int64)
    prog = np.zeros((2, 8), np.int64)
    fprm = np.zeros((2, 6))
    prog[0, 0] = code("GATHER")
    prog[1, 0] = code("COL_SUM"); prog[1, col("COL_SUM", "dst")] = 1
    fprm[1, col("COL_SUM", "scale")] = 1.0
    prog[1, col("COL_SUM", "src")] = 0
    X = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    st = run_trials(np, mem, bufs, prog, fprm, np.array([[0, 2, 1, 0, 0]]), X,
                    np.zeros(3, np.int64), np.zeros((1, 1), np.float32), np.arange(3), 0, 2, 2,
                    0, 0, np.zeros(0, np.uint64), np.zeros(0), np.zeros(1, np.float32),
                    np.zeros(2, np.int64), np.zeros((1, 8), np.int64), np.zeros(1, np.int64),
                    np.zeros(4, np.int64), np.zeros((1, 1), np.float32))
    assert st == 0 and mem[4:6].tolist() == [5.0, 6.0], mem
    assert sys.modules["numba"] is None
    print("ok")
""")


def test_backend_starts_without_numba():
    """Importing neurosim and running a program on the numpy backend compiles nothing: with
    numba made unimportable, the package imports and the backend runs."""
    r = subprocess.run([sys.executable, "-c", _NO_NUMBA], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
