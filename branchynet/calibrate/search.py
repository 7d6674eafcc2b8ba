"""The threshold search: which combination of per-exit thresholds meets the targets at
the least cost, scored from the cached exit scores (:mod:`.exit_table`).

With N exits and K candidates per side branch there are K^(N-1) combinations (22^7 for
8 exits), so they are not all scored: small grids are (exhaustive), larger ones are
searched exit by exit (a beam over the accuracy / cost Pareto front of partial
assignments, the last side branch scored for every candidate, then coordinate descent
from the chosen point). The work per exit is bounded by the beam, so the cost grows
linearly with N, and memory holds at most ``beam_width x samples`` survivor masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..flops import FlopProfile
from .exit_table import ExitTable, _engine_thresholds, _split

__all__ = ["TargetUnreachable", "search_thresholds"]


class TargetUnreachable(ValueError):
    """No threshold combination meets the calibration targets; the message says the best
    value reached for each target with the others met."""


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


def _distinct(thr: torch.Tensor, good: torch.Tensor, counts: torch.Tensor):
    """One row per distinct combination (its first occurrence), in the order scored."""
    scored = thr.shape[0]
    _, inverse = torch.unique(thr, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), scored, dtype=torch.int64).scatter_reduce(
        0, inverse, torch.arange(scored), reduce="amin")
    first = first.sort().values
    return thr[first], good[first], counts[first]


def search_thresholds(table: ExitTable, cands: list, costs: _Costs, goal: _Goal, *, search: str = "auto",
                      max_exhaustive: int = 4096, beam_width: int = 32, polish_starts: int = 4):
    """Score the combinations of ``cands`` (one list per side branch) that the search
    visits: all of them (``"exhaustive"``), or a beam then coordinate descent from its
    ``polish_starts`` best points (``"beam"``); ``"auto"`` is exhaustive up to
    ``max_exhaustive`` combinations.

    Returns:
        ``(thresholds [R, N-1], correct [R], counts [R, N], info)``, one row per distinct
        combination; ``info`` holds ``method``, ``scored`` (rows scored, repeats
        included) and ``combinations`` (the size of the full grid).
    """
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
    thr, good, counts = _distinct(thr, good, counts)
    return thr, good, counts, {"method": method, "scored": scored, "combinations": combos}
