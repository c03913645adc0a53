"""Plasticity rules (descriptions + registered build functions) and optimizers."""

from .base import PlasticityRule, builder_for, register_builder
from .optim import SGD
from .pepita import CONVENTIONS, PEPITA

__all__ = ["PlasticityRule", "register_builder", "builder_for", "SGD", "PEPITA", "CONVENTIONS"]
