"""ResNet basic block for CIFAR (He et al. 2016, option A shortcut) and a stack of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv import BN_EPS

__all__ = ["BasicBlock", "basic_blocks"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions.

    The shortcut is parameter-free (option A), as in the authors' ``ResBlock``
    (``branchynet/links/resnet.py``): when the shape changes, zero channels are
    concatenated in *front* of ``x`` and ``x`` is subsampled with stride ``stride``
    (their ``average_pooling_2d(x, 1, 2)``, a 1x1 window, is a plain subsample).

    Args:
        in_channels: C_in.
        out_channels: C_out >= C_in.
        stride: stride of the first convolution (1 or 2).
        eps: BatchNorm eps (Chainer's 2e-5 by default).

    Shapes:
        [B, C_in, H, W] -> [B, C_out, floor((H - 1) / stride) + 1, floor((W - 1) / stride) + 1].
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 eps: float = BN_EPS) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels ({out_channels}) must be >= in_channels ({in_channels}): "
                f"the option A shortcut can only pad channels"
            )
        # No conv biases: each conv feeds a BatchNorm, which subtracts them again.
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=eps)
        self.pad_channels = out_channels - in_channels
        self.stride = stride

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad_channels:
            x = F.pad(x, (0, 0, 0, 0, self.pad_channels, 0))
        if self.stride != 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)), inplace=True)
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x), inplace=True)


def basic_blocks(in_channels: int, out_channels: int, num_blocks: int,
                 stride: int = 1) -> nn.Sequential:
    """``num_blocks`` :class:`BasicBlock` s; the first maps ``in_channels`` with ``stride``.

    Shapes:
        [B, in_channels, H, W] -> [B, out_channels, H', W'],
        ``H' = floor((H - 1) / stride) + 1``.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    return nn.Sequential(*[
        BasicBlock(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
        for i in range(num_blocks)
    ])
