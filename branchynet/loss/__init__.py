"""The joint loss: the weighted sum of every exit's cross-entropy."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import check_weights

__all__ = ["joint_loss"]


def joint_loss(
    outputs: Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    return_per_exit: bool = False,
):
    """``L = sum_n w_n * CE(z_n, y)`` over all exits (the paper's training objective).

    Args:
        outputs: N tensors [B, C], every exit's logits (``BranchyNet.forward``).
        target: [B] int64 class indices.
        weights: N weights >= 0 (default all 1).
        return_per_exit: also return the N unweighted per-exit losses (detached).

    Returns:
        The scalar loss, or ``(loss, [N] per-exit losses)``.
    """
    outputs = list(outputs)
    if not outputs:
        raise ValueError("outputs must hold at least one exit's logits")
    weights = check_weights(weights if weights is not None else [1.0] * len(outputs), len(outputs))
    if not isinstance(target, torch.Tensor) or target.dim() != 1:
        raise ValueError("target must be a [B] tensor of class indices")
    for i, z in enumerate(outputs):
        if z.dim() != 2 or z.shape[0] != target.shape[0]:
            raise ValueError(
                f"outputs[{i}] must have shape [B={target.shape[0]}, C], got {tuple(z.shape)}"
            )
    losses = [F.cross_entropy(z.float(), target) for z in outputs]
    total = sum(w * l for w, l in zip(weights, losses))
    if return_per_exit:
        return total, torch.stack([l.detach() for l in losses])
    return total
