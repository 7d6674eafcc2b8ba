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
from .models import BranchyNet, from_sequential, from_stages  # noqa: E402
from .models import attach_exits  # noqa: E402
from .engine import EarlyExitEngine, ExitResult  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, load_engine, save_checkpoint  # noqa: E402
from .train import TrainSettings  # noqa: E402

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
