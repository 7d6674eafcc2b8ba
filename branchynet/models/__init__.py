"""BranchyNet models: the container, the paper's networks, exits on your own backbone."""

from .branchynet import BackboneOnly, BranchyNet, default_branch, from_sequential, from_stages
from .lenet import b_lenet
from .alexnet import b_alexnet
from .resnet import b_resnet110
from .registry import MODELS, build_model
from .attach import attach_exits, auto_branch, conv_branch, linear_branch, pool_linear_branch, token_branch, torchvision_exits  # noqa: E501

__all__ = [
    "BackboneOnly",
    "BranchyNet",
    "MODELS",
    "b_alexnet",
    "b_lenet",
    "b_resnet110",
    "build_model",
    "default_branch",
    "from_sequential",
    "from_stages",
]
__all__ += ["attach_exits", "auto_branch", "conv_branch", "linear_branch", "pool_linear_branch", "token_branch", "torchvision_exits"]  # noqa: E501
