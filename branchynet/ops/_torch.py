"""The exit op in pure PyTorch: CPU fallback and the oracle of every kernel.

Vectorised. On a GPU it is free of host syncs: the survivors are ordered by a stable
sort of the exit mask instead of ``nonzero`` (which would read the count back to the
host), so this path too costs the engine only its one count read-back per exit. On the
CPU, where there is no device to wait for, it indexes the leaving rows directly, and a
few rows (the one-sample regime of the paper) go through plain Python floats instead:
~25 PyTorch ops at 1.5-4 us of fixed cost each would cost more than a B-LeNet stage.
Survivors keep their input order in all three.

Criterion 3 is PABEE's patience: no score, a per-row streak kept in ``patience_state``
([B, 2] int64 by original row: previous exit's prediction, streak), read and written here.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from ..config import PATIENCE_ID
from ..exits import _scores

# Rows x classes up to which the CPU path computes in Python floats. CPU time per call,
# 2-core VM, torch 2.13: K = 1, C = 10: 6-10 us against 40 us for the vectorised form;
# K = 8 (80 logits): 16-22 us against 39 us; the Python loop grows with K x C and meets
# the vectorised form's fixed cost near 200 logits.
SCALAR_MAX_ELEMENTS = 128
_INF = math.inf
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


_F32 = struct.Struct("f")


def _f32(x: float) -> float:
    """Round a double to float32, as ``tensor.float()`` does (nearest even)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # past FLT_MAX (only a threshold can be): +-inf in float32 too
        return x


def _row_scores(z: list, cid: int):
    """``(score, entropy, pred)`` of one row of logits, in float64 as the reference does.

    The reference is :func:`branchynet.exits._scores`; this is the same arithmetic on
    Python floats (sums in another order: the last bit of a float64 may differ, which
    rounding to float32 removes but for ties on a float32 boundary).
    """
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    if s != s:
        # A NaN or +inf logit (or every logit -inf) makes the softmax sum NaN, whatever
        # max() made of the NaN; pred treats NaN as +inf, first index on ties.
        w = [_INF if v != v else v for v in z]
        return math.nan, math.nan, w.index(max(w))
    # 0 * -inf is 0 here (skipped), as nan_to_num makes it in the reference.
    ed = sum([a * (v - m) for a, v in zip(e, z) if a])
    h = math.log(s) - ed / s
    if h < 0.0:
        h = 0.0
    pred = z.index(m)  # no NaN here: the first maximal logit
    if cid == 0:
        return h, h, pred
    if cid == 1:
        return 1.0 - max(e) / s, h, pred
    top = sorted(e, reverse=True)
    second = top[1] / s if len(top) > 1 else 0.0
    return 1.0 - (top[0] / s - second), h, pred


def _exit_step_scalar(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                      criterion=0, last=False, patience_state=None):
    """The CPU exit op for a few rows, in Python floats; same contract and answers."""
    f64 = logits.dtype == torch.float64
    rnd = (lambda x: x) if f64 else _f32
    thr = rnd(float(threshold))
    zs = logits.tolist()
    rs = rows.tolist()
    patience = criterion == PATIENCE_ID
    if patience:
        state = patience_state.numpy()
    stay, go, go_h, go_pred = [], [], [], []
    for i, z in enumerate(zs):
        score, h, pred = _row_scores(z, 0 if patience else criterion)
        if patience:
            r = rs[i]
            streak = int(state[r, 1]) + 1 if exit_index and int(state[r, 0]) == pred else 0
            state[r, 0], state[r, 1] = pred, streak
            leave = last or (streak >= threshold and h == h)
        else:
            leave = last or rnd(score) < thr
        if leave:
            go.append(i)
            go_h.append(rnd(h))
            go_pred.append(pred)
        else:
            stay.append(i)
    if go:
        dst = [rs[i] for i in go]
        if out_pred.requires_grad or out_entropy.requires_grad:
            raise RuntimeError("exit_step: the output buffers must not require grad")
        # numpy views write single elements for ~0.1 us instead of ~5 us a tensor index.
        p, e, h = out_pred.numpy(), out_exit.numpy(), out_entropy.numpy()
        for r, pr, hh in zip(dst, go_pred, go_h):
            p[r] = pr
            e[r] = exit_index
            h[r] = hh
        if (out_logits.dtype in _NUMPY_DTYPES and not out_logits.requires_grad
                and not logits.requires_grad):
            ol, lg = out_logits.numpy(), logits.numpy()
            for r, i in zip(dst, go):
                ol[r] = lg[i]
        else:  # bfloat16 has no numpy dtype
            out_logits.index_copy_(0, _long(dst), logits.index_select(0, _long(go)))
    order = stay + go
    # One numpy array, three tensors on it: torch.tensor(list) costs ~10 us a call.
    k = len(order)
    out = torch.from_numpy(np.array(order + [rs[i] for i in order] + [len(stay)], dtype=np.int64))
    return out[:k], out[k:2 * k], out[2 * k:]


def _long(values: list) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))


def exit_step_torch(
    logits: torch.Tensor,
    rows: torch.Tensor,
    threshold: float,
    exit_index: int,
    out_logits: torch.Tensor,
    out_pred: torch.Tensor,
    out_exit: torch.Tensor,
    out_entropy: torch.Tensor,
    criterion: int = 0,
    last: bool = False,
    patience_state: torch.Tensor | None = None,
):
    """See :func:`branchynet.ops.exit_step` for the contract (criterion as its id)."""
    if criterion not in (0, 1, 2, PATIENCE_ID):
        raise ValueError(f"exit_step: criterion must be 0, 1, 2 or 3, got {criterion}")
    if (patience_state is not None) != (criterion == PATIENCE_ID):
        raise ValueError("exit_step: patience_state is given exactly with criterion 3 (patience)")
    args = (logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy, criterion, last,
            patience_state)
    if logits.device.type == "cpu" and logits.shape[0] * logits.shape[1] <= SCALAR_MAX_ELEMENTS:
        return _exit_step_scalar(*args)
    return _exit_step_vectorized(*args)


def _exit_step_vectorized(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                          criterion=0, last=False, patience_state=None):
    """The exit op as PyTorch ops over the whole batch, on any device."""
    k = logits.shape[0]
    patience = criterion == PATIENCE_ID
    score, h, pred = _scores(logits, 0 if patience else criterion)
    if patience:
        streak = _patience_streak(patience_state, rows, pred, exit_index)
    if last:
        leave = torch.ones(k, dtype=torch.bool, device=logits.device)
    elif patience:
        leave = (streak >= threshold) & ~torch.isnan(h)  # a NaN row never leaves early
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
        return order, rows.index_select(0, order), _long([n_stay])
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


def _patience_streak(state: torch.Tensor, rows: torch.Tensor, pred: torch.Tensor, exit_index: int):
    """PABEE's streak of each row at this exit, written back with the prediction at
    every row of the call: ``cnt = cnt_prev + 1`` where the prediction equals the
    previous exit's, else 0, and 0 at the first exit (whose state is not read)."""
    if exit_index == 0:
        streak = torch.zeros_like(pred)
    else:
        prev = state.index_select(0, rows)
        streak = torch.where(pred == prev[:, 0], prev[:, 1] + 1, 0)
    state.index_copy_(0, rows, torch.stack([pred, streak], 1))
    return streak


def gather_rows_torch(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``features[index]`` along dim 0, keeping channels_last where the input has it."""
    out = features.index_select(0, index)
    if features.dim() == 4 and features.is_contiguous(memory_format=torch.channels_last) \
            and not features.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out
