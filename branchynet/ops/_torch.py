"""The exit op in pure PyTorch: CPU fallback and the oracle of every kernel.

Vectorised. On a GPU it is free of host syncs: the survivors are ordered by a stable
sort of the exit mask instead of ``nonzero`` (which would read the count back to the
host), so this path too costs the engine only its one count read-back per exit. On the
CPU, where there is no device to wait for, it indexes the leaving rows directly.
Survivors keep their input order in both.
"""

from __future__ import annotations

import torch

from ..exits import _scores


def exit_step_torch(
    logits: torch.Tensor,
    rows: torch.Tensor,
    threshold: float,
    criterion: int,
    exit_index: int,
    last: bool,
    out_logits: torch.Tensor,
    out_pred: torch.Tensor,
    out_exit: torch.Tensor,
    out_entropy: torch.Tensor,
):
    """See :func:`branchynet.ops.exit_step` for the contract."""
    k = logits.shape[0]
    score, h, pred = _scores(logits, criterion)
    if last:
        leave = torch.ones(k, dtype=torch.bool, device=logits.device)
    else:
        leave = score < threshold
    if logits.device.type == "cpu":
        # On the CPU a host-side count costs nothing to wait for, so only the leaving rows
        # are indexed, with the index_* methods (half the time of the sync-free form
        # below at B = 1, where this op's fixed cost is a tenth of a B-LeNet sample).
        order = torch.argsort(leave.to(torch.int8), stable=True)  # stayers first
        n_stay = k - int(leave.sum())
        go = order[n_stay:]
        dst = rows.index_select(0, go)
        out_logits.index_copy_(0, dst, logits.index_select(0, go).to(out_logits.dtype))
        out_pred.index_copy_(0, dst, pred.index_select(0, go))
        out_exit.index_fill_(0, dst, exit_index)
        out_entropy.index_copy_(0, dst, h.index_select(0, go).float())
        return order, rows.index_select(0, order), torch.tensor([n_stay], dtype=torch.int64)
    if k:
        keep = leave.unsqueeze(1)
        # Rows are unique, so this read-modify-write touches each output row once;
        # rows that stay keep whatever the buffer held.
        out_logits[rows] = torch.where(keep, logits.to(out_logits.dtype), out_logits[rows])
        out_pred[rows] = torch.where(leave, pred, out_pred[rows])
        out_exit[rows] = torch.where(leave, torch.full_like(pred, exit_index), out_exit[rows])
        out_entropy[rows] = torch.where(leave, h.float(), out_entropy[rows])
    # Stable: survivors keep their relative order (False sorts before True).
    order = torch.argsort(leave.to(torch.int8), stable=True)
    count = (~leave).sum().reshape(1).to(torch.int64)
    return order, rows[order], count


def gather_rows_torch(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``features[index]`` along dim 0, keeping channels_last where the input has it."""
    out = features.index_select(0, index)
    if features.dim() == 4 and features.is_contiguous(memory_format=torch.channels_last) \
            and not features.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
