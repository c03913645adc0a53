"""Interoperability with Brian2: export a time-mode circuit and cross-check the two simulators.

Importing this package does not import brian2; :func:`export_brian2` does, when called.

    from neurosim.interop import export_brian2
    b2 = export_brian2(circuit, protocol, weights=sim.weights)
    b2.run_trial({"x": x_row})
    b2.trace("hidden", "r", phase="forward")

See ``docs/interop.md``.
"""

from .brian2_export import Brian2Network, ExportError, export_brian2

__all__ = ["Brian2Network", "ExportError", "export_brian2"]
