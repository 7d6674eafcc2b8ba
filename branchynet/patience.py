"""PABEE's patience rule (Zhou et al. 2020) as a region of the engine's loop.

Exit n's streak is ``cnt_n = cnt_{n-1} + 1`` when its prediction equals exit n-1's, else
0 (``cnt_0 = 0``); a sample leaves at the first side exit with ``cnt_n >= P``, the last
exit takes the rest. Unlike the score criteria the decision needs each row's previous
prediction and streak, so they ride with the features through compaction: the state
between patience regions is ``(h, pred [K], streak [K])``, gathered like any state of
several tensors. The leaving rows are written by the exit op itself (as a last exit on
those rows), so logits, prediction and entropy are exactly what the other criteria write.
"""

from __future__ import annotations

import torch

from .ops._backends import new_outputs

__all__ = ["check_patience", "patience_region"]


def check_patience(patience) -> int:
    """``patience`` as an int >= 1, or a clear error."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1 (agreeing exits in a row before a sample "
                         f"leaves), got {patience!r}")
    return patience


def patience_region(n: int, stage, branch, step, patience: int, cid: int, last: bool):
    """Region n under the patience rule: ``(state, rows, out) -> (state, (survivors,
    survivor_rows, count))`` as the engine's other regions, with ``state = (h, pred,
    streak)`` after the first exit.

    Args:
        n: the exit's index; stage, branch: its modules.
        step: the bound exit op's step (writes the leaving rows at their original rows).
        patience: P.
        cid: the criterion id whose score fills the entropy output (entropy).
        last: the final exit, which takes every row left.
    """
    def region(h, rows, out):
        if n:
            h, prev, streak = h
        h = stage(h)
        z = branch(h)
        if not out:
            if z.dim() != 2:
                raise ValueError(f"every branch must return logits [B, C], got shape {tuple(z.shape)}")
            out += new_outputs(rows.shape[0], z.shape[1], z.dtype, z.device)
        if last:
            return h, step(z, rows, 0.0, n, out, cid, True)
        pred = z.argmax(1)
        streak = torch.zeros_like(pred) if n == 0 else torch.where(pred == prev, streak + 1, 0)
        leave = streak >= patience
        gone = leave.nonzero().squeeze(1)
        if gone.numel():
            # The op as a last exit on the leaving rows only: it writes them all.
            step(z.index_select(0, gone), rows.index_select(0, gone), 0.0, n, out, cid, True)
        stay = leave.logical_not().nonzero().squeeze(1)
        return (h, pred, streak), (stay, rows.index_select(0, stay), stay.shape[0])
    return region
