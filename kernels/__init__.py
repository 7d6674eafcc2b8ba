"""Triton kernels of the exit op, imported as ``branchynet.kernels`` (lazily, by :mod:`branchynet.ops`).

This folder sits at the top level of the repository; a wheel installs it as
``branchynet/kernels`` and a source checkout loads it from here (``branchynet/__init__.py``).
"""
