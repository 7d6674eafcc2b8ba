"""Convolution blocks: conv -> ReLU and conv -> BatchNorm -> ReLU."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["BN_EPS", "conv_relu", "conv_bn_relu"]

#: Chainer's BatchNormalization default eps (PyTorch's is 1e-5); the authors' ResNet uses it.
BN_EPS = 2e-5


def conv_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
              padding: int = 0) -> nn.Sequential:
    """``Conv2d`` (with bias) then ``ReLU``.

    Shapes:
        [B, in_channels, H, W] -> [B, out_channels, H', W'] with
        ``H' = floor((H + 2 * padding - kernel_size) / stride) + 1``.
    """
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding),
        relu=nn.ReLU(inplace=True),
    ))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, eps: float = BN_EPS) -> nn.Sequential:
    """``Conv2d`` -> ``BatchNorm2d`` -> ``ReLU``; the conv has no bias (the BatchNorm cancels it).

    Shapes:
        [B, in_channels, H, W] -> [B, out_channels, H', W'] as in :func:`conv_relu`.
    """
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False),
        bn=nn.BatchNorm2d(out_channels, eps=eps),
        relu=nn.ReLU(inplace=True),
    ))
