"""PABEE's patience rule (Zhou et al. 2020) in the engine.

Exit n's streak is ``cnt_n = cnt_{n-1} + 1`` when its prediction equals exit n-1's, else
0 (``cnt_0 = 0``); a sample leaves at the first side exit with ``cnt_n >= P``, the last
exit takes the rest. Unlike the score criteria the decision needs each row's previous
prediction and streak: the exit op keeps them itself (criterion ``"patience"`` of
:func:`branchynet.ops.exit_step`, on every backend) in a [B, 2] state indexed by
original row, like its output buffers, so the state needs no gather when the survivors
are compacted and the engine runs the same loop (eager, compiled or bucketed) as for the
other criteria, with P as every side exit's threshold.
"""

from __future__ import annotations

__all__ = ["check_patience", "exit_rule"]


def check_patience(patience) -> int:
    """``patience`` as an int >= 1, or a clear error."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1 (agreeing exits in a row before a sample "
                         f"leaves), got {patience!r}")
    return patience


def exit_rule(patience: int | None) -> dict:
    """The engine's keyword arguments for a command's ``--patience``: none (the
    checkpoint's thresholds) when it is not given, else the patience criterion with P."""
    return {} if patience is None else {"criterion": "patience", "patience": patience}
