"""branchynet: BranchyNet early-exit inference for PyTorch.

Teerapittayanon, McDanel and Kung, "BranchyNet: Fast Inference via Early Exiting from
Deep Neural Networks", ICPR 2016 (arXiv 1709.01686).
"""

from .config import CRITERIA, ExitConfig
from .exits import entropy, exit_scores
from .loss import joint_loss
from .models import BranchyNet, from_sequential, from_stages
from .engine import EarlyExitEngine, ExitResult
from .checkpoint import CheckpointError, load_checkpoint, load_engine, save_checkpoint

__version__ = "0.1.0"

__all__ = [
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
]
