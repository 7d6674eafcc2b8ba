"""Weight initialisation as the authors' Chainer 1.x code gets it."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["chainer_init_"]


@torch.no_grad()
def chainer_init_(module: nn.Module, wscale: float = 1.0) -> nn.Module:
    """Initialise every ``Conv2d`` / ``Linear`` in ``module`` like Chainer 1.x does.

    Chainer 1.x draws weights from ``N(0, sqrt(wscale / fan_in))`` (its ``wscale`` scales
    the *variance*: the std is ``sqrt(wscale)`` times LeCun normal) and zeros the biases.
    The authors pass ``wscale=sqrt(2)`` for their ResNet convolutions and leave it at 1
    elsewhere. BatchNorm keeps weight 1, bias 0.

    Returns:
        ``module``, initialised in place.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            m.weight.normal_(0.0, math.sqrt(wscale / fan_in))
            if m.bias is not None:
                m.bias.zero_()
    return module
