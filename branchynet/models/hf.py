"""Hugging Face Transformers models with exits: loading them offline, cutting them.

transformers is an optional dependency (``pip install branchynet[hf]``), imported here
lazily. Weights come only from a local directory (``from_pretrained(path)`` with
``local_files_only``), never from the Hub at run time. The cut itself is
:mod:`branchynet.models.export_cut` (torch.fx cannot trace these models).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

__all__ = ["import_transformers"]


def import_transformers():
    """The ``transformers`` module, or an ImportError saying how to install it."""
    _unshadow_hub_kernels()
    try:
        import transformers
    except ImportError as err:
        raise ImportError("exits on Hugging Face models need transformers: "
                          "pip install 'branchynet[hf]' (or pip install transformers)") from err
    return transformers


def _unshadow_hub_kernels() -> None:
    """transformers 5 imports the Hub's ``kernels`` package; run from the root of a source
    checkout, this repository's top-level ``kernels/`` folder (installed as
    ``branchynet.kernels``, never as ``kernels``) would shadow it and break that import.
    Load the installed one under its own name first."""
    if "kernels" in sys.modules:
        return
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        return
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if spec is None or not spec.origin or os.path.dirname(os.path.dirname(spec.origin)) != checkout:
        return
    paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != checkout]
    real = importlib.machinery.PathFinder.find_spec("kernels", paths)
    if real is None:
        return
    module = importlib.util.module_from_spec(real)
    sys.modules["kernels"] = module
    try:
        real.loader.exec_module(module)
    except Exception:
        del sys.modules["kernels"]
        raise
