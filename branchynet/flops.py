"""FLOPs of every stage and branch, counted from the modules, and the ideal speedup.

Counting uses :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the
matmul and convolution FLOPs (2 per multiply-add) of the aten ops a forward pass
actually runs; elementwise ops (ReLU, BN in eval, pooling) are not counted, and they
are a small share for the paper's networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models.branchynet import BranchyNet

__all__ = ["FlopProfile", "count_flops", "profile_flops"]


def count_flops(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward call of ``module`` on ``inputs``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return int(counter.get_total_flops())


@dataclass
class FlopProfile:
    """Per-sample FLOPs of each stage and each branch of a BranchyNet.

    Attributes:
        stage: N per-sample FLOPs, stage n.
        branch: N per-sample FLOPs, branch n (the last is the final classifier).
    """

    stage: list
    branch: list

    @property
    def num_exits(self) -> int:
        return len(self.stage)

    def path(self, n: int) -> float:
        """Cost of a sample that leaves at exit n: stages 0..n and every branch on the way."""
        return float(sum(self.stage[: n + 1]) + sum(self.branch[: n + 1]))

    @property
    def backbone(self) -> float:
        """Cost of the network without side branches: every stage + the final classifier."""
        return float(sum(self.stage) + self.branch[-1])

    def expected(self, fractions: Sequence[float]) -> float:
        """Mean per-sample cost for an exit profile ``f_1 .. f_N``.

        Args:
            fractions: N fractions of the samples leaving at each exit, each in [0, 1],
                summing to 1 (to 1e-6: fractions computed from counts round).

        Raises:
            ValueError: wrong length, a fraction outside [0, 1] (or NaN), or a sum other
                than 1: ``[0.5, 0]`` would halve the cost (double the speedup).
        """
        if len(fractions) != self.num_exits:
            raise ValueError(f"fractions: expected {self.num_exits} values, got {len(fractions)}")
        fractions = [float(f) for f in fractions]
        if not all(0.0 <= f <= 1.0 for f in fractions):
            raise ValueError(f"fractions: each must be in [0, 1], got {fractions}")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1 (an exit profile), got {fractions} "
                             f"(sum {sum(fractions):.6g})")
        return float(sum(f * self.path(n) for n, f in enumerate(fractions)))

    def ideal_speedup(self, fractions: Sequence[float]) -> float:
        """cost(backbone without exits) / sum_n f_n cost(path to exit n)."""
        if not sum(fractions) > 0:
            raise ValueError(f"fractions must sum to 1 (an exit profile), got {list(fractions)}")
        return self.backbone / self.expected(fractions)


def profile_flops(model: BranchyNet, example: torch.Tensor | None = None) -> FlopProfile:
    """Count the per-sample FLOPs of every stage and branch of ``model``.

    Args:
        model: a BranchyNet.
        example: one input [1, ...]; default zeros of ``model.input_shape``.
    """
    if example is None:
        if model.input_shape is None:
            raise ValueError("model.input_shape is unknown: pass example= (one input [1, ...])")
        p = next(model.parameters())
        example = torch.zeros((1, *model.input_shape), device=p.device, dtype=p.dtype)
    if example.shape[0] != 1:
        raise ValueError(f"example must hold one sample [1, ...], got {tuple(example.shape)}")
    was_training = model.training
    model.eval()
    stage, branch = [], []
    h = example
    try:
        for s, b in zip(model.stages, model.branches):
            stage.append(count_flops(s, h))
            with torch.no_grad():
                h = s(h)
            branch.append(count_flops(b, h))
    finally:
        model.train(was_training)
    return FlopProfile(stage=stage, branch=branch)
