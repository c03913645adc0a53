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
    """

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    style: str = "reference"
    milestones: tuple = ()
    gamma: float = 0.1
    max_weight: float = 1e4
    lr_scale: dict | None = None

    def __post_init__(self):
        check_float("SGD.lr", self.lr, low=0.0, low_open=True)
        check_float("SGD.momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_float("SGD.weight_decay", self.weight_decay, low=0.0)
        check_choice("SGD.style", self.style, ("reference", "torch"))
        check_float("SGD.gamma", self.gamma, low=0.0, low_open=True)
        check_float("SGD.max_weight", self.max_weight, low=0.0, low_open=True)
        ms = tuple(self.milestones)
        if not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in ms) or \
                list(ms) != sorted(ms):
            raise ValidationError("SGD.milestones", f"got {self.milestones!r}, expected increasing "
                                  "positive epoch numbers.")
        object.__setattr__(self, "milestones", ms)
        scale = dict(self.lr_scale or {})
        for k, v in scale.items():
            check_float(f"SGD.lr_scale[{k!r}]", v, low=0.0, low_open=True)
        object.__setattr__(self, "lr_scale", scale)

    def scale_of(self, projection: str) -> float:
        return float(self.lr_scale.get(projection, 1.0))

    def lr_at(self, epoch: int) -> float:
        """Learning rate during 0-based ``epoch``: lr * gamma^(number of milestones <= epoch)."""
        return self.lr * self.gamma ** sum(1 for m in self.milestones if epoch >= m)

    @property
    def style_code(self) -> int:
        return 0 if self.style == "reference" else 1
