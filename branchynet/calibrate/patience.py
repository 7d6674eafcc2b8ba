"""Choosing PABEE's patience P from the score table's cached predictions.

The patience rule needs only every exit's prediction, which the score table
(:class:`~branchynet.calibrate.exit_table.ExitTable`) already holds, so every P is scored
from one pass over the data, exactly as the engine decides
(:mod:`branchynet.patience`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .exit_table import ExitTable

__all__ = ["PatienceChoice", "choose_patience", "patience_exits"]


def patience_exits(pred: torch.Tensor, patience: int, score: torch.Tensor | None = None) -> torch.Tensor:
    """The exit each sample takes under the patience rule.

    Args:
        pred: [N, M] every exit's prediction for M samples.
        patience: P >= 1.
        score: [N, M] every exit's score (any criterion's): where it is NaN (the exit's
            logits hold a NaN or +inf) the sample does not leave there, as in the op.

    Returns:
        [M] int64 exit indices (0-based).
    """
    n_exits, m = pred.shape
    exit_at = torch.full((m,), n_exits - 1, dtype=torch.int64)
    left = torch.zeros(m, dtype=torch.bool)
    streak = torch.zeros(m, dtype=torch.int64)
    for n in range(1, n_exits - 1):
        streak = torch.where(pred[n] == pred[n - 1], streak + 1, 0)
        now = (streak >= patience) & ~left
        if score is not None:
            now &= ~torch.isnan(score[n])
        exit_at[now] = n
        left |= now
    return exit_at


@dataclass
class PatienceChoice:
    """The chosen P and what every P tried gives on the table's data.

    Attributes:
        patience: the chosen P.
        accuracy: its accuracy.
        exit_fractions: its fraction of samples per exit.
        table: per P tried, ``(P, accuracy, mean cost, exit fractions)``.
    """

    patience: int
    accuracy: float
    exit_fractions: list
    table: list


def choose_patience(table: ExitTable, *, max_drop: float = 0.01, costs=None) -> PatienceChoice:
    """The cheapest P whose accuracy is within ``max_drop`` of the final exit's.

    Args:
        table: every exit's predictions and the labels (``collect_exit_outputs``).
        max_drop: accuracy the early exits may cost, against the final exit alone.
        costs: N costs of reaching each exit (e.g. FLOPs of the path); default the
            number of stages run, ``1 .. N``.

    Raises:
        ValueError: fewer than 3 exits (P needs two side exits to compare), a negative
            ``max_drop``, ``costs`` of the wrong length.
    """
    n_exits = table.num_exits
    if n_exits < 3:
        raise ValueError(f"the patience rule needs at least 2 side exits; the model has {n_exits} exits")
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    costs = list(range(1, n_exits + 1)) if costs is None else [float(c) for c in costs]
    if len(costs) != n_exits:
        raise ValueError(f"costs: expected {n_exits} values (one per exit), got {len(costs)}")
    m = table.target.shape[0]
    floor = float((table.pred[-1] == table.target).float().mean()) - max_drop
    rows = []
    for p in range(1, n_exits - 1):
        exits = patience_exits(table.pred, p, table.score)
        got = table.pred[exits, torch.arange(m)]
        acc = float((got == table.target).float().mean())
        counts = torch.bincount(exits, minlength=n_exits)
        cost = float(sum(costs[n] * int(c) for n, c in enumerate(counts)) / max(m, 1))
        rows.append((p, acc, cost, (counts.double() / max(m, 1)).tolist()))
    ok = [r for r in rows if r[1] >= floor] or [max(rows, key=lambda r: r[1])]
    best = min(ok, key=lambda r: (r[2], r[0]))
    return PatienceChoice(best[0], best[1], best[3], rows)
