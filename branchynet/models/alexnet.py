"""B-AlexNet: the authors' AlexNet-style CIFAR-10 network with two side branches (3 exits)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..blocks import (chainer_init_, chainer_lrn, check_num_classes, conv_out, conv_relu,
                      linear_head, max_pool, pool_out)
from ..config import ExitConfig
from .branchynet import BranchyNet

__all__ = ["b_alexnet"]

_SIZE = 32


def b_alexnet(num_classes: int = 10, exit_config: ExitConfig | None = None) -> BranchyNet:
    """B-AlexNet for 32x32 RGB images, built layer for layer from the authors' code.

    Source: ``networks/alex_cifar10.py`` of kunglab/branchynet (``gen_2b`` with
    ``branch1 = norm() + conv(64) + conv(32) + cap(512)``,
    ``branch2 = norm() + conv(96) + cap(128)``). ``LRN`` is Chainer's
    ``local_response_normalization(n=3, alpha=5e-5, beta=0.75, k=2)``
    (:func:`~branchynet.blocks.chainer_lrn`); max pooling rounds up as Chainer's does.

    Main network (exit 2); the side branches read the conv2 and conv3 outputs *before*
    their ReLU::

        conv1 3->32 5x5 pad 2 -> ReLU -> maxpool 3/2 -> LRN        [B, 32, 16, 16]
        conv2 32->64 5x5 pad 2                                     [B, 64, 16, 16]  end of stage 0
        ReLU -> maxpool 3/2 -> LRN -> conv3 64->96 3x3 pad 1       [B, 96, 8, 8]    end of stage 1
        ReLU -> conv4 96->96 3x3 -> ReLU -> conv5 96->64 3x3 -> ReLU -> maxpool 3/2  [B, 64, 4, 4]
        flatten [B, 1024] -> Linear(1024, 256) -> ReLU -> Dropout(0.5)
        -> Linear(256, 128) -> ReLU -> Dropout(0.5)                [B, 128]         end of stage 2
        Linear(128, C)                                                              final classifier

    Exit 0 (reads [B, 64, 16, 16])::

        ReLU -> maxpool 3/2 -> LRN -> conv 64->32 3x3 -> ReLU -> conv 32->32 3x3 -> ReLU
        -> maxpool 3/2 [B, 32, 4, 4] -> flatten [B, 512] -> Linear(512, C)

    Exit 1 (reads [B, 96, 8, 8])::

        ReLU -> maxpool 3/2 -> LRN -> conv 96->32 3x3 -> ReLU -> maxpool 3/2 [B, 32, 2, 2]
        -> flatten [B, 128] -> Linear(128, C)

    Differences from the paper, following the code: the paper gives no layer lists; in
    the code the branches read the outputs of the second and third convolution layers
    (conv2, conv3), and the network is a 5-conv, 3-FC CIFAR AlexNet of 32/64/96/96/64
    channels, far smaller than ImageNet AlexNet. The authors' dropout
    is a train-only switch layer, i.e. ``nn.Dropout(0.5)``. Weights are initialised as
    Chainer 1.x does (:func:`~branchynet.blocks.chainer_init_`).

    Args:
        num_classes: C, an int >= 2.
        exit_config: thresholds / loss weights for the 3 exits (default: ExitConfig(3)).

    Returns:
        A :class:`BranchyNet` with 3 exits; ``input_shape = (3, 32, 32)``.

    Shapes:
        [B, 3, 32, 32] -> 3 x [B, C].

    Raises:
        ValueError: ``num_classes`` is not an int >= 2.
    """
    check_num_classes(num_classes)

    s0 = pool_out(conv_out(_SIZE, 5, 1, 2), 3, 2)   # 32 -> 16
    s0 = conv_out(s0, 5, 1, 2)                      # 16
    b0 = pool_out(pool_out(s0, 3, 2), 3, 2)         # 16 -> 8 -> 4 (3x3 convs keep 8)
    s1 = conv_out(pool_out(s0, 3, 2), 3, 1, 1)      # 8
    b1 = pool_out(pool_out(s1, 3, 2), 3, 2)         # 8 -> 4 -> 2
    s2 = pool_out(s1, 3, 2)                         # 8 -> 4 (3x3 convs keep 8)

    stage0 = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(3, 32, 5, 1, 2),
        relu1=nn.ReLU(),
        pool1=max_pool(3, 2),
        lrn1=chainer_lrn(),
        conv2=nn.Conv2d(32, 64, 5, 1, 2),
    ))
    branch0 = nn.Sequential(OrderedDict(
        relu=nn.ReLU(),
        pool1=max_pool(3, 2),
        lrn=chainer_lrn(),
        conv1=conv_relu(64, 32, 3, 1, 1),
        conv2=conv_relu(32, 32, 3, 1, 1),
        pool2=max_pool(3, 2),
        head=linear_head(32 * b0 * b0, num_classes),
    ))
    stage1 = nn.Sequential(OrderedDict(
        relu2=nn.ReLU(),
        pool2=max_pool(3, 2),
        lrn2=chainer_lrn(),
        conv3=nn.Conv2d(64, 96, 3, 1, 1),
    ))
    branch1 = nn.Sequential(OrderedDict(
        relu=nn.ReLU(),
        pool1=max_pool(3, 2),
        lrn=chainer_lrn(),
        conv1=conv_relu(96, 32, 3, 1, 1),
        pool2=max_pool(3, 2),
        head=linear_head(32 * b1 * b1, num_classes),
    ))
    stage2 = nn.Sequential(OrderedDict(
        relu3=nn.ReLU(),
        conv4=conv_relu(96, 96, 3, 1, 1),
        conv5=conv_relu(96, 64, 3, 1, 1),
        pool5=max_pool(3, 2),
        flatten=nn.Flatten(),
        fc6=nn.Linear(64 * s2 * s2, 256),
        relu6=nn.ReLU(inplace=True),
        drop6=nn.Dropout(0.5),
        fc7=nn.Linear(256, 128),
        relu7=nn.ReLU(inplace=True),
        drop7=nn.Dropout(0.5),
    ))
    branch2 = linear_head(128, num_classes)

    model = BranchyNet(
        stages=[stage0, stage1, stage2],
        branches=[branch0, branch1, branch2],
        exit_config=exit_config,
        input_shape=(3, _SIZE, _SIZE),
        num_classes=num_classes,
        arch={"name": "b_alexnet", "kwargs": {"num_classes": num_classes}},
    )
    return chainer_init_(model)
