"""Plasticity rules (descriptions + registered build functions) and optimizers."""

from .base import PlasticityRule, builder_for, register_builder
from .optim import SGD
from .feedback_alignment import AFA, BP, DFA, FA
from .pepita import CONVENTIONS, PEPITA

__all__ = ["PlasticityRule", "register_builder", "builder_for", "SGD", "PEPITA", "CONVENTIONS", "BP", "FA", "DFA", "AFA"]
from .contrastive import Contrastive, NormalizedPopulation, PepitaHebbian
from .forward_forward import ForwardForward, Goodness, SoftmaxReadout

__all__ += ["Contrastive", "NormalizedPopulation", "PepitaHebbian", "ForwardForward", "Goodness",
            "SoftmaxReadout"]
from .pepita_variants import NormalizedPEPITA, PEPITATimeLocal, WeightMirroring

__all__ += ["NormalizedPEPITA", "PEPITATimeLocal", "WeightMirroring"]
from .local import BCM, PES, Hebbian, LocalRule, Oja

__all__ += ["Oja", "Hebbian", "BCM", "PES", "LocalRule"]
