"""B-LeNet: the authors' LeNet-style MNIST network with one side branch (2 exits)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..blocks import chainer_init_, check_num_classes, conv_out, linear_head, max_pool, pool_out
from ..config import ExitConfig
from .branchynet import BranchyNet

__all__ = ["b_lenet"]

_SIZE = 28


def b_lenet(num_classes: int = 10, exit_config: ExitConfig | None = None,
            in_channels: int = 1) -> BranchyNet:
    """B-LeNet for 28x28 images, built layer for layer from the authors' code.

    Source: ``networks/lenet_mnist.py`` of kunglab/branchynet. Chainer's max pooling
    rounds up (``cover_all``), hence :func:`~branchynet.blocks.max_pool` in ceil mode; the
    classifier widths below are the authors' (640 and 720 for MNIST).

    Exit 0 (side branch), reads conv1's output [B, 5, 30, 30]::

        maxpool 2/2 -> ReLU -> conv 5->10 3x3 pad 1 -> maxpool 2/2 -> ReLU
        -> flatten [B, 10*8*8 = 640] -> Linear(640, C)

    Exit 1 (the main network)::

        conv1 C_in->5 5x5 pad 3                    [B, 5, 30, 30]    (stage 0)
        maxpool 2/2 -> ReLU -> conv2 5->10 5x5 pad 3  [B, 10, 17, 17]  (stage 1 ...)
        maxpool 2/2 -> ReLU -> conv3 10->20 5x5 pad 3 [B, 20, 11, 11]
        maxpool 2/2 -> ReLU -> flatten [B, 720] -> Linear(720, 84)      (... stage 1)
        Linear(84, C)                                                  (final classifier)

    Differences from the paper, following the code: the paper calls the backbone
    LeNet, but unlike LeNet-5 the code's three convolutions have 5/10/20 channels with padding 3,
    pooling comes before the ReLU, and there is *no* nonlinearity between
    ``Linear(720, 84)`` and ``Linear(84, C)``. Weights are initialised as Chainer 1.x
    does (:func:`~branchynet.blocks.chainer_init_`).

    Args:
        num_classes: C, an int >= 2.
        exit_config: thresholds / loss weights for the 2 exits (default: ExitConfig(2)).
        in_channels: input channels (1 for MNIST).

    Returns:
        A :class:`BranchyNet` with 2 exits; ``input_shape = (in_channels, 28, 28)``.

    Shapes:
        [B, in_channels, 28, 28] -> [[B, C], [B, C]].

    Raises:
        ValueError: ``num_classes`` is not an int >= 2, or ``in_channels`` not an int >= 1.
    """
    check_num_classes(num_classes)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")

    s0 = conv_out(_SIZE, 5, 1, 3)                               # 30
    sb = pool_out(conv_out(pool_out(s0, 2, 2), 3, 1, 1), 2, 2)  # 15 -> 15 -> 8
    s1 = pool_out(s0, 2, 2)                                     # 15
    s1 = pool_out(conv_out(s1, 5, 1, 3), 2, 2)                  # 17 -> 9
    s1 = pool_out(conv_out(s1, 5, 1, 3), 2, 2)                  # 11 -> 6

    stage0 = nn.Sequential(OrderedDict(conv1=nn.Conv2d(in_channels, 5, 5, 1, 3)))
    branch0 = nn.Sequential(OrderedDict(
        pool1=max_pool(2, 2),
        relu1=nn.ReLU(),
        conv=nn.Conv2d(5, 10, 3, 1, 1),
        pool2=max_pool(2, 2),
        relu2=nn.ReLU(),
        head=linear_head(10 * sb * sb, num_classes),
    ))
    stage1 = nn.Sequential(OrderedDict(
        pool1=max_pool(2, 2),
        relu1=nn.ReLU(),
        conv2=nn.Conv2d(5, 10, 5, 1, 3),
        pool2=max_pool(2, 2),
        relu2=nn.ReLU(),
        conv3=nn.Conv2d(10, 20, 5, 1, 3),
        pool3=max_pool(2, 2),
        relu3=nn.ReLU(),
        flatten=nn.Flatten(),
        fc4=nn.Linear(20 * s1 * s1, 84),
    ))
    branch1 = linear_head(84, num_classes)

    model = BranchyNet(
        stages=[stage0, stage1],
        branches=[branch0, branch1],
        exit_config=exit_config,
        input_shape=(in_channels, _SIZE, _SIZE),
        num_classes=num_classes,
        arch={"name": "b_lenet",
              "kwargs": {"num_classes": num_classes, "in_channels": in_channels}},
    )
    return chainer_init_(model)
