"""Program runners (backends).

A backend executes a compiled plan's program: the arena, buffer table, instructions, blocks,
data and monitor arrays described in :mod:`neurosim.optable`, through one entry point
``run_trials`` with the same arguments and the same meaning in every backend.

- :mod:`neurosim.backends.numpy_backend`: the reference. It runs any plan op by op, decoding
  every instruction generically from the op table and calling the op's reference semantics;
  it compiles nothing and is written against the array API standard, so the arena may live in
  any conforming namespace whose slices are views (numpy; CuPy for a GPU).
- :mod:`neurosim.kernels.ops`: the compiled (numba) interpreter, tested against the reference.

This package imports nothing on its own, so that importing it never starts a compiler.
"""
