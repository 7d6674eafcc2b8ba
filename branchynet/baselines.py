"""Baselines the engine is measured against.

- :func:`naive_early_exit`: early exit as it is usually written in PyTorch: softmax,
  log, sum, compare, then boolean indexing per exit (each ``h[mask]`` reads the mask
  back to the host, and every step is a separate kernel).
- the backbone without exits: :meth:`BranchyNet.backbone_only`.
- one sample at a time (the paper's regime): :meth:`EarlyExitEngine.per_sample`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .config import check_thresholds
from .engine import ExitResult
from .models.branchynet import BranchyNet

__all__ = ["naive_early_exit"]


@torch.inference_mode()
def naive_early_exit(model: BranchyNet, x: torch.Tensor, thresholds: Sequence[float]) -> ExitResult:
    """Batched early exit with plain PyTorch ops and boolean indexing (entropy criterion).

    Args:
        model: a BranchyNet in eval mode.
        x: [B, ...] input.
        thresholds: N-1 entropy thresholds.

    Returns:
        :class:`~branchynet.ExitResult`, the same answers as the engine.
    """
    thresholds = check_thresholds(thresholds, model.num_exits)
    if model.training:
        raise RuntimeError("the model is in training mode: call model.eval() before inference")
    b = x.shape[0]
    idx = torch.arange(b, device=x.device)
    n_exits = model.num_exits
    out_logits = out_pred = out_exit = out_ent = None
    counts = [0] * n_exits
    h = x
    for n, (stage, branch) in enumerate(zip(model.stages, model.branches)):
        h = stage(h)
        z = branch(h)
        if out_logits is None:
            out_logits = z.new_empty(b, z.shape[1])
            out_pred = torch.empty(b, dtype=torch.int64, device=x.device)
            out_exit = torch.empty(b, dtype=torch.int64, device=x.device)
            out_ent = torch.empty(b, dtype=torch.float32, device=x.device)
        p = torch.softmax(z.float(), dim=1)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=1)
        if n == n_exits - 1:
            mask = torch.ones_like(ent, dtype=torch.bool)
        else:
            mask = ent < thresholds[n]
        rows = idx[mask]
        out_logits[rows] = z[mask]
        out_pred[rows] = z[mask].argmax(dim=1)
        out_exit[rows] = n
        out_ent[rows] = ent[mask]
        counts[n] = int(rows.numel())
        keep = ~mask
        h, idx = h[keep], idx[keep]
        if idx.numel() == 0:
            break
    return ExitResult(out_logits, out_pred, out_exit, out_ent, counts)
