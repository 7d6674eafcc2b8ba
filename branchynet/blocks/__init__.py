"""Reusable layers for the paper's networks: one concept a file, small factories."""

from .conv import BN_EPS, conv_bn_relu, conv_relu
from .head import check_num_classes, linear_head
from .init import chainer_init_
from .norm import chainer_lrn
from .pool import max_pool
from .resnet import BasicBlock, basic_blocks
from .shapes import conv_out, pool_out

__all__ = [
    "BN_EPS",
    "BasicBlock",
    "basic_blocks",
    "chainer_init_",
    "chainer_lrn",
    "check_num_classes",
    "conv_bn_relu",
    "conv_out",
    "conv_relu",
    "linear_head",
    "max_pool",
    "pool_out",
]
