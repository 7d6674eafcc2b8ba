"""Output sizes of convolution and pooling, so classifier widths are computed, not guessed."""

from __future__ import annotations

import math

__all__ = ["conv_out", "pool_out"]


def conv_out(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """Spatial size after a convolution: ``floor((size + 2p - k) / s) + 1``."""
    return (size + 2 * padding - kernel_size) // stride + 1


def pool_out(size: int, kernel_size: int, stride: int, padding: int = 0,
             ceil_mode: bool = True) -> int:
    """Spatial size after pooling, ``ceil_mode=True`` by default as in :func:`max_pool`.

    Matches ``torch.nn.MaxPool2d``, including its rule that the last window must start
    inside the input (or the left padding).
    """
    span = size + 2 * padding - kernel_size
    if not ceil_mode:
        return span // stride + 1
    out = math.ceil(span / stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return out
