"""Max pooling with Chainer's output size (``cover_all=True``, i.e. ceil mode)."""

from __future__ import annotations

from torch import nn

__all__ = ["max_pool"]


def max_pool(kernel_size: int, stride: int) -> nn.MaxPool2d:
    """``MaxPool2d`` in ceil mode.

    Chainer's ``F.max_pooling_2d`` defaults to ``cover_all=True``, which rounds the output
    size up: the authors' classifier widths depend on it (B-LeNet's branch pools 15x15 to
    8x8, giving their ``Linear(640, 10)``; floor mode would give 7x7 = 490).

    Shapes:
        [B, C, H, W] -> [B, C, ceil((H - k) / s) + 1, ceil((W - k) / s) + 1].
    """
    return nn.MaxPool2d(kernel_size, stride, ceil_mode=True)
