"""Pure functions of arrays and traces: accuracy, alignment angles, convergence-rate fits."""

from __future__ import annotations

import math

import numpy as np


def accuracy(pred, labels) -> float:
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float(np.mean(pred == labels))


def angle_deg(a, b) -> float:
    """Angle in degrees between two arrays seen as vectors."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return float("nan")
    return float(np.degrees(np.arccos(np.clip(a @ b / (na * nb), -1.0, 1.0))))


SLOWNESS_MIN_POINTS = 4
"""Measured points :func:`slowness_fit` needs. The model is 0 at t = 0 whatever its parameters,
so the prepended chance point carries no information and n measured points leave n - 2 degrees
of freedom for two parameters; with fewer than two, s follows the noise of single epochs."""


def slowness_points(epochs, test_acc, *, before=None) -> int:
    """The number of measured points :func:`slowness_fit` would use (finite accuracies at
    epochs up to ``before``; the prepended chance point not counted)."""
    ep = np.asarray(epochs, np.float64)
    keep = np.isfinite(np.asarray(test_acc, np.float64))
    if before is not None:
        keep &= ep <= before
    return int(keep.sum())


def slowness_fit(epochs, test_acc, *, n_classes: int = 10, before=None) -> dict | None:
    """Fit ``acc(t) = acc_max * t / (s + t)`` to the test curve (the convergence-rate
    "slowness" s of Srinivasan et al. 2024; smaller s = faster).

    Chance level (1 / n_classes) is prepended at epoch 0 as in the paper, and only epochs
    before ``before`` (the first learning-rate decay) are used. Returns ``{"s", "acc_max",
    "n_points"}`` (``n_points`` counts the chance point), or None with fewer than
    :data:`SLOWNESS_MIN_POINTS` measured points or when the fit fails.
    """
    ep = np.asarray(epochs, np.float64)
    acc = np.asarray(test_acc, np.float64)
    keep = np.isfinite(acc)
    if before is not None:
        keep &= ep <= before
    if int(keep.sum()) < SLOWNESS_MIN_POINTS:
        return None
    ep, acc = np.concatenate([[0.0], ep[keep]]), np.concatenate([[1.0 / n_classes], acc[keep]])
    from scipy.optimize import curve_fit

    def f(t, amax, s):
        return amax * t / (s + t)

    try:
        (amax, s), _ = curve_fit(f, ep, acc, p0=(acc.max(), 1.0), bounds=([0, 0], [1.5, 1e4]),
                                 maxfev=10000)
    except (RuntimeError, ValueError):
        return None
    # the model is 0 at t = 0, so the chance point only pins the origin as in the paper
    return {"s": float(s), "acc_max": float(amax), "n_points": int(len(ep))}
