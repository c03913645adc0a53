"""neurosim: a rate-based simulation engine for forward-only learning.

Public API (everything else is private)::

    from neurosim import (Circuit, Population, ErrorPopulation, Projection, Phase, Protocol,
                          Monitor, Trace, compile_plan, Simulator, SGD, PEPITA)
"""

from .circuit import Circuit, ErrorPopulation, Population, Projection, TRANSFERS
from .compiler import Plan, PlanBuilder, compile_plan
from .errors import (BareTimeWarning, CompileError, DataError, FolderLockedError, NeurosimError,
                     NeurosimWarning, ResourceError, SimulationError, ValidationError)
from .init import FanInUniform, Given, HeUniform, Normal, Uniform, Zeros
from .monitors import Monitor, Trace, Traces
from .plasticity import (AFA, BP, CONVENTIONS, DFA, FA, PEPITA, SGD, PlasticityRule,
                         register_builder)
from .protocol import Phase, Protocol
from .simulator import Simulator, shuffled_order

__version__ = "0.1.0"

__all__ = [
    "Circuit", "Population", "ErrorPopulation", "Projection", "TRANSFERS", "Phase", "Protocol",
    "Monitor", "Trace", "Traces", "Plan", "PlanBuilder", "compile_plan", "Simulator",
    "shuffled_order",
    "SGD", "PEPITA", "CONVENTIONS", "BP", "FA", "DFA", "AFA", "PlasticityRule", "register_builder",
    "HeUniform", "FanInUniform", "Uniform", "Normal", "Zeros", "Given",
    "NeurosimError", "ValidationError", "DataError", "CompileError", "SimulationError",
    "ResourceError", "FolderLockedError", "NeurosimWarning", "BareTimeWarning", "__version__",
]

from .plasticity import (BCM, PES, Hebbian, NormalizedPEPITA, Oja, PEPITATimeLocal,  # noqa: E402
                         WeightMirroring)
from .diagnostics import GradientAlignment, PepitaAfaAngle  # noqa: E402

__all__ += ["NormalizedPEPITA", "PEPITATimeLocal", "WeightMirroring", "Oja", "GradientAlignment",
            "PepitaAfaAngle", "Hebbian", "BCM", "PES"]
from .saving import LoadedRun, load_run, register_type  # noqa: E402

__all__ += ["load_run", "LoadedRun", "register_type"]
