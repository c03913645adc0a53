"""Compiled kernels (numpy + numba only)."""
