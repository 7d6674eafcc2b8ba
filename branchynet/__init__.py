"""branchynet: BranchyNet early-exit inference for PyTorch.

Teerapittayanon, McDanel and Kung, "BranchyNet: Fast Inference via Early Exiting from
Deep Neural Networks", ICPR 2016 (arXiv 1709.01686).
"""

import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _load_checkout_kernels():
    """Make the top-level ``kernels/`` of a source checkout importable as ``branchynet.kernels``.

    A wheel installs ``kernels/`` as ``branchynet/kernels`` (setup.py ``package_dir``), so
    there is nothing to do. In a source checkout (editable install, or the tests run from
    the repository root) the package directory has no ``kernels/`` of its own; its sibling
    is loaded under the package's name. The ``csrc/`` beside it marks this repository, so
    an unrelated top-level ``kernels`` package in site-packages is never picked up.
    """
    here = __path__[0]
    root = _os.path.dirname(here)
    init = _os.path.join(root, "kernels", "__init__.py")
    if (_os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isfile(init)
            or not _os.path.isdir(_os.path.join(root, "csrc"))):
        return
    spec = _importlib_util.spec_from_file_location(
        __name__ + ".kernels", init, submodule_search_locations=[_os.path.dirname(init)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_load_checkout_kernels()

from .config import CRITERIA, ExitConfig  # noqa: E402
from .exits import entropy, exit_scores  # noqa: E402
from .loss import joint_loss  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, load_engine, save_checkpoint  # noqa: E402

# Imported on first use (PEP 562): an exported model runs through branchynet.deploy in a
# process that cannot (or must not) import the model definitions, and importing any
# submodule runs this file first.
_LAZY = {
    "BranchyNet": ".models", "from_sequential": ".models", "from_stages": ".models",
    "attach_exits": ".models", "EarlyExitEngine": ".engine", "ExitResult": ".engine",
    "TrainSettings": ".train",
}


def __getattr__(name: str):
    import importlib

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif not name.startswith("__") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # branchynet.models without an import
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

__version__ = "0.1.0"

__all__ = [
    "attach_exits",
    "BranchyNet",
    "CheckpointError",
    "CRITERIA",
    "EarlyExitEngine",
    "ExitConfig",
    "ExitResult",
    "entropy",
    "exit_scores",
    "from_sequential",
    "from_stages",
    "joint_loss",
    "load_checkpoint",
    "load_engine",
    "save_checkpoint",
    "TrainSettings",
]
