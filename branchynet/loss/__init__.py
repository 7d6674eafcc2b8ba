"""The joint loss: the weighted sum of every exit's cross-entropy."""

from __future__ import annotations

import math
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
    distill: float = 0.0,
    temperature: float = 3.0,
    teacher: torch.Tensor | None = None,
):
    """``L = sum_n w_n * CE(z_n, y)`` over all exits (the paper's training objective).

    With ``distill = a > 0`` every exit but the teacher also learns from the teacher's
    softened prediction (self-distillation as in SDN / BYOT)::

        L_n = (1 - a) * CE(z_n, y) + a * T^2 * KL(softmax(t / T) || softmax(z_n / T))

    where ``t`` is the teacher's logits, detached (the final exit learns from the labels
    only), and ``T^2`` keeps the soft term's gradient on the scale of the hard one's.

    Args:
        outputs: N tensors [B, C], every exit's logits (``BranchyNet.forward``).
        target: [B] int64 class indices.
        weights: N weights >= 0 (default all 1).
        return_per_exit: also return the N unweighted per-exit losses (detached).
        distill: the soft term's share ``a`` in [0, 1]; 0 is the paper's loss.
        temperature: ``T`` > 0 of the softened distributions.
        teacher: [B, C] the teacher's logits (default ``outputs[-1]``, the final exit);
            an entry of ``outputs`` that is this very tensor keeps the plain CE.

    Returns:
        The scalar loss, or ``(loss, [N] per-exit losses L_n)``.
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
    if not (0.0 <= distill <= 1.0):
        raise ValueError(f"distill must be in [0, 1], got {distill}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    losses = [F.cross_entropy(z.float(), target) for z in outputs]
    if distill > 0:
        teacher = outputs[-1] if teacher is None else teacher
        if not isinstance(teacher, torch.Tensor) or teacher.shape != outputs[0].shape:
            got = tuple(teacher.shape) if isinstance(teacher, torch.Tensor) else type(teacher).__name__
            raise ValueError(f"teacher must be logits of shape {tuple(outputs[0].shape)}, got {got}")
        soft = F.log_softmax(teacher.detach().float() / temperature, dim=1)
        losses = [
            ce if z is teacher else (1.0 - distill) * ce + distill * temperature**2 * F.kl_div(
                F.log_softmax(z.float() / temperature, dim=1), soft, reduction="batchmean",
                log_target=True)
            for z, ce in zip(outputs, losses)
        ]
    total = sum(w * l for w, l in zip(weights, losses))
    if return_per_exit:
        return total, torch.stack([l.detach() for l in losses])
    return total
