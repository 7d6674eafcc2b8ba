"""One exit as one graph: stage n, its branch and the exit score.

The score is :func:`branchynet.exits._scores`, the reference every exit-op kernel is
tested against, traced into the graph: the softmax sums in float64 and the score,
entropy and prediction follow the engine's float and NaN rules, so a runtime without
this package decides exactly as the engine (``score < threshold`` in the score's dtype).
"""

from __future__ import annotations

import torch
from torch import nn

from ..exits import _scores

__all__ = ["ExitGraph", "flatten_state", "OUTPUTS"]

#: What every exit graph returns after the next stage's state tensors.
OUTPUTS = ("logits", "score", "entropy", "pred")


def flatten_state(h, where: str) -> tuple:
    """A stage's state as a tuple of tensors (one tensor, or a tuple / list of them)."""
    if isinstance(h, torch.Tensor):
        return (h,)
    if isinstance(h, (tuple, list)) and h and all(isinstance(t, torch.Tensor) for t in h):
        return tuple(h)
    raise TypeError(f"{where} must be a tensor or a tuple of tensors to be exported, got {type(h).__name__}")


class ExitGraph(nn.Module):
    """Stage n, branch n and the exit score as one module, for export.

    Args:
        stage, branch: the model's modules (shared, not copied).
        criterion: the criterion id (:func:`branchynet.config.criterion_id`).
        last: the final exit (returns no state: nothing runs after it).
        packed: None when the stage takes one tensor, else the length of the tuple it takes.

    Shapes:
        ``forward(*state)``, each [B, ...] -> ``(*next_state, logits [B, C], score [B],
        entropy [B], pred [B] int64)``; score and entropy are float32 (float64 for float64
        logits).
    """

    def __init__(self, stage: nn.Module, branch: nn.Module, criterion: int, last: bool,
                 packed: int | None) -> None:
        super().__init__()
        self.stage, self.branch = stage, branch
        self.criterion, self.last, self.packed = criterion, last, packed

    def forward(self, *state):
        h = self.stage(state[0] if self.packed is None else tuple(state))
        z = self.branch(h)
        tail = (z, *_scores(z, self.criterion))
        return tail if self.last else (*flatten_state(h, "a stage's output"), *tail)
