"""B-ResNet: the authors' ResNet-110 for CIFAR-10 with two side branches (3 exits)."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from ..blocks import (BasicBlock, basic_blocks, chainer_init_, chainer_lrn, check_num_classes,
                      conv_bn_relu, conv_out, conv_relu, linear_head, max_pool, pool_out)
from ..config import ExitConfig
from .branchynet import BranchyNet

__all__ = ["b_resnet110"]

_SIZE = 32
_N = 18  # blocks per group: 6n + 2 = 110 layers


def b_resnet110(num_classes: int = 10, exit_config: ExitConfig | None = None) -> BranchyNet:
    """B-ResNet-110 for 32x32 RGB images, built block for block from the authors' code.

    Source: ``networks/resnet_cifar10.py`` and ``branchynet/links/resnet.py`` (``ResBlock``)
    of kunglab/branchynet. Every block is a :class:`~branchynet.blocks.BasicBlock` (two 3x3
    conv-BN, parameter-free zero-padding shortcut).

    Main network (exit 2)::

        conv 3->16 3x3 pad 0 -> BN -> ReLU                [B, 16, 30, 30]
        1 block 16->16                                    [B, 16, 30, 30]  end of stage 0
        18 blocks 16->16                                  [B, 16, 30, 30]  end of stage 1
        18 blocks 16->32 (first stride 2)                 [B, 32, 15, 15]
        18 blocks 32->64 (first stride 2)                 [B, 64, 8, 8]
        avgpool 6x6 stride 1                              [B, 64, 3, 3]    end of stage 2
        flatten [B, 576] -> Linear(576, C)                                 final classifier

    Exit 0 (reads [B, 16, 30, 30])::

        LRN -> conv 16->32 3x3 -> ReLU -> conv 32->32 3x3 -> ReLU -> maxpool 3/2 [B, 32, 15, 15]
        -> flatten [B, 7200] -> Linear(7200, 3600) -> Linear(3600, C)

    Exit 1 (reads [B, 16, 30, 30])::

        1 block 16->16 -> flatten [B, 14400] -> Linear(14400, C)

    Differences from the paper (and from He et al.'s ResNet-110), following the code:

    - The main network has **55** blocks, not 54: the first 16-channel group has 19 (one
      block before branch 0, then 18), so the backbone has 1 + 110 + 1 = 112 weight layers.
    - The first convolution has no padding (32 -> 30), and the network ends with a 6x6
      stride-1 average pool and ``Linear(576, C)`` instead of a global average pool.
    - Exit 0's head is two linear layers with no nonlinearity between them (the
      authors' ``cap2``); at 7200 x 3600 it holds ~26M of the model's ~28M parameters.
    - The authors' branch 0 starts with a ReLU; it is left out here because it reads a
      block's output, which already went through a ReLU (the ReLU would be an identity).
    - Convolutions that feed a BatchNorm have no bias (the authors' have one, which the
      BatchNorm cancels); BatchNorm eps is Chainer's 2e-5. Weights are initialised as
      Chainer 1.x does, with the authors' ``wscale=sqrt(2)`` for the stem and the blocks
      (:func:`~branchynet.blocks.chainer_init_`).

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

    s0 = conv_out(_SIZE, 3, 1, 0)                      # 30
    b0 = pool_out(s0, 3, 2)                            # 15
    s2 = conv_out(conv_out(s0, 3, 2, 1), 3, 2, 1)      # 30 -> 15 -> 8
    s2 = conv_out(s2, 6, 1, 0)                         # 3
    b0_features = 32 * b0 * b0

    stage0 = nn.Sequential(OrderedDict(
        stem=conv_bn_relu(3, 16, 3, 1, 0),
        block1=BasicBlock(16, 16),
    ))
    branch0 = nn.Sequential(OrderedDict(
        lrn=chainer_lrn(),
        conv1=conv_relu(16, 32, 3, 1, 1),
        conv2=conv_relu(32, 32, 3, 1, 1),
        pool=max_pool(3, 2),
        head=linear_head(b0_features, num_classes, hidden_features=b0_features // 2),
    ))
    stage1 = nn.Sequential(OrderedDict(group1=basic_blocks(16, 16, _N)))
    branch1 = nn.Sequential(OrderedDict(
        block=BasicBlock(16, 16),
        head=linear_head(16 * s0 * s0, num_classes),
    ))
    stage2 = nn.Sequential(OrderedDict(
        group2=basic_blocks(16, 32, _N, stride=2),
        group3=basic_blocks(32, 64, _N, stride=2),
        pool=nn.AvgPool2d(6, stride=1),
    ))
    branch2 = linear_head(64 * s2 * s2, num_classes)

    model = BranchyNet(
        stages=[stage0, stage1, stage2],
        branches=[branch0, branch1, branch2],
        exit_config=exit_config,
        input_shape=(3, _SIZE, _SIZE),
        num_classes=num_classes,
        arch={"name": "b_resnet110", "kwargs": {"num_classes": num_classes}},
    )
    chainer_init_(model)
    chainer_init_(stage0.stem, wscale=math.sqrt(2))
    for m in model.modules():
        if isinstance(m, BasicBlock):
            chainer_init_(m, wscale=math.sqrt(2))
    return model
