"""Ready-made circuits and rules built on neurosim's public API (installed as neurosim.models)."""

from .pepita import PepitaNetwork, build_pepita_network

__all__ = ["PepitaNetwork", "build_pepita_network"]
