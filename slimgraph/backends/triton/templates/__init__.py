"""Kernel templates: each module turns one op's attributes (a frozen spec, equal specs share a kernel)
into readable Triton source: the `@triton.jit` kernels and the launcher `model.py` calls."""
