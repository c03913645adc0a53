r"""Teacher-student ODE theory of online learning in a two-layer soft committee machine.

This module integrates the deterministic ordinary differential equations that describe one-pass
(online) learning of a student soft committee machine (SCM) with K hidden units from an SCM
teacher with M hidden units, in the limit of large input dimension N. Four first-layer rules
are covered, all written as "error times feedback times local derivative":

========== ================================================================ ==============
rule       first-layer feedback :math:`\beta`                               extra state
========== ================================================================ ==============
``bp``     :math:`\beta=v` (exact gradient)                                  --
``fa``     :math:`\beta=b`, fixed (feedback alignment, = DFA for one layer)  --
``afa``    :math:`\beta=b(t)`, :math:`b_k=-w_k\cdot F/\sqrt N` (adaptive)    :math:`b(t)`
``pepita`` AFA plus the first-order PEPITA corrections                      :math:`b(t)`
========== ================================================================ ==============

The specification is ``docs/theory-reference.md`` (cited below as "spec §x"); every formula
here is written from it.

Setting (spec §1)
-----------------
Inputs :math:`x\sim\mathcal N(0,I_N)`, activation :math:`g(z)=\operatorname{erf}(z/\sqrt2)`,
teacher :math:`y=\sum_n v^*_n g(\nu_n)+\sigma\zeta`, student :math:`\hat y=\sum_k v_k
g(\lambda_k)`, with local fields :math:`\lambda_k=w_k\cdot x/\sqrt N`,
:math:`\nu_n=w^*_n\cdot x/\sqrt N`. With :math:`\Delta=y-\hat y` and
:math:`\delta_k=\Delta\,\beta_k\,g'(\lambda_k)` the updates are

.. math::
    w_k \leftarrow w_k+\frac{\eta}{\sqrt N}\delta_k x,\qquad
    v_k \leftarrow v_k+\frac{\eta_v}{N}\Delta\,g(\lambda_k),

and time is :math:`t=\mu/N` (samples over N).

Order parameters (spec §2)
--------------------------
:math:`Q_{kl}=w_k\cdot w_l/N`, :math:`R_{kn}=w_k\cdot w^*_n/N`, :math:`T_{nm}=w^*_n\cdot
w^*_m/N` (constant), the readouts :math:`v` and :math:`v^*` (constant), and for AFA/PEPITA
:math:`b_k=-w_k\cdot F/\sqrt N`, :math:`b^*_n=-w^*_n\cdot F/\sqrt N` (constant) and
:math:`\Phi=\lVert F\rVert^2` (constant). The fields :math:`u=(\lambda,\nu)` are Gaussian with
covariance :math:`C=\begin{pmatrix}Q&R\\R^\top&T\end{pmatrix}`; the extra field
:math:`\xi_F=x\cdot F` has :math:`\operatorname{Var}\xi_F=\Phi`,
:math:`\operatorname{Cov}(\xi_F,\lambda_k)=-b_k`, :math:`\operatorname{Cov}(\xi_F,\nu_n)=-b^*_n`.

Implementation
--------------
* The integrals :func:`I2`, :func:`I3`, :func:`I4`, :func:`J1`, :func:`J2`, :func:`J3` (spec §3)
  are vectorised over stacks of covariance blocks.
* :func:`rhs_bp`, :func:`rhs_fa`, :func:`rhs_afa`, :func:`rhs_pepita` (and the dispatcher
  :func:`rhs`) evaluate the right-hand sides (spec §4) in plain numpy from those integrals, with
  precomputed index grids.
* :func:`integrate` runs fixed-step RK4 or Euler in a numba kernel (``@njit(cache=True)``) that
  evaluates the same equations with explicit loops; the tests check it against the numpy
  right-hand sides. Without numba it falls back to the numpy right-hand sides (slower).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from neurosim.errors import NeurosimWarning, ValidationError

try:  # numba is a hard dependency of neurosim, but keep the theory importable without it.
    from numba import njit as _njit

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is missing
    _HAVE_NUMBA = False

    def _njit(*args, **kwargs):
        def wrap(f):
            return f

        return wrap


__all__ = [
    "RULES",
    "METHODS",
    "I2",
    "I3",
    "I4",
    "J1",
    "J2",
    "J3",
    "eps_g",
    "OrderParameters",
    "order_parameters",
    "Derivatives",
    "rhs",
    "rhs_bp",
    "rhs_fa",
    "rhs_afa",
    "rhs_pepita",
    "Trajectory",
    "integrate",
]

#: The learning rules :func:`integrate` knows.
RULES = ("bp", "fa", "afa", "pepita")
#: The fixed-step integration schemes :func:`integrate` knows.
METHODS = ("rk4", "euler")

_RULE_CODE = {"bp": 0, "fa": 1, "afa": 2, "pepita": 3}
_METHOD_CODE = {"euler": 0, "rk4": 1}

_2_PI = 2.0 / math.pi
_4_PI2 = 4.0 / math.pi**2
_SQRT_2_PI = math.sqrt(2.0 / math.pi)


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _float_array(where: str, x, *, ndim: int | None = None) -> np.ndarray:
    """Convert ``x`` to a finite float64 array, or raise ValidationError naming ``where``."""
    if x is None:
        raise ValidationError(where, "got None; expected an array.")
    try:
        a = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValidationError(where, f"cannot be converted to a float array ({exc}).") from None
    if ndim is not None and a.ndim != ndim:
        raise ValidationError(where, f"has {a.ndim} dimension(s) (shape {a.shape}); "
                                     f"expected {ndim}.")
    if not np.all(np.isfinite(a)):
        raise ValidationError(where, "contains NaN or inf; expected finite values.")
    return a


def _scalar(where: str, x, *, low: float | None = None, strict: bool = False) -> float:
    """A finite Python float, optionally bounded below (``> low`` if strict, else ``>= low``)."""
    if isinstance(x, (bool, np.bool_)) or x is None:
        raise ValidationError(where, f"got {x!r}; expected a real number.")
    try:
        f = float(x)
    except (TypeError, ValueError):
        raise ValidationError(where, f"got {x!r}; expected a real number.") from None
    if not math.isfinite(f):
        raise ValidationError(where, f"got {f}; expected a finite number.")
    if low is not None:
        if strict and not f > low:
            raise ValidationError(where, f"got {f}; expected > {low}.")
        if not strict and not f >= low:
            raise ValidationError(where, f"got {f}; expected >= {low}.")
    return f


def _check_shape(where: str, a: np.ndarray, shape: tuple, label: str) -> None:
    if a.shape != shape:
        raise ValidationError(where, f"shape {a.shape}, expected {label} = {shape}.")


def _check_symmetric(where: str, a: np.ndarray) -> None:
    scale = max(1.0, float(np.max(np.abs(a)))) if a.size else 1.0
    if np.max(np.abs(a - a.T), initial=0.0) > 1e-10 * scale:
        raise ValidationError(where, "is not symmetric; expected a symmetric overlap matrix.",
                              "Symmetrise it, e.g. (Q + Q.T) / 2.")


def _check_psd(where: str, C: np.ndarray, what: str, hint: str) -> None:
    eig = np.linalg.eigvalsh(C)
    tol = 1e-10 * max(1.0, float(np.max(np.abs(eig))))
    if eig[0] < -tol:
        raise ValidationError(
            where, f"{what} is not positive semidefinite (smallest eigenvalue {eig[0]:.3g}); "
                   "it cannot be the covariance of the local fields.", hint)


class _State(NamedTuple):
    """Validated arguments shared by the right-hand sides and :func:`integrate`."""

    rule: str
    K: int
    M: int
    Q: np.ndarray
    R: np.ndarray
    T: np.ndarray
    v: np.ndarray
    v_star: np.ndarray
    b: np.ndarray       # feedback state (zeros for bp; fixed b for fa)
    b_star: np.ndarray  # zeros when unused
    Phi: float          # 0.0 when unused
    eta: float
    eta_v: float
    sigma: float
    train_v: bool


def _validate(fn: str, rule, Q, R, T, v, v_star, eta, eta_v, sigma, b, b_star, Phi, train_v,
              *, check_psd: bool) -> _State:
    """Check shapes, values and (optionally) positive semidefiniteness; return a _State."""
    if not isinstance(rule, str) or rule not in _RULE_CODE:
        raise ValidationError(f"{fn}.rule", f"got {rule!r}; expected one of {RULES}.",
                              "Use 'bp', 'fa', 'afa' or 'pepita' (lower case).")
    v = _float_array(f"{fn}.v", v, ndim=1)
    v_star = _float_array(f"{fn}.v_star", v_star, ndim=1)
    K, M = v.shape[0], v_star.shape[0]
    if K < 1:
        raise ValidationError(f"{fn}.v", "is empty; expected K >= 1 student readouts.")
    if M < 1:
        raise ValidationError(f"{fn}.v_star", "is empty; expected M >= 1 teacher readouts.")
    Q = _float_array(f"{fn}.Q", Q)
    _check_shape(f"{fn}.Q", Q, (K, K), "(K, K)")
    R = _float_array(f"{fn}.R", R)
    _check_shape(f"{fn}.R", R, (K, M), "(K, M)")
    T = _float_array(f"{fn}.T", T)
    _check_shape(f"{fn}.T", T, (M, M), "(M, M)")
    _check_symmetric(f"{fn}.Q", Q)
    _check_symmetric(f"{fn}.T", T)
    Q = 0.5 * (Q + Q.T)
    T = 0.5 * (T + T.T)
    # Only the diagonal enters as 1 + C_aa; it must be > -1 for every integral to exist.
    eta = _scalar(f"{fn}.eta", eta, low=0.0)
    eta_v = _scalar(f"{fn}.eta_v", eta_v, low=0.0)
    sigma = _scalar(f"{fn}.sigma", sigma, low=0.0)
    if not isinstance(train_v, (bool, np.bool_)):
        raise ValidationError(f"{fn}.train_v", f"got {train_v!r}; expected True or False.")

    needs_b = rule in ("fa", "afa", "pepita")
    needs_bstar = rule in ("afa", "pepita")
    needs_phi = rule == "pepita"
    if needs_b:
        if b is None:
            raise ValidationError(
                f"{fn}.b", f"is missing; rule {rule!r} needs the feedback vector b (length K).",
                "FA: a fixed random vector, e.g. rng.standard_normal(K); AFA/PEPITA: "
                "b(0) = -W F / sqrt(N), see order_parameters(W, W_star, F).")
        b = _float_array(f"{fn}.b", b, ndim=1)
        _check_shape(f"{fn}.b", b, (K,), "(K,)")
    else:
        b = np.zeros(K)
    if needs_bstar:
        if b_star is None:
            raise ValidationError(
                f"{fn}.b_star", f"is missing; rule {rule!r} needs the teacher's response along "
                "F, b_star = -W_star F / sqrt(N) (length M).",
                "Use order_parameters(W, W_star, F); pass zeros(M) for a teacher without a "
                "macroscopic response along F.")
        b_star = _float_array(f"{fn}.b_star", b_star, ndim=1)
        _check_shape(f"{fn}.b_star", b_star, (M,), "(M,)")
    else:
        b_star = np.zeros(M)
    phi_val = 0.0
    if needs_phi:
        if Phi is None:
            raise ValidationError(
                f"{fn}.Phi", "is missing; rule 'pepita' needs Phi = ||F||^2 (a number >= 0).",
                "Use order_parameters(W, W_star, F).Phi.")
        phi_val = _scalar(f"{fn}.Phi", Phi, low=0.0)
    elif Phi is not None and needs_bstar:
        phi_val = _scalar(f"{fn}.Phi", Phi, low=0.0)  # afa: only used for the PSD check

    if check_psd:
        C = np.block([[Q, R], [R.T, T]])
        _check_psd(f"{fn}.Q/R/T", C, "the covariance [[Q, R], [R^T, T]]",
                   "Compute Q, R, T from weight matrices with order_parameters(); every "
                   "|R_kn| must be <= sqrt(Q_kk T_nn) and Q, T must be PSD.")
        if needs_bstar and Phi is not None:
            cF = -np.concatenate([b, b_star])
            Cx = np.block([[C, cF[:, None]], [cF[None, :], np.array([[phi_val]])]])
            _check_psd(f"{fn}.Phi", Cx,
                       "the covariance of (lambda, nu, x.F) with Cov(x.F, lambda) = -b, "
                       "Cov(x.F, nu) = -b_star, Var(x.F) = Phi",
                       "b, b_star and Phi must come from one vector F: use "
                       "order_parameters(W, W_star, F).")
    return _State(rule, K, M, Q, R, T, v, v_star, b, b_star, phi_val, eta, eta_v, sigma,
                  bool(train_v))


# --------------------------------------------------------------------------------------------
# Gaussian integrals for g(z) = erf(z / sqrt(2))   (spec §3)
# --------------------------------------------------------------------------------------------


def _blocks(name: str, C, n: int) -> np.ndarray:
    C = _float_array(f"{name}.C", C)
    if C.ndim < 2 or C.shape[-2:] != (n, n):
        raise ValidationError(f"{name}.C", f"shape {C.shape}, expected (..., {n}, {n}): a stack "
                                           f"of covariance blocks of the {n} fields involved.")
    return C


def _asin(x):
    return np.arcsin(np.clip(x, -1.0, 1.0))


def I2(C) -> np.ndarray:
    r"""Second-order integral :math:`I_2=\mathbb E[g(u_a)g(u_b)]` (spec §3).

    .. math::
        I_2=\frac{2}{\pi}\arcsin\frac{C_{ab}}{\sqrt{(1+C_{aa})(1+C_{bb})}}

    Parameters
    ----------
    C : array_like, shape (..., 2, 2)
        Covariance blocks of :math:`(u_a, u_b)`; leading axes are batch axes.

    Returns
    -------
    numpy.ndarray, shape (...)
    """
    C = _blocks("I2", C, 2)
    return _2_PI * _asin(C[..., 0, 1] / np.sqrt((1 + C[..., 0, 0]) * (1 + C[..., 1, 1])))


def I3(C) -> np.ndarray:
    r"""Third-order integral :math:`I_3=\mathbb E[g'(u_a)\,u_b\,g(u_c)]` (spec §3).

    .. math::
        I_3=\frac{2}{\pi}\frac{1}{\sqrt{\Lambda_3}}
            \frac{C_{bc}(1+C_{aa})-C_{ab}C_{ac}}{1+C_{aa}},\qquad
        \Lambda_3=(1+C_{aa})(1+C_{cc})-C_{ac}^2 .

    It is linear in the covariances of :math:`u_b` and does not involve :math:`C_{bb}`.

    Parameters
    ----------
    C : array_like, shape (..., 3, 3)
        Covariance blocks of :math:`(u_a, u_b, u_c)`, in that order.

    Returns
    -------
    numpy.ndarray, shape (...)
    """
    C = _blocks("I3", C, 3)
    caa, cab, cac = C[..., 0, 0], C[..., 0, 1], C[..., 0, 2]
    cbc, ccc = C[..., 1, 2], C[..., 2, 2]
    lam3 = (1 + caa) * (1 + ccc) - cac**2
    return _2_PI * (cbc * (1 + caa) - cab * cac) / ((1 + caa) * np.sqrt(lam3))


def I4(C) -> np.ndarray:
    r"""Fourth-order integral :math:`I_4=\mathbb E[g'(u_a)g'(u_b)g(u_c)g(u_d)]` (spec §3).

    .. math::
        I_4=\frac{4}{\pi^2}\frac{1}{\sqrt{\Lambda_4}}
            \arcsin\frac{\Lambda_0}{\sqrt{\Lambda_1\Lambda_2}}

    with :math:`\Lambda_4=(1+C_{aa})(1+C_{bb})-C_{ab}^2`,
    :math:`\Lambda_0=\Lambda_4C_{cd}-C_{bc}C_{bd}(1+C_{aa})-C_{ac}C_{ad}(1+C_{bb})
    +C_{ab}C_{ac}C_{bd}+C_{ab}C_{ad}C_{bc}`,
    :math:`\Lambda_1=\Lambda_4(1+C_{cc})-C_{bc}^2(1+C_{aa})-C_{ac}^2(1+C_{bb})
    +2C_{ab}C_{ac}C_{bc}` and :math:`\Lambda_2` the same with :math:`c\to d`.

    Parameters
    ----------
    C : array_like, shape (..., 4, 4)
        Covariance blocks of :math:`(u_a, u_b, u_c, u_d)`, in that order.

    Returns
    -------
    numpy.ndarray, shape (...)
    """
    C = _blocks("I4", C, 4)
    a1, b1 = 1 + C[..., 0, 0], 1 + C[..., 1, 1]
    c1, d1 = 1 + C[..., 2, 2], 1 + C[..., 3, 3]
    cab, cac, cad = C[..., 0, 1], C[..., 0, 2], C[..., 0, 3]
    cbc, cbd, ccd = C[..., 1, 2], C[..., 1, 3], C[..., 2, 3]
    lam4 = a1 * b1 - cab**2
    lam0 = lam4 * ccd - cbc * cbd * a1 - cac * cad * b1 + cab * cac * cbd + cab * cad * cbc
    lam1 = lam4 * c1 - cbc**2 * a1 - cac**2 * b1 + 2 * cab * cac * cbc
    lam2 = lam4 * d1 - cbd**2 * a1 - cad**2 * b1 + 2 * cab * cad * cbd
    return _4_PI2 / np.sqrt(lam4) * _asin(lam0 / np.sqrt(lam1 * lam2))


def J1(C) -> np.ndarray:
    r"""First-order integral :math:`J_1=\mathbb E[g'(u_a)]=\sqrt{2/\pi}\,(1+C_{aa})^{-1/2}`.

    Parameters
    ----------
    C : array_like, shape (..., 1, 1)
        Variance blocks of :math:`u_a`.

    Returns
    -------
    numpy.ndarray, shape (...)
    """
    C = _blocks("J1", C, 1)
    return _SQRT_2_PI / np.sqrt(1 + C[..., 0, 0])


def J2(C) -> np.ndarray:
    r"""Noise integral :math:`J_2=\mathbb E[g'(u_a)g'(u_b)]` (spec §3).

    .. math:: J_2=\frac{2}{\pi}\big[(1+C_{aa})(1+C_{bb})-C_{ab}^2\big]^{-1/2}

    Parameters
    ----------
    C : array_like, shape (..., 2, 2)

    Returns
    -------
    numpy.ndarray, shape (...)
    """
    C = _blocks("J2", C, 2)
    return _2_PI / np.sqrt((1 + C[..., 0, 0]) * (1 + C[..., 1, 1]) - C[..., 0, 1] ** 2)


def J3(C) -> np.ndarray:
    r"""Integral :math:`J_3=\mathbb E[g'(u_a)g(u_b)g(u_c)]` (spec §3, PEPITA corrections).

    .. math::
        J_3=\sqrt{\tfrac{2}{\pi}}(1+C_{aa})^{-1/2}\,\frac{2}{\pi}
            \arcsin\frac{\tilde C_{bc}}{\sqrt{(1+\tilde C_{bb})(1+\tilde C_{cc})}},\qquad
        \tilde C_{xy}=C_{xy}-\frac{C_{ax}C_{ay}}{1+C_{aa}} .

    Parameters
    ----------
    C : array_like, shape (..., 3, 3)
        Covariance blocks of :math:`(u_a, u_b, u_c)`, in that order.

    Returns
    -------
    numpy.ndarray, shape (...)
    """
    C = _blocks("J3", C, 3)
    a1 = 1 + C[..., 0, 0]
    cab, cac = C[..., 0, 1], C[..., 0, 2]
    tbb = C[..., 1, 1] - cab**2 / a1
    tcc = C[..., 2, 2] - cac**2 / a1
    tbc = C[..., 1, 2] - cab * cac / a1
    return _SQRT_2_PI / np.sqrt(a1) * _2_PI * _asin(tbc / np.sqrt((1 + tbb) * (1 + tcc)))


# --------------------------------------------------------------------------------------------
# Generalisation error and order parameters
# --------------------------------------------------------------------------------------------


def eps_g(Q, R, T, v, v_star) -> np.ndarray | float:
    r"""Generalisation error :math:`\epsilon_g=\tfrac12\mathbb E[(\hat y-y_{\rm clean})^2]`.

    Spec §4.6 (includes the factor 1/2, excludes the output noise):

    .. math::
        \epsilon_g=\frac1\pi\Big[\sum_{kl}v_kv_l\arcsin\frac{Q_{kl}}{\sqrt{(1+Q_{kk})(1+Q_{ll})}}
        +\sum_{nm}v^*_nv^*_m\arcsin\frac{T_{nm}}{\sqrt{(1+T_{nn})(1+T_{mm})}}
        -2\sum_{kn}v_kv^*_n\arcsin\frac{R_{kn}}{\sqrt{(1+Q_{kk})(1+T_{nn})}}\Big]

    Parameters
    ----------
    Q : array_like, shape (..., K, K)
    R : array_like, shape (..., K, M)
    T : array_like, shape (..., M, M)
    v : array_like, shape (..., K)
    v_star : array_like, shape (..., M)
        Leading axes (e.g. output time) broadcast against each other.

    Returns
    -------
    float or numpy.ndarray
        A float for unbatched input, else an array of the broadcast batch shape.
    """
    Q = _float_array("eps_g.Q", Q)
    R = _float_array("eps_g.R", R)
    T = _float_array("eps_g.T", T)
    v = _float_array("eps_g.v", v)
    v_star = _float_array("eps_g.v_star", v_star)
    for name, a, nd in (("Q", Q, 2), ("R", R, 2), ("T", T, 2), ("v", v, 1), ("v_star", v_star, 1)):
        if a.ndim < nd:
            raise ValidationError(f"eps_g.{name}", f"shape {a.shape}; expected at least {nd} "
                                                   "dimension(s).")
    K, M = v.shape[-1], v_star.shape[-1]
    if Q.shape[-2:] != (K, K):
        raise ValidationError("eps_g.Q", f"shape {Q.shape}, expected (..., K, K) with K = {K}.")
    if R.shape[-2:] != (K, M):
        raise ValidationError("eps_g.R", f"shape {R.shape}, expected (..., K, M) = "
                                         f"(..., {K}, {M}).")
    if T.shape[-2:] != (M, M):
        raise ValidationError("eps_g.T", f"shape {T.shape}, expected (..., M, M) with M = {M}.")
    dq = 1 + np.diagonal(Q, axis1=-2, axis2=-1)
    dt = 1 + np.diagonal(T, axis1=-2, axis2=-1)
    aq = _asin(Q / np.sqrt(dq[..., :, None] * dq[..., None, :]))
    at = _asin(T / np.sqrt(dt[..., :, None] * dt[..., None, :]))
    ar = _asin(R / np.sqrt(dq[..., :, None] * dt[..., None, :]))
    out = (np.einsum("...k,...kl,...l->...", v, aq, v)
           + np.einsum("...n,...nm,...m->...", v_star, at, v_star)
           - 2 * np.einsum("...k,...kn,...n->...", v, ar, v_star)) / math.pi
    return float(out) if np.ndim(out) == 0 else out


@dataclass(frozen=True)
class OrderParameters:
    """Order parameters of a concrete instance (see :func:`order_parameters`).

    Attributes
    ----------
    Q, R, T : numpy.ndarray
        Overlaps, shapes (K, K), (K, M), (M, M).
    b, b_star : numpy.ndarray or None
        :math:`-WF/\\sqrt N` and :math:`-W^*F/\\sqrt N` (None when no F was given).
    Phi : float or None
        :math:`\\lVert F\\rVert^2` (None when no F was given).
    """

    Q: np.ndarray
    R: np.ndarray
    T: np.ndarray
    b: np.ndarray | None = None
    b_star: np.ndarray | None = None
    Phi: float | None = None


def order_parameters(W, W_star, F=None, *, scale: str = "theory") -> OrderParameters:
    r"""Order parameters of a finite-N instance, in the theory normalisation (spec §2).

    .. math::
        Q=\frac{WW^\top}{N},\quad R=\frac{WW^{*\top}}{N},\quad T=\frac{W^*W^{*\top}}{N},\quad
        b=-\frac{WF}{\sqrt N},\quad b^*=-\frac{W^*F}{\sqrt N},\quad \Phi=\lVert F\rVert^2 .

    Start the ODE from the order parameters of the same instance as a simulation (spec §8):
    random-initialisation overlaps are :math:`O(N^{-1/2})` and set plateau lengths.

    Parameters
    ----------
    W : array_like, shape (K, N)
        Student first-layer weights :math:`w_k` (rows), O(1) entries, acting as
        :math:`\lambda_k=w_k\cdot x/\sqrt N`.
    W_star : array_like, shape (M, N)
        Teacher first-layer weights.
    F : array_like, shape (N,), optional
        The fixed feedback vector in input space (PEPITA's :math:`\tilde x=x+Fe`); the extra
        field is :math:`\xi_F=x\cdot F`.
    scale : {"theory", "practical"}
        ``"theory"``: W, W_star as above. ``"practical"``: they are
        :math:`W_1=w/\sqrt N` acting on raw x (the PEPITA-code convention), so
        :math:`Q=W_1W_1^\top`, :math:`b=-W_1F`, etc.

    Returns
    -------
    OrderParameters
    """
    W = _float_array("order_parameters.W", W, ndim=2)
    W_star = _float_array("order_parameters.W_star", W_star, ndim=2)
    N = W.shape[1]
    if W_star.shape[1] != N:
        raise ValidationError("order_parameters.W_star",
                              f"shape {W_star.shape}, expected (M, N) with N = {N} like W.")
    if scale not in ("theory", "practical"):
        raise ValidationError("order_parameters.scale",
                              f"got {scale!r}; expected 'theory' or 'practical'.")
    if scale == "practical":
        W = W * math.sqrt(N)
        W_star = W_star * math.sqrt(N)
    Q = W @ W.T / N
    R = W @ W_star.T / N
    T = W_star @ W_star.T / N
    if F is None:
        return OrderParameters(Q, R, T)
    F = _float_array("order_parameters.F", F, ndim=1)
    _check_shape("order_parameters.F", F, (N,), "(N,)")
    b = -(W @ F) / math.sqrt(N)
    b_star = -(W_star @ F) / math.sqrt(N)
    return OrderParameters(Q, R, T, b, b_star, float(F @ F))


# --------------------------------------------------------------------------------------------
# Right-hand sides in numpy (reference implementation, spec §4)
# --------------------------------------------------------------------------------------------


class Derivatives(NamedTuple):
    """Time derivatives of the integrated order parameters.

    ``dQ`` (K, K), ``dR`` (K, M), ``dv`` (K,), ``db`` (K,). ``db`` is zero for ``bp`` and ``fa``
    (no adaptive feedback); ``dv`` is zero when the readout is frozen.
    """

    dQ: np.ndarray
    dR: np.ndarray
    dv: np.ndarray
    db: np.ndarray


@functools.lru_cache(maxsize=64)
def _grids(K: int, M: int):
    """Index grids that gather covariance blocks for every (k, ., ., .) combination.

    Field indices 0..K-1 are the students, K..K+M-1 the teachers, K+M the F field.
    Returns index arrays (rows, cols) for
    I2 blocks (K, P, 2, 2), I3 blocks (K, P+1, P, 3, 3), I4 blocks (K, K, P, P, 4, 4) and
    J3 blocks (K, P, P, 3, 3).
    """
    P = K + M
    k = np.arange(K)
    c = np.arange(P)
    bx = np.arange(P + 1)

    def rc(idx):
        idx = np.stack(np.broadcast_arrays(*idx), axis=-1)
        return idx[..., :, None], idx[..., None, :]

    g2 = rc((k[:, None], c[None, :]))
    g3 = rc((k[:, None, None], bx[None, :, None], c[None, None, :]))
    g4 = rc((k[:, None, None, None], k[None, :, None, None], c[None, None, :, None],
             c[None, None, None, :]))
    gj = rc((k[:, None, None], c[None, :, None], c[None, None, :]))
    for g in (g2, g3, g4, gj):
        for a in g:
            a.setflags(write=False)
    return g2, g3, g4, gj


def _rhs_numpy(s: _State) -> Derivatives:
    """Evaluate spec §4.1/4.4/4.5 with the public integrals on gathered covariance blocks."""
    K, M = s.K, s.M
    P = K + M
    afa = s.rule in ("afa", "pepita")
    # Extended covariance over (lambda, nu, xi_F); Var(xi_F) never enters I3's middle slot.
    Cx = np.zeros((P + 1, P + 1))
    Cx[:K, :K] = s.Q
    Cx[:K, K:P] = s.R
    Cx[K:P, :K] = s.R.T
    Cx[K:P, K:P] = s.T
    if afa:
        cF = -np.concatenate([s.b, s.b_star])
        Cx[P, :P] = cF
        Cx[:P, P] = cF
        Cx[P, P] = s.Phi
    C = Cx[:P, :P]
    a = np.concatenate([-s.v, s.v_star])  # Delta = sum_c a_c g(u_c) + sigma*zeta
    beta = s.v if s.rule == "bp" else s.b
    g2, g3, g4, gj = _grids(K, M)

    # E1[k, b] = E[g'(lambda_k) u_b Delta] = sum_c a_c I3(k, b, c), b over all fields and F.
    E1 = I3(Cx[g3]) @ a                                   # (K, P+1)
    # E2[k, l] = E[g'_k g'_l Delta^2] = sum_cd a_c a_d I4(k, l, c, d) + sigma^2 J2(k, l).
    E2 = np.einsum("klcd,c,d->kl", I4(C[g4]), a, a) + s.sigma**2 * J2(C[g4][:, :, 0, 0, :2, :2])

    X = s.eta * beta[:, None] * E1[:, :K]
    dQ = X + X.T + s.eta**2 * np.outer(beta, beta) * E2
    dR = s.eta * beta[:, None] * E1[:, K:P]
    dv = s.eta_v * (I2(C[g2]) @ a) if s.train_v else np.zeros(K)
    db = -s.eta * s.b * E1[:, P] if afa else np.zeros(K)

    if s.rule == "pepita":
        # E_k = E[g'(lambda_k) Delta^2] = sum_cd a_c a_d J3(k, c, d) + sigma^2 J1(k).
        Ek = (np.einsum("kcd,c,d->k", J3(C[gj]), a, a)
              + s.sigma**2 * J1(C[gj][:, 0, 0, :1, :1]))
        dR = dR + s.eta * np.outer(s.b * Ek, s.b_star)
        dQ = dQ + s.eta * np.outer(s.b, s.b) * (Ek[:, None] + Ek[None, :])
        db = db + s.eta * s.Phi * s.b * Ek
        if s.train_v:
            dv = dv + s.eta_v * s.b * Ek
    # Exact symmetry: keep the upper triangle and mirror it.
    dQ = np.triu(dQ) + np.triu(dQ, 1).T
    return Derivatives(dQ, dR, dv, db)


_RHS_PARAMS_DOC = r"""
    Parameters
    ----------
    Q : array_like, shape (K, K)
        Student-student overlaps, symmetric.
    R : array_like, shape (K, M)
        Student-teacher overlaps.
    T : array_like, shape (M, M)
        Teacher-teacher overlaps (constant).
    v : array_like, shape (K,)
        Student readout.
    v_star : array_like, shape (M,)
        Teacher readout (constant).
    eta, eta_v : float
        First- and second-layer learning rates (scalings :math:`\eta/\sqrt N`, :math:`\eta_v/N`).
    sigma : float
        Output-noise standard deviation.
    train_v : bool
        Whether the readout learns (else ``dv = 0``).
"""


def _with_params(f):
    """Insert the shared parameter list into a right-hand-side docstring."""
    f.__doc__ = f.__doc__.replace("    {params}", "\n" + _RHS_PARAMS_DOC.strip("\n") + "\n")
    return f


@_with_params
def rhs_bp(Q, R, T, v, v_star, *, eta, eta_v=None, sigma=0.0, train_v=True) -> Derivatives:
    r"""Right-hand side of the BP ODEs (spec §4.1-4.2, :math:`\beta=v`).

    .. math::
        \frac{dR_{kn}}{dt}&=\eta\beta_k\textstyle\sum_c a_c I_3(k,n,c),\\
        \frac{dQ_{kl}}{dt}&=\eta\beta_k\textstyle\sum_c a_cI_3(k,l,c)+\eta\beta_l\sum_c
            a_cI_3(l,k,c)+\eta^2\beta_k\beta_l\big[\sum_{cd}a_ca_dI_4(k,l,c,d)
            +\sigma^2J_2(k,l)\big],\\
        \frac{dv_k}{dt}&=\eta_v\textstyle\sum_c a_c I_2(k,c),

    with :math:`a=(-v_1..-v_K,v^*_1..v^*_M)` over the fields :math:`u=(\lambda,\nu)`.
    {params}
    Returns
    -------
    Derivatives
        ``(dQ, dR, dv, db)``; ``db`` is zero.
    """
    eta_v = eta if eta_v is None else eta_v
    s = _validate("rhs_bp", "bp", Q, R, T, v, v_star, eta, eta_v, sigma, None, None, None,
                  train_v, check_psd=False)
    return _rhs_numpy(s)


@_with_params
def rhs_fa(Q, R, T, v, v_star, b, *, eta, eta_v=None, sigma=0.0, train_v=True) -> Derivatives:
    r"""Right-hand side of the FA/DFA ODEs (spec §4.3): §4.1 with fixed :math:`\beta=b`.

    The feedback enters only the prefactors :math:`\beta_k,\beta_l,\beta_k\beta_l`; the error
    inside the brackets is built from the forward readout :math:`v`.
    {params}    b : array_like, shape (K,)
        Fixed feedback vector.

    Returns
    -------
    Derivatives
        ``(dQ, dR, dv, db)``; ``db`` is zero (b is fixed).
    """
    eta_v = eta if eta_v is None else eta_v
    s = _validate("rhs_fa", "fa", Q, R, T, v, v_star, eta, eta_v, sigma, b, None, None,
                  train_v, check_psd=False)
    return _rhs_numpy(s)


@_with_params
def rhs_afa(Q, R, T, v, v_star, b, b_star, *, eta, eta_v=None, sigma=0.0,
            train_v=True) -> Derivatives:
    r"""Right-hand side of the AFA ODEs (spec §4.4): §4.1 with :math:`\beta=b(t)` plus (AFA-b).

    .. math::
        \frac{db_k}{dt}=-\eta\,b_k\sum_c a_c I_3(k,F,c),\qquad C_{kF}=-b_k,\;
        C_{Fc}=-(b,b^*)_c ,

    i.e. :math:`\frac{db_k}{dt}=\frac{2\eta}{\pi}b_k\Big[\sum_n v^*_n
    \frac{b^*_n(1+Q_{kk})-b_kR_{kn}}{(1+Q_{kk})\sqrt{(1+Q_{kk})(1+T_{nn})-R_{kn}^2}}
    -\sum_j v_j\frac{b_j(1+Q_{kk})-b_kQ_{kj}}{(1+Q_{kk})\sqrt{(1+Q_{kk})(1+Q_{jj})-Q_{kj}^2}}
    \Big]`. :math:`\Phi` and :math:`\sigma` do not enter.
    {params}    b : array_like, shape (K,)
        Adaptive feedback :math:`b=-WF/\sqrt N` (the state).
    b_star : array_like, shape (M,)
        Teacher response along F, :math:`-W^*F/\sqrt N` (constant).

    Returns
    -------
    Derivatives
    """
    eta_v = eta if eta_v is None else eta_v
    s = _validate("rhs_afa", "afa", Q, R, T, v, v_star, eta, eta_v, sigma, b, b_star, None,
                  train_v, check_psd=False)
    return _rhs_numpy(s)


@_with_params
def rhs_pepita(Q, R, T, v, v_star, b, b_star, Phi, *, eta, eta_v=None, sigma=0.0,
               train_v=True) -> Derivatives:
    r"""Right-hand side of AFA plus the first-order PEPITA corrections (spec §4.5).

    With :math:`E_k=\mathbb E[g'(\lambda_k)\Delta^2]=\sum_{cd}a_ca_dJ_3(k,c,d)+\sigma^2J_1(k)`
    the AFA right-hand side (:func:`rhs_afa`) is augmented by

    .. math::
        \frac{dR_{kn}}{dt}\mathrel{+}=\eta b_kb^*_nE_k,\quad
        \frac{dQ_{kl}}{dt}\mathrel{+}=\eta b_kb_l(E_k+E_l),\quad
        \frac{db_k}{dt}\mathrel{+}=\eta\Phi b_kE_k,\quad
        \frac{dv_k}{dt}\mathrel{+}=\eta_v b_kE_k .
    {params}    b, b_star : array_like, shapes (K,), (M,)
        As in :func:`rhs_afa`.
    Phi : float
        :math:`\lVert F\rVert^2`.

    Returns
    -------
    Derivatives
    """
    eta_v = eta if eta_v is None else eta_v
    s = _validate("rhs_pepita", "pepita", Q, R, T, v, v_star, eta, eta_v, sigma, b, b_star,
                  Phi, train_v, check_psd=False)
    return _rhs_numpy(s)


def rhs(rule, Q, R, T, v, v_star, *, eta, eta_v=None, sigma=0.0, b=None, b_star=None,
        Phi=None, train_v=True) -> Derivatives:
    """Right-hand side for ``rule`` in {"bp", "fa", "afa", "pepita"} (dispatcher).

    Same arguments as :func:`integrate` without the time grid; see :func:`rhs_bp`,
    :func:`rhs_fa`, :func:`rhs_afa`, :func:`rhs_pepita` for the equations. Like those, it
    checks shapes and values but not positive semidefiniteness (so that covariance-level
    identities can be evaluated anywhere); :func:`integrate` checks it.
    """
    eta_v = eta if eta_v is None else eta_v
    s = _validate("rhs", rule, Q, R, T, v, v_star, eta, eta_v, sigma, b, b_star, Phi, train_v,
                  check_psd=False)
    return _rhs_numpy(s)


# --------------------------------------------------------------------------------------------
# Compiled right-hand side and fixed-step integrator
# --------------------------------------------------------------------------------------------
# Flat state layout: y = [Q (K*K, row-major), R (K*M, row-major), v (K), b (K)].


@_njit(cache=True)
def _clip1(x):
    if x > 1.0:
        return 1.0
    if x < -1.0:
        return -1.0
    return x


@_njit(cache=True)
def _rhs_kernel(y, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma, train_v):
    """dy/dt of spec §4 for the flat state y; all-NaN if a Lambda is not positive."""
    P = K + M
    oR = K * K
    ov = oR + K * M
    ob = ov + K
    n = ob + K
    dy = np.zeros(n)
    two_pi = 2.0 / np.pi
    four_pi2 = 4.0 / np.pi**2
    afa = rule >= 2

    C = np.empty((P, P))
    for k in range(K):
        for l in range(K):
            C[k, l] = y[k * K + l]
        for m in range(M):
            r = y[oR + k * M + m]
            C[k, K + m] = r
            C[K + m, k] = r
    for i in range(M):
        for m in range(M):
            C[K + i, K + m] = T[i, m]
    a = np.empty(P)
    d1 = np.empty(P)
    for k in range(K):
        a[k] = -y[ov + k]
    for m in range(M):
        a[K + m] = vs[m]
    for c in range(P):
        d1[c] = 1.0 + C[c, c]
        if not d1[c] > 0.0:
            dy[:] = np.nan
            return dy
    beta = np.empty(K)
    for k in range(K):
        beta[k] = y[ov + k] if rule == 0 else y[ob + k]
    cF = np.empty(P)
    for k in range(K):
        cF[k] = -y[ob + k]
    for m in range(M):
        cF[K + m] = -bs[m]

    # dv_k = eta_v sum_c a_c I2(k, c)
    if train_v:
        for k in range(K):
            acc = 0.0
            for c in range(P):
                acc += a[c] * np.arcsin(_clip1(C[k, c] / np.sqrt(d1[k] * d1[c])))
            dy[ov + k] = eta_v * two_pi * acc

    # E1[k, b] = sum_c a_c I3(k, b, c); I3 is linear in the covariances of the middle field:
    # E1[k, b] = 2/pi [sum_c w_kc C_bc - C_kb/(1+C_kk) sum_c w_kc C_kc], w_kc = a_c/sqrt(Lam3).
    E1 = np.empty((K, P))
    E1F = np.zeros(K)
    w = np.empty(P)
    for k in range(K):
        sk = 0.0
        for c in range(P):
            lam3 = d1[k] * d1[c] - C[k, c] * C[k, c]
            if not lam3 > 0.0:
                dy[:] = np.nan
                return dy
            w[c] = a[c] / np.sqrt(lam3)
            sk += w[c] * C[k, c]
        sk /= d1[k]
        for bb in range(P):
            acc = 0.0
            for c in range(P):
                acc += w[c] * C[bb, c]
            E1[k, bb] = two_pi * (acc - C[k, bb] * sk)
        if afa:
            acc = 0.0
            for c in range(P):
                acc += w[c] * cF[c]
            E1F[k] = two_pi * (acc - cF[k] * sk)

    for k in range(K):
        for m in range(M):
            dy[oR + k * M + m] = eta * beta[k] * E1[k, K + m]

    # dQ_kl, upper triangle, mirrored. E2 = sum_cd a_c a_d I4(k,l,c,d) + sigma^2 J2(k,l).
    L1 = np.empty(P)
    for k in range(K):
        for l in range(k, K):
            ckl = C[k, l]
            lam4 = d1[k] * d1[l] - ckl * ckl
            if not lam4 > 0.0:
                dy[:] = np.nan
                return dy
            for c in range(P):
                L1[c] = (lam4 * d1[c] - C[l, c] * C[l, c] * d1[k] - C[k, c] * C[k, c] * d1[l]
                         + 2.0 * ckl * C[k, c] * C[l, c])
                if not L1[c] > 0.0:
                    dy[:] = np.nan
                    return dy
            acc = 0.0
            for c in range(P):
                for d in range(c, P):
                    lam0 = (lam4 * C[c, d] - C[l, c] * C[l, d] * d1[k]
                            - C[k, c] * C[k, d] * d1[l]
                            + ckl * (C[k, c] * C[l, d] + C[k, d] * C[l, c]))
                    term = a[c] * a[d] * np.arcsin(_clip1(lam0 / np.sqrt(L1[c] * L1[d])))
                    acc += term if d == c else 2.0 * term
            e2 = (four_pi2 * acc + two_pi * sigma * sigma) / np.sqrt(lam4)
            dq = eta * (beta[k] * E1[k, l] + beta[l] * E1[l, k]) + eta * eta * beta[k] * beta[l] * e2
            dy[k * K + l] = dq
            dy[l * K + k] = dq

    if afa:
        for k in range(K):
            dy[ob + k] = -eta * y[ob + k] * E1F[k]

    if rule == 3:
        # E_k = sum_cd a_c a_d J3(k, c, d) + sigma^2 J1(k)
        Ek = np.empty(K)
        tdiag = np.empty(P)
        for k in range(K):
            for c in range(P):
                tdiag[c] = 1.0 + C[c, c] - C[k, c] * C[k, c] / d1[k]
            acc = 0.0
            for c in range(P):
                for d in range(c, P):
                    tcd = C[c, d] - C[k, c] * C[k, d] / d1[k]
                    term = a[c] * a[d] * np.arcsin(_clip1(tcd / np.sqrt(tdiag[c] * tdiag[d])))
                    acc += term if d == c else 2.0 * term
            Ek[k] = np.sqrt(2.0 / np.pi) / np.sqrt(d1[k]) * (two_pi * acc + sigma * sigma)
        for k in range(K):
            bk = y[ob + k]
            for m in range(M):
                dy[oR + k * M + m] += eta * bk * bs[m] * Ek[k]
            for l in range(k, K):
                corr = eta * (bk * y[ob + l]) * (Ek[k] + Ek[l])
                dy[k * K + l] += corr
                if l != k:
                    dy[l * K + k] += corr
            dy[ob + k] += eta * Phi * bk * Ek[k]
            if train_v:
                dy[ov + k] += eta_v * bk * Ek[k]
    return dy


@_njit(cache=True)
def _step_kernel(y, h, method, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma, train_v):
    """One explicit step of size h: Euler (method 0) or classical RK4 (method 1)."""
    k1 = _rhs_kernel(y, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma, train_v)
    if method == 0:
        return y + h * k1
    k2 = _rhs_kernel(y + 0.5 * h * k1, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma, train_v)
    k3 = _rhs_kernel(y + 0.5 * h * k2, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma, train_v)
    k4 = _rhs_kernel(y + h * k3, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma, train_v)
    return y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


@_njit(cache=True)
def _all_finite(y):
    for i in range(y.shape[0]):
        if not np.isfinite(y[i]):
            return False
    return True


@_njit(cache=True)
def _integrate_kernel(y0, grid_idx, frac, dt, method, rule, K, M, T, vs, bs, Phi, eta, eta_v,
                      sigma, train_v):
    """Fixed steps on the grid i*dt; output j is the grid state grid_idx[j] advanced by frac[j].

    Returns (out, fail_step): out (n_out, len(y0)) with NaN rows after a failure, fail_step the
    first grid step whose result was not finite (-1 if none).
    """
    n_out = grid_idx.shape[0]
    out = np.full((n_out, y0.shape[0]), np.nan)
    y = y0.copy()
    i = 0
    for j in range(n_out):
        while i < grid_idx[j]:
            y = _step_kernel(y, dt, method, rule, K, M, T, vs, bs, Phi, eta, eta_v, sigma,
                             train_v)
            i += 1
            if not _all_finite(y):
                return out, i
        if frac[j] > 0.0:
            out[j] = _step_kernel(y, frac[j], method, rule, K, M, T, vs, bs, Phi, eta, eta_v,
                                  sigma, train_v)
        else:
            out[j] = y
    return out, -1


def _pack(s: _State) -> np.ndarray:
    return np.concatenate([s.Q.ravel(), s.R.ravel(), s.v, s.b])


def _unpack(y: np.ndarray, K: int, M: int):
    """Split flat states (..., n) into Q, R, v, b."""
    oR, ov, ob = K * K, K * K + K * M, K * K + K * M + K
    lead = y.shape[:-1]
    return (y[..., :oR].reshape(lead + (K, K)), y[..., oR:ov].reshape(lead + (K, M)),
            y[..., ov:ob], y[..., ob:ob + K])


def _rhs_flat_numpy(y: np.ndarray, s: _State) -> np.ndarray:
    Q, R, v, b = _unpack(y, s.K, s.M)
    st = s._replace(Q=Q, R=R, v=v, b=b)
    d = _rhs_numpy(st)
    return np.concatenate([d.dQ.ravel(), d.dR.ravel(), d.dv, d.db])


def _integrate_numpy(y0, grid_idx, frac, dt, method, s: _State):
    """Pure-numpy twin of :func:`_integrate_kernel` (fallback and test reference)."""
    def step(y, h):
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            k1 = _rhs_flat_numpy(y, s)
            if method == 0:
                return y + h * k1
            k2 = _rhs_flat_numpy(y + 0.5 * h * k1, s)
            k3 = _rhs_flat_numpy(y + 0.5 * h * k2, s)
            k4 = _rhs_flat_numpy(y + h * k3, s)
            return y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

    out = np.full((len(grid_idx), y0.shape[0]), np.nan)
    y = y0.copy()
    i = 0
    for j in range(len(grid_idx)):
        while i < grid_idx[j]:
            y = step(y, dt)
            i += 1
            if not np.all(np.isfinite(y)):
                return out, i
        out[j] = step(y, frac[j]) if frac[j] > 0 else y
    return out, -1


def _time_grid(times: np.ndarray, dt: float):
    """Map output times to (grid index, remainder) on the grid t_i = i*dt."""
    q = times / dt
    idx = np.floor(q)
    near = np.abs(q - np.round(q)) <= 1e-9 * np.maximum(1.0, np.abs(q))
    idx = np.where(near, np.round(q), idx)
    frac = np.where(near, 0.0, times - idx * dt)
    return idx.astype(np.int64), np.maximum(frac, 0.0)


@dataclass(frozen=True)
class Trajectory:
    r"""Result of :func:`integrate`; the first axis of every array is the output time.

    Attributes
    ----------
    rule : str
    t : numpy.ndarray, shape (n,)
        Output times (samples / N), as requested.
    eps_g : numpy.ndarray, shape (n,)
        Generalisation error with the factor 1/2 (:func:`eps_g`).
    Q : numpy.ndarray, shape (n, K, K)
    R : numpy.ndarray, shape (n, K, M)
    v : numpy.ndarray, shape (n, K)
    b : numpy.ndarray, shape (n, K)
        The first-layer feedback actually used: :math:`v(t)` for BP, the fixed :math:`b` for FA,
        the adaptive :math:`b(t)` for AFA/PEPITA.
    T, v_star : numpy.ndarray
        The constants.
    b_star : numpy.ndarray or None
    Phi : float or None
    eta, eta_v, sigma, dt : float
    train_v : bool
    method : str
    t_fail : float or None
        Grid time of the first step whose state was not finite (the rows from there on are NaN),
        or None if the integration completed.
    """

    rule: str
    t: np.ndarray
    eps_g: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    v: np.ndarray
    b: np.ndarray
    T: np.ndarray
    v_star: np.ndarray
    b_star: np.ndarray | None
    Phi: float | None
    eta: float
    eta_v: float
    sigma: float
    train_v: bool
    dt: float
    method: str
    t_fail: float | None = None

    @property
    def cos_vb(self) -> np.ndarray:
        r"""Alignment :math:`\cos\angle(v,b)=v\cdot b/(\lVert v\rVert\lVert b\rVert)` per time."""
        num = np.einsum("tk,tk->t", self.v, self.b)
        den = np.linalg.norm(self.v, axis=1) * np.linalg.norm(self.b, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / den


def integrate(rule: str, *, Q, R, T, v, v_star, eta, eta_v=None, sigma=0.0, b=None,
              b_star=None, Phi=None, train_v=True, times, dt=0.01,
              method="rk4") -> Trajectory:
    r"""Integrate the teacher-student ODEs of ``rule`` and sample them at ``times``.

    The state is :math:`(Q,R,v)` for ``bp``/``fa`` and :math:`(Q,R,v,b)` for ``afa``/``pepita``
    (spec §4.7); :math:`T,v^*` (and :math:`b^*,\Phi`) are constants. The scheme is fixed-step
    classical RK4 or explicit Euler on the grid :math:`t_i=i\,dt` starting from the initial
    state at :math:`t=0`; an output time between grid points is reached by one extra partial
    step of the same scheme from the grid point below it, so the trajectory does not depend on
    which output times are requested.

    Parameters
    ----------
    rule : {"bp", "fa", "afa", "pepita"}
        First-layer rule (spec §1.2, §4): BP (:math:`\beta=v`), FA/DFA (fixed :math:`\beta=b`),
        AFA (adaptive :math:`\beta=b(t)` with Eq. AFA-b), PEPITA (AFA plus the first-order
        corrections of spec §4.5).
    Q, R, T : array_like, shapes (K, K), (K, M), (M, M)
        Initial overlaps; :math:`[[Q,R],[R^\top,T]]` must be positive semidefinite.
    v, v_star : array_like, shapes (K,), (M,)
        Initial student readout, teacher readout. K and M are taken from their lengths.
    eta : float
        First-layer learning rate (update :math:`\eta/\sqrt N\,\delta_k x`), >= 0.
    eta_v : float, optional
        Readout learning rate (update :math:`\eta_v/N\,\Delta g(\lambda_k)`); default ``eta``.
    sigma : float
        Output-noise standard deviation (enters the :math:`\eta^2` term only).
    b : array_like, shape (K,)
        ``fa``: fixed feedback; ``afa``/``pepita``: initial adaptive feedback
        :math:`b(0)=-W(0)F/\sqrt N`. Ignored for ``bp``.
    b_star : array_like, shape (M,)
        ``afa``/``pepita``: teacher response :math:`-W^*F/\sqrt N`. Ignored otherwise.
    Phi : float, optional
        ``pepita``: :math:`\lVert F\rVert^2` (required). ``afa``: optional, only used to check that
        the covariance of :math:`(\lambda,\nu,x\cdot F)` is PSD. Ignored otherwise.
    train_v : bool
        Train the readout (else :math:`dv/dt=0`).
    times : array_like, shape (n,)
        Output times :math:`t=\mu/N`, non-negative and strictly increasing.
    dt : float
        Integration step, > 0. RK4 at ``dt=0.01`` agrees with Euler at ``dt=0.01`` to about 4
        significant digits in :math:`\epsilon_g` (spec §7 item 6).
    method : {"rk4", "euler"}

    Returns
    -------
    Trajectory
        ``t, eps_g, Q, R, v, b`` (first axis = output time), plus the constants. If the state
        stops being finite (e.g. PEPITA's exponential growth of b for large :math:`\Phi`), a
        :class:`~neurosim.errors.NeurosimWarning` is issued, the later rows are NaN and
        ``t_fail`` says when.

    Raises
    ------
    neurosim.errors.ValidationError
        Unknown rule or method; wrong shapes; non-symmetric Q or T; a covariance that is not
        PSD; missing ``b`` (fa, afa, pepita), ``b_star`` (afa, pepita) or ``Phi`` (pepita);
        negative learning rates or noise; times empty, negative or not strictly increasing;
        ``dt <= 0``.

    Examples
    --------
    >>> import numpy as np
    >>> from neurosim.theory import integrate
    >>> tr = integrate("bp", Q=np.eye(2), R=0.1 * np.eye(2), T=np.eye(2), v=np.ones(2),
    ...                v_star=np.ones(2), eta=0.5, times=np.array([0.0, 10.0]))
    >>> tr.eps_g.shape
    (2,)
    """
    eta_v = eta if eta_v is None else eta_v
    s = _validate("integrate", rule, Q, R, T, v, v_star, eta, eta_v, sigma, b, b_star, Phi,
                  train_v, check_psd=True)
    if not isinstance(method, str) or method not in _METHOD_CODE:
        raise ValidationError("integrate.method", f"got {method!r}; expected one of {METHODS}.")
    dt = _scalar("integrate.dt", dt, low=0.0, strict=True)
    times = _float_array("integrate.times", times)
    if times.ndim == 0:
        times = times[None]
    if times.ndim != 1 or times.size == 0:
        raise ValidationError("integrate.times", f"shape {times.shape}; expected a non-empty "
                                                 "1-D array of output times.")
    if times[0] < 0:
        raise ValidationError("integrate.times", f"starts at {times[0]}; the initial state is "
                                                 "at t = 0, so times must be >= 0.")
    if np.any(np.diff(times) <= 0):
        j = int(np.argmax(np.diff(times) <= 0))
        raise ValidationError("integrate.times",
                              f"not strictly increasing (times[{j}] = {times[j]}, "
                              f"times[{j + 1}] = {times[j + 1]}).",
                              "Sort them and drop duplicates, e.g. np.unique(times).")
    grid_idx, frac = _time_grid(times, dt)

    y0 = _pack(s)
    args = (_RULE_CODE[s.rule], s.K, s.M, np.ascontiguousarray(s.T), s.v_star.copy(),
            s.b_star.copy(), float(s.Phi), s.eta, s.eta_v, s.sigma, s.train_v)
    if _HAVE_NUMBA:
        out, fail = _integrate_kernel(y0, grid_idx, frac, dt, _METHOD_CODE[method], *args)
    else:  # pragma: no cover
        out, fail = _integrate_numpy(y0, grid_idx, frac, dt, _METHOD_CODE[method], s)
    t_fail = None
    if fail >= 0:
        t_fail = float(fail * dt)
        warnings.warn(
            f"integrate({s.rule!r}): the state stopped being finite (or left the PSD cone) at "
            f"t = {t_fail:g}; outputs from there on are NaN. For 'pepita' this is the "
            f"exponential growth of b at rate eta*Phi*E[g' Delta^2] (spec §5); otherwise "
            f"lower dt or eta.", NeurosimWarning, stacklevel=2)

    Qt, Rt, vt, bt = _unpack(out, s.K, s.M)
    if s.rule == "bp":
        bt = vt.copy()
    with np.errstate(invalid="ignore"):
        eg = eps_g(Qt, Rt, s.T, vt, s.v_star) if np.all(np.isfinite(out)) else \
            _eps_g_nan(Qt, Rt, s.T, vt, s.v_star)
    uses_bstar = s.rule in ("afa", "pepita")
    return Trajectory(
        rule=s.rule, t=times.copy(), eps_g=np.asarray(eg, dtype=float).reshape(times.shape),
        Q=Qt.copy(), R=Rt.copy(), v=vt.copy(), b=bt.copy(), T=s.T.copy(),
        v_star=s.v_star.copy(), b_star=s.b_star.copy() if uses_bstar else None,
        Phi=float(s.Phi) if (s.rule == "pepita" or (uses_bstar and Phi is not None)) else None,
        eta=s.eta, eta_v=s.eta_v, sigma=s.sigma, train_v=s.train_v, dt=dt, method=method,
        t_fail=t_fail)


def _eps_g_nan(Q, R, T, v, v_star) -> np.ndarray:
    """eps_g row by row, NaN where the state is not finite."""
    out = np.full(Q.shape[0], np.nan)
    for j in range(Q.shape[0]):
        if np.all(np.isfinite(Q[j])) and np.all(np.isfinite(R[j])) and np.all(np.isfinite(v[j])):
            out[j] = eps_g(Q[j], R[j], T, v[j], v_star)
    return out
