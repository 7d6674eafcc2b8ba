"""Triton kernels of the exit op (imported lazily by :mod:`branchynet.ops`)."""
