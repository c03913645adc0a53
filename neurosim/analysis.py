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


def slowness_fit(epochs, test_acc, *, n_classes: int = 10, before=None) -> dict | None:
    """Fit ``acc(t) = acc_max * t / (s + t)`` to the test curve (the convergence-rate
    "slowness" s of Srinivasan et al. 2024; smaller s = faster).

    Chance level (1 / n_classes) is prepended at epoch 0 as in the paper, and only epochs
    before ``before`` (the first learning-rate decay) are used. Returns ``{"s", "acc_max",
    "n_points"}`` or None with fewer than 3 usable points.
    """
    ep = np.asarray(epochs, np.float64)
    acc = np.asarray(test_acc, np.float64)
    keep = np.isfinite(acc)
    if before is not None:
        keep &= ep <= before
    ep, acc = np.concatenate([[0.0], ep[keep]]), np.concatenate([[1.0 / n_classes], acc[keep]])
    if len(ep) < 3:
        return None
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
