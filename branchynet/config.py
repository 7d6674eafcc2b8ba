"""Exit configuration: one validated dataclass for the number of exits, the
thresholds, the joint-loss weights and the exit criterion."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

#: Exit criteria. Every criterion maps an exit's softmax to a *score* where lower
#: means more confident, and a sample leaves at exit ``n`` when ``score < T_n``:
#:
#: - ``"entropy"``: the paper's rule, ``H = -sum_c p_c log p_c`` (natural log).
#: - ``"max_prob"``: ``1 - max_c p_c`` (exit when the top probability exceeds ``1 - T``).
#: - ``"margin"``: ``1 - (p_top1 - p_top2)`` (exit when the top-2 gap exceeds ``1 - T``).
CRITERIA = ("entropy", "max_prob", "margin")

#: The exit op's criteria: the score criteria, then PABEE's patience (Zhou et al. 2020),
#: which has no score: a row leaves when its prediction has agreed with the exits before
#: it ``threshold`` times in a row, a streak the op keeps per row
#: (:func:`branchynet.ops.exit_step`). An engine criterion, not a model's
#: (``ExitConfig.criterion`` takes :data:`CRITERIA`).
OP_CRITERIA = CRITERIA + ("patience",)
PATIENCE_ID = OP_CRITERIA.index("patience")


def criterion_id(criterion: str, *, patience: bool = False) -> int:
    """Integer code of a criterion, as the compiled kernels take it; ``patience``: also
    accept ``"patience"`` (:data:`PATIENCE_ID`)."""
    names = OP_CRITERIA if patience else CRITERIA
    if criterion not in names:
        raise ValueError(f"criterion must be one of {names}, got {criterion!r}")
    return names.index(criterion)


def check_thresholds(thresholds: Sequence[float], num_exits: int) -> tuple[float, ...]:
    """Validate the side-branch thresholds ``T_1 .. T_{N-1}`` for ``num_exits`` exits.

    Raises:
        ValueError: wrong count, NaN or negative values.
        TypeError: not a sequence of numbers.
    """
    if (isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__len__")
            or getattr(thresholds, "ndim", 1) != 1):  # a 0-d or 2-d tensor/array
        raise TypeError(
            f"thresholds must be a sequence of {num_exits - 1} numbers, got {type(thresholds).__name__}"
            + (f" of shape {tuple(thresholds.shape)}" if hasattr(thresholds, "shape") else "")
        )
    try:
        values = tuple(float(t) for t in thresholds)
    except (TypeError, ValueError) as err:
        raise TypeError(f"thresholds must be numbers, got {thresholds!r}") from err
    if len(values) != num_exits - 1:
        raise ValueError(
            f"thresholds: expected {num_exits - 1} values (one per side branch; the last of the "
            f"{num_exits} exits takes every remaining sample), got {len(values)}"
        )
    for i, t in enumerate(values):
        if math.isnan(t):
            raise ValueError(f"thresholds[{i}] is NaN; thresholds must be >= 0")
        if t < 0:
            raise ValueError(f"thresholds[{i}] = {t} is negative; thresholds must be >= 0")
    return values


@dataclass
class ExitConfig:
    """The exits of a BranchyNet.

    Args:
        num_exits: N, the number of exits (side branches + the final classifier), >= 1.
        thresholds: ``T_1 .. T_{N-1}``, one per side branch, each >= 0. A sample leaves at
            the first side branch whose score is strictly below its threshold; the last exit
            takes every remaining sample. Defaults to all zeros (nobody leaves early).
        weights: joint-loss weights ``w_1 .. w_N``, each >= 0 and not all zero. Defaults to
            all ones.
        criterion: one of :data:`CRITERIA`.
    """

    num_exits: int
    thresholds: tuple[float, ...] = field(default=None)  # type: ignore[assignment]
    weights: tuple[float, ...] = field(default=None)  # type: ignore[assignment]
    criterion: str = "entropy"

    def __post_init__(self) -> None:
        if isinstance(self.num_exits, bool) or not isinstance(self.num_exits, int):
            raise TypeError(f"num_exits must be an int, got {type(self.num_exits).__name__}")
        if self.num_exits < 1:
            raise ValueError(f"num_exits must be >= 1, got {self.num_exits}")
        if self.thresholds is None:
            self.thresholds = (0.0,) * (self.num_exits - 1)
        self.thresholds = check_thresholds(self.thresholds, self.num_exits)
        if self.weights is None:
            self.weights = (1.0,) * self.num_exits
        self.weights = check_weights(self.weights, self.num_exits)
        criterion_id(self.criterion)
        object.__setattr__(self, "_ready", True)  # from here on, assignments are validated

    def __setattr__(self, name, value) -> None:
        # Assignments after construction are validated like the constructor's arguments
        # (``model.exit_config.thresholds = ...`` must not smuggle in a NaN).
        if "_ready" in self.__dict__ and name in ("thresholds", "weights", "criterion"):
            if name == "thresholds":
                value = check_thresholds(value, self.num_exits)
            elif name == "weights":
                value = check_weights(value, self.num_exits)
            else:
                criterion_id(value)
        elif name == "num_exits" and "_ready" in self.__dict__:
            raise AttributeError("num_exits is fixed by the model; build a new ExitConfig")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {
            "num_exits": self.num_exits,
            "thresholds": list(self.thresholds),
            "weights": list(self.weights),
            "criterion": self.criterion,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ExitConfig":
        return cls(
            num_exits=int(d["num_exits"]),
            thresholds=tuple(d["thresholds"]),
            weights=tuple(d["weights"]),
            criterion=d["criterion"],
        )


def check_weights(weights: Sequence[float], num_exits: int) -> tuple[float, ...]:
    """Validate joint-loss weights: ``num_exits`` finite values >= 0, not all zero."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"weights must be a sequence of {num_exits} numbers")
    values = tuple(float(w) for w in weights)
    if len(values) != num_exits:
        raise ValueError(f"weights: expected {num_exits} values (one per exit), got {len(values)}")
    for i, w in enumerate(values):
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weights[{i}] = {w}; weights must be finite and >= 0")
    if not any(values):
        raise ValueError("weights are all zero; at least one exit must be trained")
    return values
