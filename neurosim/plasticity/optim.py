"""Optimizers, separate from the rules that produce updates."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ValidationError
from ..params import check_choice, check_float


@dataclass(frozen=True, eq=False)
class SGD:
    """SGD with momentum, weight decay and a step learning-rate schedule.

    Parameters
    ----------
    lr : float
        Learning rate eta (> 0).
    momentum : float
        In [0, 1).
    weight_decay : float
        L2 coefficient added to the update inside the momentum step.
    style : ``"reference"`` or ``"torch"``
        ``reference`` (the PEPITA code): ``v = m v + lr (dW/B + wd W); W -= v``.
        ``torch``: ``v = m v + dW/B + wd W; W -= lr v``. Identical for constant lr.
    milestones : tuple of int
        Epochs at which lr is multiplied by ``gamma`` (PEPITA: (60, 90), gamma 0.1).
    gamma : float
    max_weight : float
        A weight whose magnitude exceeds this stops the run (divergence guard).
    lr_scale : dict, optional
        Per-projection multipliers of lr, e.g. the teacher-student scalings
        ``{"W1": 1/sqrt(N), "W2": 1/N}``.
    schedule : ``"step"`` or ``"linear_decay"``
        ``step`` (default): the ``milestones``/``gamma`` schedule. ``linear_decay`` (Hinton's
        Forward-Forward code): lr is constant for the first ``decay_start * epochs`` epochs,
        then falls linearly to ``lr / epochs`` in the last epoch; with ``decay_start = 0.5`` the
        multiplier of 1-based epoch ``k > epochs / 2`` is ``(1 + 2 (epochs - k)) / epochs``.
        Milestones, if any, multiply on top.
    epochs : int, optional
        Total number of epochs, required by ``linear_decay``.
    decay_start : float
        Fraction of ``epochs`` after which ``linear_decay`` starts, in [0, 1).
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    style: str = "reference"
    milestones: tuple = ()
    gamma: float = 0.1
    max_weight: float = 1e4
    lr_scale: dict | None = None
    schedule: str = "step"
    epochs: int | None = None
    decay_start: float = 0.5

    def __post_init__(self):
        check_float("SGD.lr", self.lr, low=0.0, low_open=True)
        check_float("SGD.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_float("SGD.weight_decay", self.weight_decay, low=0.0)
        check_choice("SGD.style", self.style, ("reference", "torch"))
        check_float("SGD.gamma", self.gamma, low=0.0, low_open=True)
        check_float("SGD.max_weight", self.max_weight, low=0.0, low_open=True)
        ms = tuple(self.milestones) if isinstance(self.milestones, (tuple, list)) else (None,)
        if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in ms) or \
                list(ms) != sorted(ms):
            raise ValidationError("SGD.milestones", f"got {self.milestones!r}, expected increasing "
                                  "positive epoch numbers.")
        object.__setattr__(self, "milestones", ms)
        if self.lr_scale is not None and not isinstance(self.lr_scale, dict):
            raise ValidationError("SGD.lr_scale", f"got {type(self.lr_scale).__name__} "
                                  f"{self.lr_scale!r}, expected a dict {{projection: factor}}.")
        scale = dict(self.lr_scale or {})
        for k, v in scale.items():
            check_float(f"SGD.lr_scale[{k!r}]", v, low=0.0, low_open=True)
        object.__setattr__(self, "lr_scale", scale)
        check_choice("SGD.schedule", self.schedule, ("step", "linear_decay"))
        check_float("SGD.decay_start", self.decay_start, low=0.0, high=1.0, high_open=True)
        if self.schedule == "linear_decay" and (
                isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValidationError("SGD.epochs", f"got {self.epochs!r}; schedule='linear_decay' "
                                  "needs the total number of epochs (an int >= 1).")

    def scale_of(self, projection: str) -> float:
        return float(self.lr_scale.get(projection, 1.0))

    def lr_at(self, epoch: int) -> float:
        """Learning rate during 0-based ``epoch``: lr * gamma^(number of milestones <= epoch),
        times the linear-decay multiplier if ``schedule == "linear_decay"``."""
        lr = self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)
        if self.schedule == "linear_decay":
            lr *= linear_decay_gain(epoch, self.epochs, self.decay_start)
        return lr

    @property
    def style_code(self) -> int:
        return 0 if self.style == "reference" else 1


def linear_decay_gain(epoch: int, epochs: int, decay_start: float = 0.5) -> float:
    """Multiplier of lr in 0-based ``epoch`` of ``epochs``: 1 up to ``decay_start * epochs``
    epochs, then ``(1 + (epochs - k) / (1 - decay_start)) / epochs`` for 1-based epoch ``k``
    (capped at 1): Hinton's ``epsgain``, which for ``decay_start = 0.5`` is
    ``(1 + 2 (epochs - k)) / epochs``, reaching ``1 / epochs`` in the last epoch."""
    k = epoch + 1
    if k <= decay_start * epochs:
        return 1.0
    return max(0.0, min(1.0, (1.0 + (epochs - k) / (1.0 - decay_start)) / epochs))
