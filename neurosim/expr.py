"""Rules as array expressions.

A rule's build function reads like its maths::

    h, h_mod, x_mod = pb.r("hidden", "clean"), pb.r("hidden", "modulated"), pb.r("input", "modulated")
    pb.update("W1", (h - h_mod).T @ x_mod)

Handles (:class:`Expr`) stand for buffers of the plan: rates and drives held at a phase's end
(:meth:`PlanBuilder.r`, :meth:`PlanBuilder.a`), weights (:meth:`PlanBuilder.W`), the derivative
of a population's transfer function (:meth:`PlanBuilder.fprime`, with the trial's dropout mask),
stimuli (:meth:`PlanBuilder.stim`), persistent rule state (:meth:`PlanBuilder.state`),
constants and scalar slots. They combine with ``+ - * /`` (element-wise; the right operand
broadcasts from a row, a column or a scalar), numbers, ``@`` (matrix product; ``.T`` transposes
an operand of ``@``), row and column reductions (``.sum(axis)``, ``.mean(axis)``,
``.sumsq(axis=1)``) and element-wise functions (``.apply("softmax")``, ``.sqrt()``,
``.rsqrt()``, ``.exp()``, ``.log()``, ``.abs()``, ``.step()``, ``.square()``, ``** p``).

Nothing is computed when an expression is built. :meth:`PlanBuilder.update` (a rule's
contribution to a projection's summed update ``dW``) and :meth:`PlanBuilder.assign` (any
buffer) lower it onto the op table: a sum of scaled matrix products becomes GEMMs accumulating
into the destination (no temporary for the product), element-wise sub-expressions become ops on
temporaries the compiler allocates, ``x * f'(a)`` becomes the in-place ``DERIV``. Inside a
``<phase>:loop`` section an update accumulates over the time steps (the compiler zeroes ``dW``
once before the loop), so no rule has to track first and later writes. The compiler's passes
(momentum fusion) then see ordinary ops.
"""

from __future__ import annotations

import numbers

from .errors import CompileError
from .optable import TRANSFER_CODES, UNARY_CODES


class Expr:
    """A lazily evaluated array expression over plan buffers (see the module docstring).

    ``rows``/``cols`` are its shape; ``batch`` says the rows are the minibatch's (``nb`` at run
    time)."""

    __array_priority__ = 1000   # numbers on the left: 2 * x calls x.__rmul__

    colbatch = False    # a transposed batch expression: its columns are the minibatch

    def __init__(self, pb, rows, cols, batch):
        self.pb, self.rows, self.cols, self.batch = pb, rows, cols, batch

    @property
    def shape(self):
        return (self.rows, self.cols)

    # -- arithmetic ------------------------------------------------------------------------------
    def __add__(self, o):
        return _binary("ADD", self, o)

    def __radd__(self, o):
        return _binary("ADD", _wrap(self.pb, o), self)

    def __sub__(self, o):
        return _binary("SUB", self, o)

    def __rsub__(self, o):
        return _binary("SUB", _wrap(self.pb, o), self)

    def __mul__(self, o):
        if isinstance(o, numbers.Real):
            return Scaled(self, float(o))
        return _binary("MUL", self, o)

    def __rmul__(self, o):
        if isinstance(o, numbers.Real):
            return Scaled(self, float(o))
        return _binary("MUL", _wrap(self.pb, o), self)

    def __truediv__(self, o):
        if isinstance(o, numbers.Real):
            return Scaled(self, 1.0 / float(o))
        return _binary("DIV", self, o)

    def __rtruediv__(self, o):
        return _binary("DIV", _wrap(self.pb, o), self)

    def __neg__(self):
        return Scaled(self, -1.0)

    def __matmul__(self, o):
        return MatMul(self, o)

    def __pow__(self, p):
        if not isinstance(p, numbers.Real):
            raise CompileError("expression ** p needs a number p")
        if p == 2:
            return Unary(self, "square")
        if p == 0.5:
            return Unary(self, "sqrt")
        if p == -0.5:
            return Unary(self, "rsqrt")
        return Unary(self, "pow", float(p))

    @property
    def T(self):
        return Transposed(self)

    # -- reductions and functions ---------------------------------------------------------------
    def sum(self, axis=None):
        """Sum over ``axis`` (1: per row -> (rows, 1); 0: per column -> (1, cols); None: all)."""
        return Reduce(self, "sum", axis)

    def mean(self, axis=None):
        """Mean over ``axis``; over the minibatch's rows (axis 0 of a batch expression) it
        divides by the run-time ``nb``."""
        return Reduce(self, "mean", axis)

    def sumsq(self, axis=1):
        """Sum of squares per row (the goodness of a layer)."""
        if axis != 1:
            raise CompileError("sumsq: only axis=1 (per row)")
        return Reduce(self, "sumsq", 1)

    def apply(self, f):
        """A population transfer function by name (``"relu"``, ``"softmax"``, ...) or code."""
        code = TRANSFER_CODES.get(f, f) if isinstance(f, str) else int(f)
        if isinstance(code, str):
            raise CompileError(f"apply: unknown transfer {f!r}; expected one of "
                               f"{sorted(TRANSFER_CODES)}")
        return Apply(self, code)

    def sqrt(self):
        return Unary(self, "sqrt")

    def rsqrt(self):
        return Unary(self, "rsqrt")

    def exp(self):
        return Unary(self, "exp")

    def log(self):
        return Unary(self, "log")

    def abs(self):
        return Unary(self, "abs")

    def step(self):
        """1 where ``x >= 0``, else 0 (comparisons: ``(x - c).step()`` is ``x >= c``)."""
        return Unary(self, "step")

    def square(self):
        return Unary(self, "square")

    def row_normalize(self, eps=1e-8):
        """Rows scaled to unit root-mean-square: ``x / (eps + sqrt(mean_j x^2))``."""
        return RowNormalize(self, eps)

    def __repr__(self):
        return f"<{type(self).__name__} {self.rows}x{self.cols}{' batch' if self.batch else ''}>"


class Buf(Expr):
    """A plan buffer (leaf)."""

    def __init__(self, pb, index):
        r, c, b = pb.shape(index)
        super().__init__(pb, r, c, b)
        self.index = index

    def __repr__(self):
        return f"<Buf {self.pb.name_of(self.index)} {self.rows}x{self.cols}>"


class Scaled(Expr):
    def __init__(self, x, s):
        super().__init__(x.pb, x.rows, x.cols, x.batch)
        self.x, self.s = x, s


class Binary(Expr):
    def __init__(self, op, x, y):
        if not _broadcasts(x, y):
            raise CompileError(f"{op.lower()}: shapes {_shape(x)} and {_shape(y)} do not "
                               "broadcast (the right operand may be a row, a column or a scalar)")
        super().__init__(x.pb, x.rows, x.cols, x.batch)
        self.op, self.x, self.y = op, x, y


class Transposed(Expr):
    def __init__(self, x):
        super().__init__(x.pb, x.cols, x.rows, False)
        self.x = x
        self.colbatch = x.batch


class MatMul(Expr):
    def __init__(self, a, b):
        if not isinstance(b, Expr):
            raise CompileError("@ needs two expressions")
        a_inner_batch = getattr(a, "colbatch", False)
        if a_inner_batch != b.batch or (not b.batch and a.cols != b.rows):
            raise CompileError(f"@: inner dimensions differ: {_shape(a)} @ {_shape(b)}")
        if getattr(b, "colbatch", False):
            raise CompileError("@: a batch dimension cannot be the columns of a product")
        super().__init__(a.pb, a.rows, b.cols, a.batch)
        self.a, self.b = a, b

    per_nb = False      # divided by the run-time minibatch size (batch_mean)

    def batch_mean(self):
        """``(a.T @ b) / nb`` for a product over the minibatch's rows (``a.T`` of a batch
        expression): the mean of the per-sample products, with ``nb`` the run-time minibatch
        size (the GEMM's own run-time factor, no extra op)."""
        if not getattr(self.a, "colbatch", False):
            raise CompileError("batch_mean: the product's inner dimension must be the minibatch "
                               f"(a.T @ b with batch expressions a, b); got {_shape(self.a)} @ "
                               f"{_shape(self.b)}")
        m = MatMul(self.a, self.b)
        m.per_nb = True
        return m


class FPrime(Expr):
    """``f'(drive)`` of population ``pop`` in ``phase`` (times its dropout mask if any)."""

    def __init__(self, pb, pop, phase):
        size = pb.circuit.populations[pop].size
        super().__init__(pb, pb.batch, size, True)
        self.pop, self.phase = pop, phase


class Reduce(Expr):
    def __init__(self, x, kind, axis):
        if axis not in (None, 0, 1):
            raise CompileError(f"{kind}: axis must be 0, 1 or None, got {axis!r}")
        if axis == 1:
            super().__init__(x.pb, x.rows, 1, x.batch)
        elif axis == 0:
            super().__init__(x.pb, 1, x.cols, False)
        else:
            super().__init__(x.pb, 1, 1, False)
        self.x, self.kind, self.axis = x, kind, axis


class Apply(Expr):
    def __init__(self, x, code):
        super().__init__(x.pb, x.rows, x.cols, x.batch)
        self.x, self.code = x, code


class Unary(Expr):
    def __init__(self, x, fn, p=0.0):
        super().__init__(x.pb, x.rows, x.cols, x.batch)
        self.x, self.fn, self.p = x, fn, p


class RowNormalize(Expr):
    def __init__(self, x, eps):
        super().__init__(x.pb, x.rows, x.cols, x.batch)
        self.x, self.eps = x, eps


# ---- helpers --------------------------------------------------------------------------------------
def _shape(x):
    return ("B" if x.batch else x.rows, "B" if x.colbatch else x.cols)


def _broadcasts(x, y):
    if not isinstance(y, Expr):
        return False
    same_rows = (x.batch and y.batch) or (not x.batch and not y.batch and x.rows == y.rows)
    rows_ok = same_rows or (not y.batch and y.rows == 1)
    return rows_ok and y.cols in (x.cols, 1)


def _wrap(pb, o):
    if isinstance(o, Expr):
        return o
    if isinstance(o, numbers.Real):
        return Buf(pb, pb.constant(float(o)))
    raise CompileError(f"cannot use {type(o).__name__} {o!r} in an expression")


def _binary(op, x, y):
    return Binary(op, x, _wrap(x.pb, y))


def terms(e, coef=1.0):
    """``e`` as a linear combination ``[(coefficient, expression), ...]`` of its summands."""
    if isinstance(e, Scaled):
        return terms(e.x, coef * e.s)
    if isinstance(e, Binary) and e.op in ("ADD", "SUB") and \
            (e.x.rows, e.x.cols, e.x.batch) == (e.y.rows, e.y.cols, e.y.batch):
        return terms(e.x, coef) + terms(e.y, coef if e.op == "ADD" else -coef)
    return [(coef, e)]


# ---- lowering --------------------------------------------------------------------------------------
def lower(e, where="") -> int:
    """Emit the ops computing ``e``; returns the buffer holding it (a leaf's own buffer, or a
    temporary)."""
    pb = e.pb
    if isinstance(e, Buf):
        return e.index
    if isinstance(e, Transposed):
        raise CompileError(f"{where}: a transpose (.T) can only be an operand of @")
    dst = pb.temp(e.rows, e.cols, e.batch)
    emit_into(dst, e, where)
    return dst


def emit_into(dst, e, where="", accumulate=False):
    """Emit ops that write ``e`` into buffer ``dst`` (``accumulate``: add to it instead)."""
    pb = e.pb
    parts = terms(e)
    if not accumulate and _one_op(dst, parts, where):
        return
    first = not accumulate
    # matrix products first: they can overwrite dst (beta 0) without a temporary
    parts.sort(key=lambda t: not isinstance(t[1], MatMul))
    for coef, t in parts:
        if isinstance(t, MatMul):
            a, ta = (t.a.x, True) if isinstance(t.a, Transposed) else (t.a, False)
            b, tb = (t.b.x, True) if isinstance(t.b, Transposed) else (t.b, False)
            coef_a, a = _peel(a)
            coef_b, b = _peel(b)
            if t.per_nb:     # alpha / nb at run time: the GEMM's fused factor, no lr slot
                pb.op("GEMM", where, c=dst, a=lower(a, where), b=lower(b, where),
                      trans_a=int(ta), trans_b=int(tb), fused=1,
                      alpha=coef * coef_a * coef_b, beta=0.0 if first else 1.0)
            else:
                pb.gemm(dst, lower(a, where), lower(b, where), trans_a=ta, trans_b=tb,
                        alpha=coef * coef_a * coef_b, beta=0.0 if first else 1.0, where=where)
        elif first:
            _write(dst, coef, t, where)
        else:
            pb.axpy(dst, lower(t, where), coef, where)
        first = False


def _peel(x):
    """(coefficient, expression) with scalar factors pulled out of ``x``."""
    c = 1.0
    while isinstance(x, Scaled):
        c *= x.s
        x = x.x
    return c, x


def _write(dst, coef, t, where):
    """dst = coef * t for a non-product term."""
    pb = t.pb
    if isinstance(t, Buf):
        pb.copy(dst, t.index, where)
    elif isinstance(t, Binary):
        if t.op == "MUL" and isinstance(t.y, FPrime):
            emit_into(dst, t.x, where)
            _fprime_inplace(dst, t.y, where)
        elif t.op == "MUL" and isinstance(t.x, FPrime):
            emit_into(dst, t.y, where)
            _fprime_inplace(dst, t.x, where)
        elif t.op in ("ADD", "SUB") and isinstance(t.x, Scaled) and _number(t.y) is not None:
            _affine(dst, t, where)
        else:
            pb.op(t.op, where, dst=dst, x=lower(t.x, where), y=lower(t.y, where))
    elif isinstance(t, FPrime):
        pb.op("FILL", where, dst=dst, src=pb.constant(1.0))
        _fprime_inplace(dst, t, where)
    elif isinstance(t, Reduce):
        src = lower(t.x, where)
        if t.kind == "sumsq":
            pb.op("ROW_SUMSQ", where, dst=dst, src=src, scale=1.0)
        elif t.axis == 1:
            n = 1.0 / t.x.cols if t.kind == "mean" else 1.0
            pb.op("ROW_SUM", where, dst=dst, src=src, scale=n)
        elif t.axis == 0:
            if t.kind == "mean":
                if t.x.batch:
                    pb.op("COL_SUM", where, dst=dst, src=src, scale=0.0, per_row=1.0)
                else:
                    pb.op("COL_SUM", where, dst=dst, src=src, scale=1.0 / t.x.rows)
            else:
                pb.op("COL_SUM", where, dst=dst, src=src, scale=1.0)
        else:
            if t.kind == "mean" and t.x.batch:
                col = pb.temp(1, t.x.cols, False)
                pb.op("COL_SUM", where, dst=col, src=src, scale=0.0, per_row=1.0)
                pb.op("SUM", where, dst=dst, src=col, scale=1.0 / t.x.cols)
            else:
                n = 1.0 / (t.x.rows * t.x.cols) if t.kind == "mean" else 1.0
                pb.op("SUM", where, dst=dst, src=src, scale=n)
    elif isinstance(t, Apply):
        pb.op("APPLY", where, dst=dst, src=lower(t.x, where), code=t.code)
    elif isinstance(t, Unary):
        pb.op("UNARY", where, dst=dst, src=lower(t.x, where), fn=UNARY_CODES[t.fn], p=t.p)
    elif isinstance(t, RowNormalize):
        pb.op("ROW_NORMALIZE", where, dst=dst, src=lower(t.x, where), eps=t.eps)
    elif isinstance(t, MatMul):
        emit_into(dst, t, where)
        return
    elif isinstance(t, Transposed):
        raise CompileError(f"{where}: a transpose (.T) can only be an operand of @")
    else:
        raise CompileError(f"{where}: cannot lower {t!r}")
    if coef != 1.0:
        pb.scale(dst, coef, where)


def _fprime_inplace(dst, fp, where):
    pb = fp.pb
    pb.deriv(dst, pb.drive(fp.pop, fp.phase), fp.pop, where)
    pop = pb.circuit.populations[fp.pop]
    if pop.dropout > 0:
        pb.mul(dst, dst, pb.buffer(f"{fp.pop}.mask", 0, pop.size, True, kind="state"), where)


# ---- patterns one op computes ----------------------------------------------------------------------
def _number(e):
    """The value of ``e`` if it is a (1, 1) constant (a number in an expression), else None."""
    if isinstance(e, Buf) and (e.rows, e.cols, e.batch) == (1, 1, False):
        name = e.pb.name_of(e.index)
        if name.startswith("const.") and name.endswith(":1x1"):
            return float(name[len("const."):-len(":1x1")])
    return None


def _affine(dst, t, where):
    """``s x + c`` (``t``: a scaled expression plus or minus a number) as ``x`` written into
    ``dst`` and one in-place ``AFFINE`` (``dst = s dst + c``, a multiply and an add rounded
    separately, as the ADD of a scaled temporary would be)."""
    s, x = _peel(t.x)
    c = _number(t.y)
    emit_into(dst, x, where)
    t.pb.op("AFFINE", where, dst=dst, s=s, c=c if t.op == "ADD" else -c)


def _one_op(dst, parts, where) -> bool:
    """Emit, if ``parts`` (the summands of an expression overwriting ``dst``) match one, a
    pattern that a single op computes, and return True:

    * ``a + b``, ``a - b`` of two leaves: one ``ADD`` / ``SUB`` (instead of a copy and an axpy;
      the same float32 result: ``-1 * b`` is exact);
    * ``beta dst + alpha x.mean(0)`` with ``x`` batch-shaped: a running mean of the minibatch's
      rows, ``COL_MEAN`` (e.g. ``m <- d m + (1 - d) mean_b(y)``)."""
    if len(parts) != 2:
        return False
    (c1, e1), (c2, e2) = parts
    pb = e1.pb
    if isinstance(e1, Buf) and isinstance(e2, Buf) and c1 == 1.0 and c2 in (1.0, -1.0):
        pb.op("ADD" if c2 > 0 else "SUB", where, dst=dst, x=e1.index, y=e2.index)
        return True
    for (beta, m), (alpha, r) in (((c1, e1), (c2, e2)), ((c2, e2), (c1, e1))):
        if isinstance(m, Buf) and m.index == dst and isinstance(r, Reduce) and \
                r.kind == "mean" and r.axis == 0 and r.x.batch:
            pb.op("COL_MEAN", where, dst=dst, src=lower(r.x, where), alpha=alpha, beta=beta)
            return True
    return False
