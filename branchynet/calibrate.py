"""Threshold calibration: pick per-exit thresholds for a target on held-out data.

Every exit's logits are computed once (one full forward pass over the validation
split); each threshold combination is then scored from those cached scores, so a sweep
costs one pass over the data, not one per combination.

With N exits and K candidates per side branch there are K^(N-1) combinations (22^7 for
8 exits), so they are not all scored: small grids are (exhaustive), larger ones are
searched exit by exit (a beam over the accuracy / cost Pareto front of partial
assignments, the last side branch scored for every candidate, then coordinate descent
from the chosen point). The work per exit is bounded by the beam, so the cost grows
linearly with N, and memory holds at most ``beam_width x samples`` survivor masks.
"""

from __future__ import annotations

import csv
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
    "TargetUnreachable",
    "ExitTable",
    "CalibrationResult",
    "collect_exit_outputs",
    "score_thresholds",
    "candidate_thresholds",
    "measure_path_times",
    "calibrate",
    "pareto_front",
    "collect_logits",
    "fit_temperature",
    "expected_calibration_error",
    "fold_temperature",
]


class TargetUnreachable(ValueError):
    """No threshold combination meets the calibration targets; the message says the best
    value reached for each target with the others met."""


@dataclass
class ExitTable:
    """Every exit's score and prediction on a data set.

    Attributes:
        score: [N, M] float64, the criterion's score of each of M samples at each exit.
        pred: [N, M] int64 predictions.
        target: [M] int64 labels.
        criterion: the criterion the scores are for.
        score_dtype: the dtype the engine computes and compares the scores in (float32,
            or float64 for a float64 model); default: float32 when every score is a
            float32 value, else float64.
    """

    score: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    criterion: str = "entropy"
    score_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.score_dtype is None:
            s = self.score[torch.isfinite(self.score)]
            exact32 = bool((s.float().double() == s).all())
            self.score_dtype = torch.float32 if exact32 else torch.float64
        if self.score_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"score_dtype must be torch.float32 or torch.float64, got {self.score_dtype}")

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
    return ExitTable(torch.cat(scores, 1), torch.cat(preds, 1), torch.cat(targets), criterion,
                     score_dtype=torch.float64 if outs[0].dtype == torch.float64 else torch.float32)


def _engine_thresholds(table: ExitTable, thresholds: torch.Tensor) -> torch.Tensor:
    """Thresholds as the engine compares them: rounded to the scores' dtype (every
    backend tests ``score < T`` with T cast to the score's float32 or float64)."""
    return thresholds.to(table.score_dtype).to(torch.float64)


def _count_exits(table: ExitTable, thresholds: torch.Tensor):
    """``(correct [G] int64, counts [G, N] int64)`` for G combinations, scored in chunks
    so that memory stays below ~16 M booleans whatever G is."""
    n, m = table.score.shape
    thresholds = _engine_thresholds(table, thresholds)
    correct_all = table.pred == table.target[None]                            # [N, M]
    chunk = max(1, (1 << 24) // max(1, n * m))
    corrects, counts = [], []
    for g0 in range(0, thresholds.shape[0], chunk):
        t = thresholds[g0:g0 + chunk]
        g = t.shape[0]
        leave = table.score[None, : n - 1, :] < t[:, :, None]                 # [g, N-1, M]
        leave = torch.cat([leave, torch.ones(g, 1, m, dtype=torch.bool)], dim=1)  # last takes all
        exit_idx = leave.to(torch.uint8).argmax(dim=1)                        # first exit taken
        corrects.append(correct_all.gather(0, exit_idx).sum(dim=1))
        flat = (exit_idx + n * torch.arange(g)[:, None]).reshape(-1)
        counts.append(torch.bincount(flat, minlength=g * n).reshape(g, n))
    if not corrects:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, n, dtype=torch.int64)
    return torch.cat(corrects), torch.cat(counts)


def score_thresholds(table: ExitTable, thresholds: torch.Tensor):
    """Score G threshold combinations from the cached exit scores, as the engine decides.

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
    correct, counts = _count_exits(table, thresholds)
    return correct.double() / m, counts.double() / m


def _split(lo: float, hi: float, dtype: torch.dtype) -> float:
    """A threshold T with ``lo < T <= hi`` in ``dtype`` (lo < hi there): the midpoint
    rounded to ``dtype`` when it stays above lo, else hi itself (adjacent values)."""
    mid = float(torch.tensor((lo + hi) / 2, dtype=torch.float64).to(dtype))
    return mid if lo < mid <= hi else hi


def candidate_thresholds(table: ExitTable, per_exit: int = 20) -> list:
    """Candidate T values for each side branch: 0 (nobody leaves), ``per_exit`` cuts at
    quantiles of the branch's scores, and a value above every score (everyone leaves).

    Each cut lies half-way between two neighbouring distinct scores, never on a score:
    then a backend whose rounding differs in the last bits (fp32 GPU kernels, the fp64
    reference) makes the same decision for every sample the sweep was scored on. Cuts
    are values of the engine's dtype (``table.score_dtype``): a float64 midpoint of two
    adjacent float32 scores would round onto one of them when the engine casts it.
    """
    out = []
    dt = table.score_dtype
    for s in table.score[:-1]:
        u = torch.unique(s[torch.isfinite(s)].double())  # sorted
        if u.numel() == 0:
            out.append([0.0])
            continue
        top = float(torch.tensor(float(u[-1]) * (1 + 1e-6) + 1e-9, dtype=torch.float64).to(dt))
        if not top > float(u[-1]):
            top = float(torch.nextafter(torch.tensor(float(u[-1]), dtype=dt), torch.tensor(float("inf"), dtype=dt)))
        vals = {0.0, top}
        if u.numel() > 1:
            pos = torch.linspace(0, u.numel() - 2, min(per_exit, u.numel() - 1), dtype=torch.float64)
            for p in pos:
                i = int(round(float(p)))
                vals.add(_split(float(u[i]), float(u[i + 1]), dt))
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


# -- temperature scaling -------------------------------------------------------------------


@torch.no_grad()
def collect_logits(model: BranchyNet, data, *, batch_size: int = 256,
                   device: str | torch.device = "cpu"):
    """Every exit's logits on ``data`` (one pass).

    Returns:
        ``(logits, target)``: N tensors [M, C] (the model's dtype, on the CPU) and [M] int64.
    """
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    was_training = model.training
    model.eval()
    logits, targets = [], []
    try:
        for x, y in loader:
            logits.append([z.cpu() for z in model(x.to(device))])
            targets.append(y.cpu())
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("data is empty: temperature scaling needs at least one sample")
    return [torch.cat(z) for z in zip(*logits)], torch.cat(targets)


def _usable_rows(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # NaN rows, +inf logits and a -inf (masked) true class have no finite NLL at any T.
    ok = ~torch.isnan(z).any(1) & ~torch.isposinf(z).any(1)
    return ok & torch.isfinite(z.gather(1, y[:, None]).squeeze(1))


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, *, bounds=(0.01, 100.0)) -> float:
    """The temperature T minimising the NLL of ``softmax(logits / T)`` (LBFGS on log T).

    Args:
        logits: [M, C] one exit's logits on the validation split.
        target: [M] int64 labels.
        bounds: T is clipped to this range (separable data drives T to 0).

    Returns:
        T > 0 (1.0 when no row has a finite NLL).
    """
    z = logits.detach().clone().double()
    y = target.detach().clone().long()
    ok = _usable_rows(z, y)
    z, y = z[ok], y[ok]
    if z.shape[0] == 0:
        return 1.0
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(lo, hi).exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().clamp(lo, hi).exp())


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, *, bins: int = 15) -> float:
    """ECE of the top-class confidence: ``sum_b |B_b| / M * |acc(B_b) - conf(B_b)|`` over
    ``bins`` equal-width confidence bins (Guo et al., 2017).

    Args:
        logits: [M, C]. target: [M] int64.
    """
    z = logits.detach().double()
    ok = ~torch.isnan(z).any(1)
    z, y = z[ok], target[ok]
    if z.shape[0] == 0:
        return 0.0
    conf, pred = z.softmax(1).max(1)
    correct = (pred == y).double()
    b = (conf * bins).long().clamp(0, bins - 1)
    count = torch.bincount(b, minlength=bins).double()
    gap = torch.bincount(b, correct - conf, minlength=bins).abs()
    return float(gap.sum() / count.sum())


def _last_linear(branch: torch.nn.Module) -> torch.nn.Linear | None:
    last = None
    for mod in branch.modules():
        if isinstance(mod, torch.nn.Linear):
            last = mod
    return last


@torch.no_grad()
def fold_temperature(model: BranchyNet, temperatures: Sequence[float], example: torch.Tensor) -> list[float]:
    """Divide each branch's logits by its temperature at no runtime cost: the weight and
    bias of the branch's last ``nn.Linear`` are divided by T (argmax, hence every
    prediction, is unchanged; the entropies are those of ``softmax(z / T)``).

    The final exit's score is never compared with a threshold, so its temperature only
    matters for calibrated probabilities. Where its branch has no ``nn.Linear`` but no
    parameters either (the ``nn.Identity`` of :func:`~branchynet.attach_exits` models), T
    is folded into the last stage's last ``nn.Linear``; where that is not possible (no
    such layer, or one whose output is not the logits) the final exit is left at T = 1.0,
    and the returned list says so.

    Args:
        model: the BranchyNet, changed in place.
        temperatures: N values > 0, one per exit (1.0 leaves an exit as it is).
        example: [B, ...] inputs, used to check that each branch's logits are its last
            linear layer's output divided by T after folding.

    Returns:
        The N temperatures folded: ``temperatures``, with the last one 1.0 where it could
        not be folded (see above).

    Raises:
        ValueError: a side branch whose logits are not an affine function of its last
            linear layer's output (nothing folded then).
    """
    temps = [float(t) for t in temperatures]
    if len(temps) != model.num_exits or not all(t > 0 and math.isfinite(t) for t in temps):
        raise ValueError(f"temperatures: expected {model.num_exits} finite values > 0, got {temps}")
    last = model.num_exits - 1
    was_training = model.training
    model.eval()
    try:
        before = model(example)
        saved = []
        for n, (branch, t) in enumerate(zip(model.branches, temps)):
            if t == 1.0:
                continue
            lin = _last_linear(branch)
            if lin is None and n == last:
                # A parameter-free final branch passes the last stage's output on.
                lin = _last_linear(model.stages[-1]) if not any(True for _ in branch.parameters()) else None
                if lin is None:
                    temps[n] = 1.0
                    continue
            if lin is None:
                raise ValueError(f"branch {n} has no nn.Linear layer to fold temperature {t:.4g} into")
            saved.append((lin, lin.weight.clone(), None if lin.bias is None else lin.bias.clone()))
            lin.weight.div_(t)
            if lin.bias is not None:
                lin.bias.div_(t)
        after = model(example)
        for n, (z0, z1, t) in enumerate(zip(before, after, temps)):
            want = z0.double() / t
            scale = float(want.abs().amax()) if want.numel() else 0.0
            if not torch.allclose(z1.double(), want, rtol=1e-4, atol=1e-5 * max(scale, 1.0), equal_nan=True):
                if n == last and _last_linear(model.branches[n]) is None:
                    # Folded into the last stage (above), whose output feeds no other exit:
                    # undo that one and leave the final exit unscaled.
                    lin, w, b = saved.pop()
                    lin.weight.copy_(w)
                    if b is not None:
                        lin.bias.copy_(b)
                    temps[n] = 1.0
                    break
                for lin, w, b in saved:  # undo every branch, bit for bit
                    lin.weight.copy_(w)
                    if b is not None:
                        lin.bias.copy_(b)
                raise ValueError(
                    f"branch {n}: its logits are not its last nn.Linear's output (a layer after it, "
                    f"or a shared one), so temperature {t:.4g} cannot be folded into it")
    finally:
        model.train(was_training)
    return temps


def _first_inputs(data, limit: int) -> torch.Tensor:
    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=min(limit, 1024), shuffle=False)
    xs, got = [], 0
    for x, _ in loader:
        xs.append(x)
        got += x.shape[0]
        if got >= limit:
            break
    if not xs:
        raise ValueError("data is empty")
    return torch.cat(xs)[:limit]


# -- the search ----------------------------------------------------------------------------


class _Costs:
    """Accuracy, FLOPs and time of exit profiles (counts of samples per exit)."""

    def __init__(self, m: int, flops: FlopProfile, path_times=None, latency=None):
        self.m = m
        self.flops = flops
        self.path_flops = np.array([flops.path(n) for n in range(flops.num_exits)])
        self.path_times = None if path_times is None else np.asarray(path_times, dtype=np.float64)
        self.latency = latency

    @property
    def timed(self) -> bool:
        return self.path_times is not None or self.latency is not None

    def metrics(self, correct: torch.Tensor, counts: torch.Tensor) -> dict:
        frac = counts.double().numpy() / self.m
        out = {"accuracy": correct.double().numpy() / self.m, "fractions": frac,
               "flops": frac @ self.path_flops, "time": None}
        if self.latency is not None:
            out["time"] = self.latency.predict(frac)
        elif self.path_times is not None:
            out["time"] = frac @ self.path_times
        return out


@dataclass
class _Goal:
    """Constraints every chosen point must meet, and what is optimised among them."""

    min_accuracy: float | None = None
    max_flops: float | None = None      # absolute FLOPs per sample
    max_time: float | None = None       # seconds per sample (predicted)
    cost: str = "flops"                 # "flops" or "time"

    def feasible(self, mt: dict) -> np.ndarray:
        ok = np.ones(len(mt["accuracy"]), dtype=bool)
        if self.min_accuracy is not None:
            ok &= mt["accuracy"] >= self.min_accuracy - 1e-12
        if self.max_flops is not None:
            ok &= mt["flops"] <= self.max_flops * (1 + 1e-12)
        if self.max_time is not None:
            ok &= mt["time"] <= self.max_time
        return ok

    def best(self, mt: dict) -> int | None:
        """Index of the best feasible row: the cheapest when accuracy is a target (the most
        accurate among equals), else the most accurate (the cheapest among equals)."""
        ok = np.flatnonzero(self.feasible(mt))
        if ok.size == 0:
            return None
        acc = mt["accuracy"][ok]
        cost = mt[self.cost][ok]
        # np.lexsort: the last key is the primary one
        keys = (cost, -acc) if self.min_accuracy is None else (-acc, cost)
        return int(ok[np.lexsort(keys)[0]])


def _ranked(goal: _Goal, mt: dict, k: int) -> list:
    """Indices of the ``k`` best feasible rows (distinct outcomes), best first; the most
    accurate rows when none is feasible (descent may still reach the target from there)."""
    ok = np.flatnonzero(goal.feasible(mt))
    if ok.size == 0:
        ok = np.arange(len(mt["accuracy"]))
        keys = (mt[goal.cost][ok], -mt["accuracy"][ok])
    else:
        acc, cost = mt["accuracy"][ok], mt[goal.cost][ok]
        keys = (cost, -acc) if goal.min_accuracy is None else (-acc, cost)
    out, seen = [], set()
    for i in ok[np.lexsort(keys)]:
        key = (float(mt["accuracy"][i]), float(mt[goal.cost][i]))
        if key not in seen:
            seen.add(key)
            out.append(int(i))
        if len(out) == k:
            break
    return out


def _pareto_pick(acc: np.ndarray, cost: np.ndarray, width: int) -> np.ndarray:
    """Up to ``width`` indices: successive non-dominated layers (lower cost, higher
    accuracy), the last layer taken evenly along its cost range."""
    _, first = np.unique(np.stack([acc, cost], 1), axis=0, return_index=True)  # drop duplicate points
    left = np.sort(first)
    picked: list = []
    while left.size and len(picked) < width:
        order = left[np.lexsort((-acc[left], cost[left]))]
        best = np.maximum.accumulate(acc[order])
        on = np.r_[True, acc[order][1:] > best[:-1]]
        layer = order[on]
        room = width - len(picked)
        if layer.size > room:
            layer = layer[np.unique(np.linspace(0, layer.size - 1, room).round().astype(int))]
        picked.extend(layer.tolist())
        left = np.setdiff1d(left, layer)
    return np.array(picked, dtype=np.int64)


def _beam_search(table: ExitTable, cands: list, costs: _Costs, goal: _Goal, width: int):
    """Thresholds exit by exit; returns ``(thresholds [R, N-1], correct [R], counts [R, N])``
    of every combination scored (later exits at 0 for the partial ones)."""
    n, m = table.score.shape
    correct = table.pred == table.target[None]                     # [N, M]
    score = torch.nan_to_num(table.score, nan=math.inf)            # NaN never leaves, like +inf
    alive = torch.ones(1, m, dtype=torch.bool)                     # [S, M] still in flight
    thr = torch.zeros(1, n - 1, dtype=torch.float64)
    exited = torch.zeros(1, n, dtype=torch.int64)                  # left at the exits decided
    corr = torch.zeros(1, dtype=torch.int64)                       # correct among them
    all_thr, all_corr, all_counts = [], [], []
    for j in range(n - 1):
        c = _engine_thresholds(table, torch.as_tensor(cands[j], dtype=torch.float64))
        order = torch.argsort(score[j], stable=True)
        pos = torch.searchsorted(score[j][order].contiguous(), c, side="left")  # #(score < c)
        a = alive[:, order]
        zero = torch.zeros(a.shape[0], 1, dtype=torch.int64)

        def upto(mask):  # [S, K]: how many of each state's samples with score < c_k match
            return torch.cat([zero, mask.cumsum(1)], 1)[:, pos]

        leave = upto(a)
        leave_ok = upto(a & correct[j][order])
        leave_final_ok = upto(a & correct[-1][order])
        s, k = leave.shape
        # every child as a whole combination: the exits after j at 0 (the rest go to the last)
        counts = exited[:, None, :].repeat(1, k, 1)
        counts[:, :, j] = leave
        counts[:, :, -1] = alive.sum(1)[:, None] - leave
        good = corr[:, None] + leave_ok + (alive & correct[-1]).sum(1)[:, None] - leave_final_ok
        t = thr[:, None, :].repeat(1, k, 1)
        t[:, :, j] = c[None, :]
        t, good, counts = t.reshape(s * k, n - 1), good.reshape(-1), counts.reshape(s * k, n)
        all_thr.append(t)
        all_corr.append(good)
        all_counts.append(counts)
        if j == n - 2:
            break
        mt = costs.metrics(good, counts)
        keep = torch.from_numpy(_pareto_pick(mt["accuracy"], mt[goal.cost], width))
        si, ki = keep // k, keep % k
        stays = ~(score[j][None, :] < c[ki][:, None])
        alive = alive[si] & stays
        thr = t[keep]
        exited = counts[keep].clone()
        exited[:, -1] = 0
        corr = (good[keep] - (alive & correct[-1]).sum(1))
    return torch.cat(all_thr), torch.cat(all_corr), torch.cat(all_counts)


def _vary_one(table: ExitTable, cur: torch.Tensor, j: int, c: torch.Tensor):
    """``(correct [K], counts [K, N])`` of ``cur`` [N-1] with threshold j replaced by each
    of ``c`` [K] (engine-rounded), in O(M log M + K N): a sample that leaves before j is
    not affected, and one that passes j leaves at the first later exit it would take
    anyway, whatever T_j is."""
    n, m = table.score.shape
    correct = table.pred == table.target[None]
    score = torch.nan_to_num(table.score, nan=math.inf)
    leave = torch.cat([score[: n - 1] < cur[:, None], torch.ones(1, m, dtype=torch.bool)])  # [N, M]
    leave[j] = False
    first = leave.to(torch.uint8).argmax(0)                  # exit taken when not leaving at j
    free = first > j                                         # reaches exit j
    onehot = torch.nn.functional.one_hot(first, n)           # [M, N]
    base_counts = onehot.sum(0)                              # everyone, T_j = 0
    base_correct = correct.gather(0, first[None]).squeeze(0)  # [M] correct where it exits then
    order = torch.argsort(score[j], stable=True)
    pos = torch.searchsorted(score[j][order].contiguous(), c, side="left")
    f = free[order]
    # samples with score_j < c_k that reach j move from their later exit to j
    moved = torch.cat([torch.zeros(1, n, dtype=torch.int64), (onehot[order] * f[:, None]).cumsum(0)])[pos]
    k_leave = torch.cat([torch.zeros(1, dtype=torch.int64), f.long().cumsum(0)])[pos]
    lost = torch.cat([torch.zeros(1, dtype=torch.int64), (base_correct[order] & f).long().cumsum(0)])[pos]
    gain = torch.cat([torch.zeros(1, dtype=torch.int64), (correct[j][order] & f).long().cumsum(0)])[pos]
    counts = base_counts[None, :] - moved
    counts[:, j] += k_leave
    return base_correct.sum() - lost + gain, counts


def _polish(table: ExitTable, cands: list, costs: _Costs, goal: _Goal, start: torch.Tensor, sweeps: int = 4):
    """Coordinate descent from ``start`` [N-1]: each side branch's threshold in turn over
    all its candidates, the others held; every combination scored is returned."""
    n = table.num_exits
    cur = start.clone()
    thr_l, corr_l, cnt_l = [], [], []
    for _ in range(sweeps):
        changed = False
        for j in range(n - 1):
            c = torch.as_tensor(cands[j], dtype=torch.float64)
            grid = cur[None, :].repeat(c.numel(), 1)
            grid[:, j] = c
            good, counts = _vary_one(table, cur, j, c)
            thr_l.append(grid)
            corr_l.append(good)
            cnt_l.append(counts)
            mt = costs.metrics(good, counts)
            i = goal.best(mt)
            here = torch.nonzero((grid == cur).all(1))
            # move only on a strict gain over the current point (when it is a candidate)
            if i is not None and (here.numel() == 0 or _better(goal, mt, i, int(here[0]))):
                if not torch.equal(grid[i], cur):
                    cur = grid[i].clone()
                    changed = True
        if not changed:
            break
    return torch.cat(thr_l), torch.cat(corr_l), torch.cat(cnt_l)


def _exhaustive(table: ExitTable, cands: list):
    """Every combination: for each choice of the first N-2 thresholds, the last side
    branch's candidates all at once (:func:`_vary_one`)."""
    n = table.num_exits
    last = torch.tensor(cands[-1], dtype=torch.float64)
    if n > 2:
        prefixes = torch.cartesian_prod(*[torch.tensor(c, dtype=torch.float64) for c in cands[:-1]])
        prefixes = prefixes.reshape(-1, n - 2)
    else:
        prefixes = torch.zeros(1, 0, dtype=torch.float64)
    thr_l, corr_l, cnt_l = [], [], []
    for p in prefixes:
        cur = torch.cat([p, torch.zeros(1, dtype=torch.float64)])
        good, counts = _vary_one(table, cur, n - 2, last)
        grid = cur[None].repeat(last.numel(), 1)
        grid[:, -1] = last
        thr_l.append(grid)
        corr_l.append(good)
        cnt_l.append(counts)
    return torch.cat(thr_l), torch.cat(corr_l), torch.cat(cnt_l)


def _better(goal: _Goal, mt: dict, i: int, j: int) -> bool:
    ok = goal.feasible(mt)
    if not ok[i]:
        return False
    if not ok[j]:
        return True
    a, c = mt["accuracy"], mt[goal.cost]
    if goal.min_accuracy is not None:
        return (c[i], -a[i]) < (c[j], -a[j])
    return (-a[i], c[i]) < (-a[j], c[j])


@dataclass
class CalibrationResult:
    """A threshold search and the chosen point.

    Attributes:
        rows: one dict per combination scored: thresholds, accuracy, exit fractions, FLOPs
            per sample (``flops``, and ``flops_fraction`` of the backbone's), speedup from
            FLOPs, time per sample (predicted from measured times, or None).
        chosen: the row picked for the target; with a latency profile it also holds
            ``time_measured`` (the engine timed with the chosen thresholds).
        final_accuracy: accuracy of the final exit alone (the backbone's).
        target: the targets, ``met`` and ``cost`` (what was minimised or held).
        search: ``method`` ("exhaustive" or "beam"), ``scored`` (combinations scored),
            ``combinations`` (the size of the full grid).
        temperature: N fitted temperatures (folded into the model), or None.
        ece: ``{"before": [N], "after": [N]}`` calibration errors, or None.
        test: predicted (validation) and measured (test split) accuracy, FLOPs and time
            of the chosen point, or None.
    """

    rows: list
    chosen: dict
    final_accuracy: float
    target: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)
    temperature: list | None = None
    ece: dict | None = None
    test: dict | None = None

    def pareto(self) -> list:
        return pareto_front(self.rows)

    def to_csv(self, path) -> None:
        keys = ["thresholds", "accuracy", "exit_fractions", "flops", "ideal_speedup", "time_per_sample",
                "pareto", "flops_fraction"]
        front = {id(r) for r in self.pareto()}
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(keys)
            for r in self.rows:
                w.writerow([" ".join(f"{t:.9g}" for t in r["thresholds"]), f"{r['accuracy']:.6f}",
                            " ".join(f"{x:.4f}" for x in r["exit_fractions"]), f"{r['flops']:.1f}",
                            f"{r['ideal_speedup']:.4f}",
                            "" if r["time_per_sample"] is None else f"{r['time_per_sample']:.4g}",
                            int(id(r) in front), f"{r['flops_fraction']:.4f}"])

    def plot(self, path) -> None:
        """Accuracy against cost (time per sample if measured, FLOPs for a FLOP budget or
        when no time is known), Pareto front, chosen point and the budget marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        use_time = all(r["time_per_sample"] is not None for r in self.rows) and \
            self.target.get("max_flops") is None
        key, label = ("time_per_sample", "est. time per sample (ms)") if use_time else ("flops", "MFLOPs per sample")
        scale = 1e3 if use_time else 1e-6
        fig, ax = plt.subplots(figsize=(6, 4.2))
        ax.scatter([r[key] * scale for r in self.rows], [100 * r["accuracy"] for r in self.rows],
                   s=8, alpha=0.35, label="threshold combinations")
        front = sorted(pareto_front(self.rows, key), key=lambda r: r[key])
        ax.plot([r[key] * scale for r in front], [100 * r["accuracy"] for r in front], "o-", color="C3",
                ms=4, label="Pareto front")
        ax.scatter([self.chosen[key] * scale], [100 * self.chosen["accuracy"]], marker="*", s=180,
                   color="k", zorder=5, label="chosen")
        ax.axhline(100 * self.final_accuracy, ls="--", color="gray", lw=1, label="final exit only")
        budget = self.target.get("max_latency") if use_time else self.target.get("max_flops_abs")
        if budget is not None:
            ax.axvline(budget * scale, ls=":", color="C2", lw=1.5, label="budget")
        if self.target.get("min_accuracy") is not None:
            ax.axhline(100 * self.target["min_accuracy"], ls=":", color="C1", lw=1.5, label="accuracy target")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (%)")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def summary(self) -> str:
        """The chosen point in a few lines: thresholds, predicted and measured figures."""
        c = self.chosen
        lines = [f"final exit accuracy {100 * self.final_accuracy:.2f} %; chosen thresholds "
                 f"{[float(f'{t:.6g}') for t in c['thresholds']]} ({self.search.get('method')}, "
                 f"{self.search.get('scored')} combinations scored)",
                 f"validation (predicted): accuracy {100 * c['accuracy']:.2f} %, exits "
                 f"{[round(100 * f, 1) for f in c['exit_fractions']]} %, FLOPs "
                 f"{c['flops_fraction']:.3f} of the backbone's (ideal speedup {c['ideal_speedup']:.2f}x)"
                 + ("" if c["time_per_sample"] is None else f", {1e3 * c['time_per_sample']:.4g} ms/sample")
                 + ("" if c.get("time_measured") is None else
                    f" (measured {1e3 * c['time_measured']:.4g} ms/sample)")]
        if self.test is not None:
            t = self.test["measured"]
            lines.append(f"test split (measured): accuracy {100 * t['accuracy']:.2f} %, exits "
                         f"{[round(100 * f, 1) for f in t['exit_fractions']]} %, FLOPs "
                         f"{t['flops_fraction']:.3f} of the backbone's"
                         + ("" if t.get("time_per_sample") is None else
                            f", {1e3 * t['time_per_sample']:.4g} ms/sample"))
        if self.ece is not None:
            lines.append("temperature " + ", ".join(f"{t:.3g}" for t in self.temperature) + "; ECE before "
                         + ", ".join(f"{e:.4f}" for e in self.ece["before"]) + "; after "
                         + ", ".join(f"{e:.4f}" for e in self.ece["after"]))
        return "\n".join(lines)


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


def _exit_fraction_threshold(table: ExitTable, want: float) -> float:
    """The first side branch's threshold whose leaving share is nearest ``want``."""
    s = table.score[0]
    m = s.numel()
    u = torch.unique(s[torch.isfinite(s)].double())
    # achievable shares: 0, and #(score <= u_i) / m for each distinct score u_i
    below = torch.searchsorted(torch.sort(s.double()).values, u, side="right")
    shares = torch.cat([torch.zeros(1, dtype=torch.float64), below.double() / m])
    i = int((shares - want).abs().argmin())
    got = float(shares[i])
    if abs(got - want) > max(0.01, 1.0 / m):
        low = shares[shares <= want].max()
        high = shares[shares >= want]
        raise TargetUnreachable(
            f"exit_fraction={want}: ties in the first branch's scores allow no share within 0.01 of it; "
            f"the nearest reachable are {float(low):.4f}"
            + (f" and {float(high.min()):.4f}" if high.numel() else ""))
    if i == 0:
        return 0.0
    lo = float(u[i - 1])
    if i < u.numel():
        return _split(lo, float(u[i]), table.score_dtype)
    t = float(torch.nextafter(torch.tensor(lo, dtype=table.score_dtype),
                              torch.tensor(math.inf, dtype=table.score_dtype)))
    return max(t, float(torch.tensor(lo * (1 + 1e-6) + 1e-9, dtype=torch.float64).to(table.score_dtype)))


def _unreachable(goal: _Goal, mt: dict, backbone: float) -> str:
    """Why nothing meets the targets: for each target, its best value among the
    combinations that meet the other targets."""
    masks = {}
    if goal.min_accuracy is not None:
        masks["acc"] = mt["accuracy"] >= goal.min_accuracy - 1e-12
    if goal.max_flops is not None:
        masks["flops"] = mt["flops"] <= goal.max_flops * (1 + 1e-12)
    if goal.max_time is not None:
        masks["time"] = mt["time"] <= goal.max_time
    parts = []
    for name in masks:
        others = np.ones(len(mt["accuracy"]), dtype=bool)
        for k, v in masks.items():
            if k != name:
                others &= v
        if not others.any():
            continue
        if name == "acc":
            parts.append(f"accuracy >= {100 * goal.min_accuracy:.2f} % (min_accuracy / max_drop): "
                         f"the best reachable is {100 * mt['accuracy'][others].max():.2f} %")
        elif name == "flops":
            parts.append(f"max_flops={goal.max_flops / backbone:.4g} of the backbone's FLOPs: the least "
                         f"reachable is {mt['flops'][others].min() / backbone:.4f}")
        else:
            parts.append(f"max_latency={goal.max_time:.4g} s per sample: the least reachable is "
                         f"{mt['time'][others].min():.4g} s ({1e3 * mt['time'][others].min():.4g} ms)")
    if not parts:
        parts.append("no combination meets any one target together with the others")
    return "no threshold combination meets the target: " + "; ".join(parts)


def calibrate(
    model: BranchyNet,
    val,
    *,
    max_drop: float | None = None,
    min_accuracy: float | None = None,
    max_flops: float | None = None,
    max_latency: float | None = None,
    exit_fraction: float | None = None,
    temperature: bool = False,
    candidates: Sequence[Sequence[float]] | None = None,
    per_exit: int = 20,
    criterion: str | None = None,
    flops: FlopProfile | None = None,
    path_times: Sequence[float] | None = None,
    latency=None,
    test=None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    table: ExitTable | None = None,
    search: str = "auto",
    beam_width: int = 32,
    polish_starts: int = 4,
    max_exhaustive: int = 4096,
) -> CalibrationResult:
    """Pick the side branches' thresholds on ``val`` for a target.

    Targets (any combination; with none, ``max_drop=0.005``):

    - ``max_drop`` / ``min_accuracy``: accuracy at most ``max_drop`` (a fraction: 0.005 =
      0.5 pt) below the final exit's, or at least ``min_accuracy``. The cheapest point
      (by time when times are known, else by FLOPs) that meets every target is chosen.
    - ``max_flops``: expected FLOPs per sample at most this fraction of the backbone's
      (the network without side branches).
    - ``max_latency``: seconds per sample at ``batch_size`` on the model's device,
      predicted from segment times measured at the batch sizes each stage sees after
      compaction (:mod:`branchynet.latency`) and checked by timing the chosen thresholds.
    - ``exit_fraction``: the share of samples leaving at the first branch (the paper's
      way), matched as closely as ties in the scores allow.

    Without an accuracy target, the most accurate point that meets the budgets is chosen.

    Args:
        model: a trained BranchyNet.
        val: validation Dataset of ``(x, y)`` (or DataLoader).
        temperature: fit one temperature per exit on ``val`` (NLL) and fold it into the
            branch's last linear layer (changes ``model`` in place; predictions unchanged),
            before the thresholds are searched on the scaled scores. The final exit may
            stay at 1.0 (see :func:`fold_temperature`); ``temperature`` in the result
            holds the values folded.
        candidates: T values to try per side branch (default :func:`candidate_thresholds`).
        flops: FLOP profile (default counted from the model).
        path_times: seconds per sample to reach each exit (:func:`measure_path_times`),
            a cruder time model than ``latency`` (no compaction).
        latency: a :class:`~branchynet.latency.LatencyProfile`, or True to measure one at
            ``batch_size`` on ``val`` (the default when ``max_latency`` is given).
        test: a test Dataset: the chosen thresholds are run there by the engine and its
            measured accuracy, exits, FLOPs (and time) are reported beside the predicted.
        batch_size: the engine's batch size (latency) and the scoring pass's.
        search: ``"auto"`` (exhaustive up to ``max_exhaustive`` combinations, else beam),
            ``"exhaustive"`` or ``"beam"``.
        beam_width: partial assignments kept per exit by the beam.
        polish_starts: the beam's best points that coordinate descent starts from.

    Returns:
        :class:`CalibrationResult`; ``model.exit_config`` is not modified.

    Raises:
        ValueError: an invalid target, or targets no combination meets (the message gives
            the best value reached among the combinations scored, with the other targets met).
    """
    from .latency import LatencyProfile, measure_latency

    if max_drop is not None and not (0 <= max_drop <= 1):
        raise ValueError(f"max_drop is a fraction in [0, 1] (0.005 = 0.5 pt), got {max_drop}")
    if min_accuracy is not None and not (0 <= min_accuracy <= 1):
        raise ValueError(f"min_accuracy is a fraction in [0, 1], got {min_accuracy}")
    if max_flops is not None and not (max_flops > 0 and math.isfinite(max_flops)):
        raise ValueError(f"max_flops is a fraction of the backbone's FLOPs (> 0, e.g. 0.5), got {max_flops}")
    if max_latency is not None and not (max_latency > 0 and math.isfinite(max_latency)):
        raise ValueError(f"max_latency is seconds per sample (> 0), got {max_latency}")
    if exit_fraction is not None and not (0 <= exit_fraction <= 1):
        raise ValueError(f"exit_fraction is a share in [0, 1], got {exit_fraction}")
    if search not in ("auto", "exhaustive", "beam"):
        raise ValueError(f"search must be 'auto', 'exhaustive' or 'beam', got {search!r}")
    if path_times is not None and (latency not in (None, False) or max_latency is not None):
        raise ValueError("path_times is a time model of its own: give it or latency / max_latency "
                         "(which use a LatencyProfile), not both")
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")
    if all(t is None for t in (max_drop, min_accuracy, max_flops, max_latency, exit_fraction)):
        max_drop = 0.005

    ece = temps = None
    if temperature:
        if table is not None:
            raise ValueError("temperature=True rescores the data after folding: do not pass table=")
        logits, y = collect_logits(model, val, batch_size=batch_size, device=device)
        temps = [fit_temperature(z, y) for z in logits]
        temps = fold_temperature(model, temps, _first_inputs(val, 256).to(device))
        ece = {"before": [expected_calibration_error(z, y) for z in logits],
               "after": [expected_calibration_error(z.double() / t, y) for z, t in zip(logits, temps)]}
    table = table or collect_exit_outputs(model, val, criterion=criterion, batch_size=batch_size,
                                          device=device)
    n, m = table.score.shape
    if n == 1:
        raise ValueError("the model has a single exit: there are no thresholds to calibrate")
    cands = candidates or candidate_thresholds(table, per_exit)
    if len(cands) != n - 1:
        raise ValueError(f"candidates: expected {n - 1} lists (one per side branch), got {len(cands)}")
    # as the engine compares them, sorted, without repeats
    cands = [sorted(set(_engine_thresholds(table, torch.as_tensor(list(c), dtype=torch.float64)).tolist()))
             for c in cands]
    if any(not c for c in cands):
        raise ValueError("candidates: every side branch needs at least one threshold")
    if any(not t >= 0 for c in cands for t in c):
        raise ValueError("candidates: thresholds must be >= 0 and not NaN")
    if exit_fraction is not None:
        cands[0] = [_exit_fraction_threshold(table, exit_fraction)]
    flops = flops or profile_flops(model)
    if latency is True or (max_latency is not None and latency is None):
        x = _first_inputs(val, batch_size).to(device)
        reps = -(-batch_size // x.shape[0])
        latency = measure_latency(model, x.repeat(reps, *[1] * (x.dim() - 1))[:batch_size],
                                  criterion=table.criterion)
    if latency is False:
        latency = None
    if latency is not None:
        if not isinstance(latency, LatencyProfile) or latency.num_exits != n:
            raise ValueError(f"latency must be a LatencyProfile for {n} exits")
    costs = _Costs(m, flops, path_times, latency)
    if path_times is not None and len(path_times) != n:
        raise ValueError(f"path_times: expected {n} values (one per exit), got {len(path_times)}")

    final_acc = table.exit_accuracy()[-1]
    acc_goal = None
    if max_drop is not None:
        acc_goal = final_acc - max_drop
    if min_accuracy is not None:
        acc_goal = min_accuracy if acc_goal is None else max(acc_goal, min_accuracy)
    goal = _Goal(min_accuracy=acc_goal,
                 max_flops=None if max_flops is None else max_flops * flops.backbone,
                 max_time=max_latency, cost="time" if costs.timed else "flops")
    if max_latency is not None:
        goal.cost = "time"

    combos = math.prod(len(c) for c in cands)
    method = search if search != "auto" else ("exhaustive" if combos <= max_exhaustive else "beam")
    if method == "exhaustive":
        thr, good, counts = _exhaustive(table, cands)
    else:
        thr, good, counts = _beam_search(table, cands, costs, goal, beam_width)
        # coordinate descent from the best few points the beam found
        for start in _ranked(goal, costs.metrics(good, counts), polish_starts):
            t2, g2, c2 = _polish(table, cands, costs, goal, thr[start])
            thr, good, counts = torch.cat([thr, t2]), torch.cat([good, g2]), torch.cat([counts, c2])
    scored = thr.shape[0]
    # one row per distinct combination
    _, inverse = torch.unique(thr, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), scored, dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(scored), reduce="amin")
    first = first.sort().values
    thr, good, counts = thr[first], good[first], counts[first]
    mt = costs.metrics(good, counts)
    i = goal.best(mt)
    if i is None:
        raise TargetUnreachable(_unreachable(goal, mt, flops.backbone))

    thr_list = thr.tolist()
    rows = []
    for g in range(thr.shape[0]):
        f = mt["fractions"][g].tolist()
        rows.append({
            "thresholds": thr_list[g],
            "accuracy": float(mt["accuracy"][g]),
            "exit_fractions": f,
            "flops": float(mt["flops"][g]),
            "flops_fraction": float(mt["flops"][g] / flops.backbone),
            "ideal_speedup": float(flops.backbone / mt["flops"][g]),
            "time_per_sample": None if mt["time"] is None else float(mt["time"][g]),
        })
    chosen = rows[i]
    target = {"min_accuracy": acc_goal, "max_flops": max_flops,
              "max_flops_abs": goal.max_flops, "max_latency": max_latency,
              "exit_fraction": exit_fraction, "met": True, "cost": goal.cost}

    engine = None
    if latency is not None or test is not None:
        from .engine import EarlyExitEngine

        engine = EarlyExitEngine(model, chosen["thresholds"], criterion=table.criterion)
    if latency is not None:
        from .timing import time_per_sample

        x = _first_inputs(val, max(batch_size, min(m, 4 * batch_size))).to(device)
        chosen["time_measured"] = time_per_sample(engine, x, batch_size, repeats=5).median
        if max_latency is not None and chosen["time_measured"] > max_latency:
            import warnings

            warnings.warn(
                f"calibrate: the chosen thresholds were predicted at {1e3 * chosen['time_per_sample']:.4g} "
                f"ms/sample but measured at {1e3 * chosen['time_measured']:.4g} ms/sample, above "
                f"max_latency {1e3 * max_latency:.4g} ms (timing noise or a load on the machine?)",
                RuntimeWarning, stacklevel=2)
    test_report = None
    if test is not None:
        test_report = _measure_on(engine, test, flops, latency, batch_size, device)
        test_report = {"predicted": {k: chosen[k] for k in ("accuracy", "exit_fractions", "flops",
                                                            "flops_fraction", "time_per_sample")},
                       "measured": test_report}
    return CalibrationResult(rows=rows, chosen=chosen, final_accuracy=final_acc, target=target,
                             search={"method": method, "scored": scored, "combinations": combos},
                             temperature=temps, ece=ece, test=test_report)


def _measure_on(engine, data, flops: FlopProfile, latency, batch_size: int, device) -> dict:
    """Run the engine over ``data``: accuracy, exit shares, FLOPs and (with a latency
    profile) time per sample at ``batch_size``."""
    from .timing import time_per_sample

    loader = data if isinstance(data, torch.utils.data.DataLoader) else \
        torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    correct, counts, total, xs = 0, None, 0, []
    for x, y in loader:
        x = x.to(device)
        res = engine(x)
        correct += int((res.pred.cpu() == y).sum())
        counts = res.counts if counts is None else [a + b for a, b in zip(counts, res.counts)]
        total += y.shape[0]
        if latency is not None and sum(t.shape[0] for t in xs) < 4 * batch_size:
            xs.append(x)
    if total == 0:
        raise ValueError("test is empty")
    frac = [c / total for c in counts]
    fl = float(np.dot(frac, [flops.path(n) for n in range(flops.num_exits)]))
    out = {"accuracy": correct / total, "exit_fractions": frac, "flops": fl,
           "flops_fraction": fl / flops.backbone, "time_per_sample": None, "samples": total}
    if latency is not None:
        out["time_per_sample"] = time_per_sample(engine, torch.cat(xs), batch_size, repeats=5).median
    return out
