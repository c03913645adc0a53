"""Ready-made circuits and rules built on neurosim's public API (installed as neurosim.models)."""

from .pepita import PepitaNetwork, build_pepita_network
from . import feedforward, pepita_variants  # noqa: F401  (register "bp", "fa", "dfa", "afa", "pepita_norm", "pepita_wm", "pepita_tl")
from . import crosscheck  # noqa: F401  (registers the "crosscheck" scenario model)
from . import teacher_student  # noqa: F401  (registers the "teacher_student" scenario model)
from . import forward_forward  # noqa: F401  (registers the "ff" scenario model)
from . import local_rules  # noqa: F401  (registers "oja_pca", "bcm_selectivity", "pes_map")

__all__ = ["PepitaNetwork", "build_pepita_network"]
