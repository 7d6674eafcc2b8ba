"""Threshold calibration: screen threshold combinations on held-out data.

Every exit's logits are computed once (one full forward pass over the validation
split); each threshold combination is then scored from those cached scores, so a sweep
of thousands of combinations costs one pass over the data, not one per combination.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .config import CRITERIA
from .exits import exit_scores
from .flops import FlopProfile, profile_flops
from .models.branchynet import BranchyNet

__all__ = [
    "ExitTable",
    "CalibrationResult",
    "collect_exit_outputs",
    "score_thresholds",
    "candidate_thresholds",
    "measure_path_times",
    "calibrate",
    "pareto_front",
]


@dataclass
class ExitTable:
    """Every exit's score and prediction on a data set.

    Attributes:
        score: [N, M] float64, the criterion's score of each of M samples at each exit.
        pred: [N, M] int64 predictions.
        target: [M] int64 labels.
        criterion: the criterion the scores are for.
    """

    score: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    criterion: str = "entropy"

    @property
    def num_exits(self) -> int:
        return self.score.shape[0]

    def exit_accuracy(self) -> list:
        """Accuracy of each exit on every sample."""
        return (self.pred == self.target).float().mean(dim=1).tolist()


@torch.inference_mode()
def collect_exit_outputs(model: BranchyNet, data, *, criterion: str | None = None,
                         batch_size: int = 256, device: str | torch.device = "cpu") -> ExitTable:
    """One pass over ``data`` computing every exit's score and prediction.

    Args:
        data: a Dataset of ``(x, y)`` or a DataLoader.
    """
    criterion = criterion or model.exit_config.criterion
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    scores, preds, targets = [], [], []
    try:
        for x, y in loader:
            outs = model(x.to(device))
            scored = [exit_scores(z, criterion) for z in outs]  # (score, entropy, pred) per exit
            # float64: the exact values the engine compares with the thresholds
            scores.append(torch.stack([sc for sc, _, _ in scored]).double().cpu())
            preds.append(torch.stack([pr for _, _, pr in scored]).cpu())
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("data is empty: calibration needs at least one sample")
    return ExitTable(torch.cat(scores, 1), torch.cat(preds, 1), torch.cat(targets), criterion)


def score_thresholds(table: ExitTable, thresholds: torch.Tensor):
    """Score G threshold combinations at once from the cached exit scores.

    Args:
        table: from :func:`collect_exit_outputs` (N exits, M samples).
        thresholds: [G, N-1] float, one combination per row.

    Returns:
        ``(accuracy [G] float64, fractions [G, N] float64)``.
    """
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    n, m = table.score.shape
    if thresholds.dim() != 2 or thresholds.shape[1] != n - 1:
        raise ValueError(f"thresholds must have shape [G, {n - 1}], got {tuple(thresholds.shape)}")
    g = thresholds.shape[0]
    leave = table.score[None, : n - 1, :] < thresholds[:, :, None]            # [G, N-1, M]
    leave = torch.cat([leave, torch.ones(g, 1, m, dtype=torch.bool)], dim=1)  # last takes all
    exit_idx = leave.to(torch.uint8).argmax(dim=1)                            # first exit taken
    pred = table.pred[exit_idx, torch.arange(m)]                              # [G, M]
    acc = (pred == table.target[None]).double().mean(dim=1)
    frac = torch.nn.functional.one_hot(exit_idx, n).double().mean(dim=1)
    return acc, frac


def candidate_thresholds(table: ExitTable, per_exit: int = 20) -> list:
    """Candidate T values for each side branch: 0 (nobody leaves), ``per_exit`` cuts at
    quantiles of the branch's scores, and a value above every score (everyone leaves).

    Each cut lies half-way between two neighbouring distinct scores, never on a score:
    then a backend whose rounding differs in the last bits (fp32 GPU kernels, the fp64
    reference) makes the same decision for every sample the sweep was scored on.
    """
    out = []
    for s in table.score[:-1]:
        u = torch.unique(s[torch.isfinite(s)].double())  # sorted
        if u.numel() == 0:
            out.append([0.0])
            continue
        vals = {0.0, float(u[-1]) * (1 + 1e-6) + 1e-9}
        if u.numel() > 1:
            mids = (u[1:] + u[:-1]) / 2
            pos = torch.linspace(0, mids.numel() - 1, min(per_exit, mids.numel()), dtype=torch.float64)
            vals.update(float(mids[int(round(float(p)))]) for p in pos)
        out.append(sorted(v for v in vals if v >= 0))
    return out


@torch.inference_mode()
def measure_path_times(model: BranchyNet, example: torch.Tensor, *, repeats: int = 10) -> list:
    """Measured seconds per sample of reaching each exit (stages and branches on the way,
    plus the exit test), at the batch size of ``example`` [B, ...]."""
    from .timing import time_fn

    was_training = model.training
    model.eval()
    per_part = []
    h = example
    try:
        for stage, branch in zip(model.stages, model.branches):
            hs = h
            t_stage = time_fn(lambda: stage(hs), repeats=repeats, device=example.device).median
            h = stage(h)
            hb = h
            t_branch = time_fn(lambda: exit_scores(branch(hb)), repeats=repeats, device=example.device).median
            per_part.append((t_stage, t_branch))
    finally:
        model.train(was_training)
    b = example.shape[0]
    paths, acc = [], 0.0
    for t_stage, t_branch in per_part:
        acc += t_stage + t_branch
        paths.append(acc / b)
    return paths


@dataclass
class CalibrationResult:
    """A threshold sweep and the chosen point.

    Attributes:
        rows: one dict per combination: thresholds, accuracy, exit fractions, FLOPs per
            sample, speedup from FLOPs, est. time per sample (from measured path times).
        chosen: the row picked for the target.
        final_accuracy: accuracy of the final exit alone (the backbone's).
    """

    rows: list
    chosen: dict
    final_accuracy: float
    target: dict = field(default_factory=dict)

    def pareto(self) -> list:
        return pareto_front(self.rows)

    def to_csv(self, path) -> None:
        keys = ["thresholds", "accuracy", "exit_fractions", "flops", "ideal_speedup", "time_per_sample",
                "pareto"]
        front = {id(r) for r in self.pareto()}
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in self.rows:
                w.writerow([" ".join(f"{t:.6g}" for t in r["thresholds"]), f"{r['accuracy']:.6f}",
                            " ".join(f"{x:.4f}" for x in r["exit_fractions"]), f"{r['flops']:.1f}",
                            f"{r['ideal_speedup']:.4f}",
                            "" if r["time_per_sample"] is None else f"{r['time_per_sample']:.4g}",
                            int(id(r) in front)])

    def plot(self, path) -> None:
        """Accuracy against cost (time per sample if measured, else FLOPs), Pareto front marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        use_time = all(r["time_per_sample"] is not None for r in self.rows)
        key, label = ("time_per_sample", "est. time per sample (ms)") if use_time else ("flops", "MFLOPs per sample")
        scale = 1e3 if use_time else 1e-6
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.scatter([r[key] * scale for r in self.rows], [100 * r["accuracy"] for r in self.rows],
                   s=8, alpha=0.35, label="threshold combinations")
        front = sorted(self.pareto(), key=lambda r: r[key])
        ax.plot([r[key] * scale for r in front], [100 * r["accuracy"] for r in front], "o-", color="C3",
                ms=4, label="Pareto front")
        ax.scatter([self.chosen[key] * scale], [100 * self.chosen["accuracy"]], marker="*", s=180,
                   color="k", zorder=5, label="chosen")
        ax.axhline(100 * self.final_accuracy, ls="--", color="gray", lw=1, label="final exit only")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def pareto_front(rows: Sequence[dict], cost: str | None = None) -> list:
    """Rows not dominated in (lower cost, higher accuracy); cost is time if measured, else FLOPs."""
    if not rows:
        return []
    cost = cost or ("time_per_sample" if all(r["time_per_sample"] is not None for r in rows) else "flops")
    front, best = [], -math.inf
    for r in sorted(rows, key=lambda r: (r[cost], -r["accuracy"])):
        if r["accuracy"] > best:
            front.append(r)
            best = r["accuracy"]
    return front


def calibrate(
    model: BranchyNet,
    val,
    *,
    max_drop: float | None = 0.005,
    min_accuracy: float | None = None,
    candidates: Sequence[Sequence[float]] | None = None,
    per_exit: int = 20,
    criterion: str | None = None,
    flops: FlopProfile | None = None,
    path_times: Sequence[float] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    table: ExitTable | None = None,
) -> CalibrationResult:
    """Sweep threshold combinations on ``val`` and pick one for a target.

    Target: the fastest combination (by measured time if ``path_times`` is given, else by
    FLOPs) whose accuracy is at least ``min_accuracy``, or, when that is None, at most
    ``max_drop`` (a fraction: 0.005 = 0.5 pt) below the final exit's accuracy.

    Args:
        model: a trained BranchyNet.
        val: validation Dataset of ``(x, y)`` (or DataLoader).
        candidates: T values to try per side branch (default :func:`candidate_thresholds`).
        flops: FLOP profile (default counted from the model).
        path_times: measured seconds per sample to reach each exit
            (:func:`measure_path_times`); gives each combination's time per sample.

    Returns:
        :class:`CalibrationResult`; ``model.exit_config`` is not modified.
    """
    if min_accuracy is None and max_drop is None:
        raise ValueError("give a target: max_drop or min_accuracy")
    if max_drop is not None and not (0 <= max_drop <= 1):
        raise ValueError(f"max_drop is a fraction in [0, 1] (0.005 = 0.5 pt), got {max_drop}")
    table = table or collect_exit_outputs(model, val, criterion=criterion, batch_size=batch_size,
                                          device=device)
    n = table.num_exits
    if n == 1:
        raise ValueError("the model has a single exit: there are no thresholds to calibrate")
    candidates = candidates or candidate_thresholds(table, per_exit)
    if len(candidates) != n - 1:
        raise ValueError(f"candidates: expected {n - 1} lists (one per side branch), got {len(candidates)}")
    flops = flops or profile_flops(model)
    grid = torch.tensor(list(itertools.product(*candidates)), dtype=torch.float64).reshape(-1, n - 1)
    acc, frac = score_thresholds(table, grid)
    final_acc = table.exit_accuracy()[-1]
    rows = []
    for g in range(grid.shape[0]):
        f = frac[g].tolist()
        rows.append({
            "thresholds": grid[g].tolist(),
            "accuracy": float(acc[g]),
            "exit_fractions": f,
            "flops": flops.expected(f),
            "ideal_speedup": flops.ideal_speedup(f),
            "time_per_sample": None if path_times is None else float(np.dot(f, path_times)),
        })
    goal = min_accuracy if min_accuracy is not None else final_acc - max_drop
    cost = "time_per_sample" if path_times is not None else "flops"
    ok = [r for r in rows if r["accuracy"] >= goal - 1e-12]
    if not ok:  # nothing meets the target: the most accurate point, said so in target
        chosen = max(rows, key=lambda r: (r["accuracy"], -r[cost]))
        met = False
    else:
        chosen = min(ok, key=lambda r: (r[cost], -r["accuracy"]))
        met = True
    return CalibrationResult(rows=rows, chosen=chosen, final_accuracy=final_acc,
                             target={"min_accuracy": goal, "met": met, "cost": cost})
