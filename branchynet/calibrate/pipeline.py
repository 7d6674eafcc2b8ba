"""calibrate(): from the targets to a :class:`CalibrationResult`, one step per function
(check the targets, scale temperatures, score the exits, pick the candidates and the time
model, search, run the chosen thresholds)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..flops import FlopProfile, profile_flops
from ..models.branchynet import BranchyNet
from .exit_table import (ExitTable, _engine_thresholds, _first_inputs, candidate_thresholds, check_split,
                         collect_exit_outputs)
from .result import CalibrationResult, _measure_on, _rows
from .search import TargetUnreachable, _Costs, _exit_fraction_threshold, _Goal, _unreachable, search_thresholds
from .temperature import _restore, _scale

__all__ = ["calibrate"]


@dataclass
class _Targets:
    """What the chosen point must meet: calibrate's target arguments, checked; with none
    given, ``max_drop=0.005``."""

    max_drop: float | None = None
    min_accuracy: float | None = None
    max_flops: float | None = None       # fraction of the backbone's FLOPs
    max_latency: float | None = None     # seconds per sample
    exit_fraction: float | None = None   # share leaving at the first branch

    def __post_init__(self) -> None:
        if self.max_drop is not None and not (0 <= self.max_drop <= 1):
            raise ValueError(f"max_drop is a fraction in [0, 1] (0.005 = 0.5 pt), got {self.max_drop}")
        if self.min_accuracy is not None and not (0 <= self.min_accuracy <= 1):
            raise ValueError(f"min_accuracy is a fraction in [0, 1], got {self.min_accuracy}")
        if self.max_flops is not None and not (self.max_flops > 0 and math.isfinite(self.max_flops)):
            raise ValueError(f"max_flops is a fraction of the backbone's FLOPs (> 0, e.g. 0.5), got {self.max_flops}")
        if self.max_latency is not None and not (self.max_latency > 0 and math.isfinite(self.max_latency)):
            raise ValueError(f"max_latency is seconds per sample (> 0), got {self.max_latency}")
        if self.exit_fraction is not None and not (0 <= self.exit_fraction <= 1):
            raise ValueError(f"exit_fraction is a share in [0, 1], got {self.exit_fraction}")
        if all(t is None for t in (self.max_drop, self.min_accuracy, self.max_flops, self.max_latency,
                                   self.exit_fraction)):
            self.max_drop = 0.005

    def goal(self, final_accuracy: float, flops: FlopProfile, timed: bool) -> _Goal:
        """The search's goal: the accuracy floor from ``max_drop`` below the final exit's
        and ``min_accuracy`` (the higher), absolute FLOPs, and time as the cost when a
        time model is there."""
        acc_goal = None
        if self.max_drop is not None:
            acc_goal = final_accuracy - self.max_drop
        if self.min_accuracy is not None:
            acc_goal = self.min_accuracy if acc_goal is None else max(acc_goal, self.min_accuracy)
        return _Goal(min_accuracy=acc_goal,
                     max_flops=None if self.max_flops is None else self.max_flops * flops.backbone,
                     max_time=self.max_latency,
                     cost="time" if timed or self.max_latency is not None else "flops")

    def report(self, goal: _Goal) -> dict:
        """:attr:`CalibrationResult.target`."""
        return {"min_accuracy": goal.min_accuracy, "max_flops": self.max_flops,
                "max_flops_abs": goal.max_flops, "max_latency": self.max_latency,
                "exit_fraction": self.exit_fraction, "met": True, "cost": goal.cost}


def _check_search(search: str, beam_width, path_times, latency, max_latency) -> None:
    if search not in ("auto", "exhaustive", "beam"):
        raise ValueError(f"search must be 'auto', 'exhaustive' or 'beam', got {search!r}")
    if path_times is not None and (latency not in (None, False) or max_latency is not None):
        raise ValueError("path_times is a time model of its own: give it or latency / max_latency "
                         "(which use a LatencyProfile), not both")
    if isinstance(beam_width, bool) or not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an int >= 1, got {beam_width!r}")


def _candidates(table: ExitTable, candidates, per_exit: int, exit_fraction: float | None) -> list:
    """One sorted list of distinct thresholds per side branch, as the engine compares
    them; the first branch's is the one matching ``exit_fraction`` when that is given."""
    n = table.num_exits
    cands = candidates or candidate_thresholds(table, per_exit)
    if len(cands) != n - 1:
        raise ValueError(f"candidates: expected {n - 1} lists (one per side branch), got {len(cands)}")
    cands = [sorted(set(_engine_thresholds(table, torch.as_tensor(list(c), dtype=torch.float64)).tolist()))
             for c in cands]
    if any(not c for c in cands):
        raise ValueError("candidates: every side branch needs at least one threshold")
    if any(not t >= 0 for c in cands for t in c):
        raise ValueError("candidates: thresholds must be >= 0 and not NaN")
    if exit_fraction is not None:
        cands[0] = [_exit_fraction_threshold(table, exit_fraction)]
    return cands


def _latency_profile(model: BranchyNet, val, latency, max_latency, table: ExitTable, batch_size: int, device):
    """The :class:`~branchynet.latency.LatencyProfile` to predict times with, measured at
    ``batch_size`` on the first inputs of ``val`` when asked (``latency=True``, or a
    ``max_latency`` without a profile); None for no latency model."""
    from ..latency import LatencyProfile, measure_latency

    if latency is True or (max_latency is not None and latency is None):
        x = _first_inputs(val, batch_size).to(device)
        reps = -(-batch_size // x.shape[0])
        latency = measure_latency(model, x.repeat(reps, *[1] * (x.dim() - 1))[:batch_size],
                                  criterion=table.criterion)
    if latency is False or latency is None:
        return None
    if not isinstance(latency, LatencyProfile) or latency.num_exits != table.num_exits:
        raise ValueError(f"latency must be a LatencyProfile for {table.num_exits} exits")
    return latency


def _run_chosen(model: BranchyNet, chosen: dict, table: ExitTable, val, test, flops: FlopProfile, latency,
                max_latency, batch_size: int, device) -> dict | None:
    """Run the engine with the chosen thresholds: time it on ``val`` when there is a
    latency profile (``chosen["time_measured"]``), and measure it on ``test``. Returns
    :attr:`CalibrationResult.test`."""
    if latency is None and test is None:
        return None
    from ..engine import EarlyExitEngine

    engine = EarlyExitEngine(model, chosen["thresholds"], criterion=table.criterion)
    if latency is not None:
        from ..timing import time_per_sample

        m = table.score.shape[1]
        x = _first_inputs(val, max(batch_size, min(m, 4 * batch_size))).to(device)
        chosen["time_measured"] = time_per_sample(engine, x, batch_size, repeats=5).median
        if max_latency is not None and chosen["time_measured"] > max_latency:
            import warnings

            warnings.warn(
                f"calibrate: the chosen thresholds were predicted at {1e3 * chosen['time_per_sample']:.4g} "
                f"ms/sample but measured at {1e3 * chosen['time_measured']:.4g} ms/sample, above "
                f"max_latency {1e3 * max_latency:.4g} ms (timing noise or a load on the machine?)",
                RuntimeWarning, stacklevel=3)
    if test is None:
        return None
    return {"predicted": {k: chosen[k] for k in ("accuracy", "exit_fractions", "flops",
                                                 "flops_fraction", "time_per_sample")},
            "measured": _measure_on(engine, test, flops, latency, batch_size, device)}


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
            holds the values folded. Should calibration fail after folding (a target
            nothing meets, an interrupt), the weights are put back as they were.
        candidates: T values to try per side branch (default :func:`candidate_thresholds`).
        flops: FLOP profile (default counted from the model).
        path_times: seconds per sample to reach each exit
            (:func:`~branchynet.latency.measure_path_times`), a cruder time model than
            ``latency`` (no compaction).
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
            the best value reached among the combinations scored, with the other targets met);
            a validation label outside [0, C), or samples whose logits are NaN: these are
            errors, not skipped (the message counts them and gives the first), raised
            before anything is fitted or folded.
    """
    # Long only in its signature and docstring (the public keyword API); each step is a
    # function of its own above.
    targets = _Targets(max_drop, min_accuracy, max_flops, max_latency, exit_fraction)
    _check_search(search, beam_width, path_times, latency, max_latency)
    if temperature and table is not None:
        raise ValueError("temperature=True rescores the data after folding: do not pass table=")
    saved = []
    try:
        temps = ece = None
        if temperature:
            temps, ece, saved = _scale(model, val, batch_size=batch_size, device=device)
        return _search(model, val, table, targets, temps, ece, criterion=criterion, candidates=candidates,
                       per_exit=per_exit, exit_fraction=exit_fraction, flops=flops, path_times=path_times,
                       latency=latency, max_latency=max_latency, test=test, batch_size=batch_size,
                       device=device, search=search, beam_width=beam_width, polish_starts=polish_starts,
                       max_exhaustive=max_exhaustive)
    except BaseException:
        # calibration never leaves the model changed on error: the folded temperatures undone
        _restore(saved)
        raise


def _search(model, val, table, targets: _Targets, temps, ece, *, criterion, candidates, per_exit,
            exit_fraction, flops, path_times, latency, max_latency, test, batch_size, device, search,
            beam_width, polish_starts, max_exhaustive) -> CalibrationResult:
    """:func:`calibrate` after the temperatures are folded: score, check, search, report."""
    table = table or collect_exit_outputs(model, val, criterion=criterion, batch_size=batch_size,
                                          device=device)
    check_split(table.score.isnan(), table.target, table.num_classes or model.num_classes)
    n, m = table.score.shape
    if n == 1:
        raise ValueError("the model has a single exit: there are no thresholds to calibrate")
    cands = _candidates(table, candidates, per_exit, exit_fraction)
    flops = flops or profile_flops(model)
    latency = _latency_profile(model, val, latency, max_latency, table, batch_size, device)
    costs = _Costs(m, flops, path_times, latency)
    if path_times is not None and len(path_times) != n:
        raise ValueError(f"path_times: expected {n} values (one per exit), got {len(path_times)}")

    final_acc = table.exit_accuracy()[-1]
    goal = targets.goal(final_acc, flops, costs.timed)
    thr, good, counts, info = search_thresholds(table, cands, costs, goal, search=search,
                                                max_exhaustive=max_exhaustive, beam_width=beam_width,
                                                polish_starts=polish_starts)
    mt = costs.metrics(good, counts)
    i = goal.best(mt)
    if i is None:
        raise TargetUnreachable(_unreachable(goal, mt, flops.backbone))
    rows = _rows(thr, mt, flops)
    test_report = _run_chosen(model, rows[i], table, val, test, flops, latency, max_latency, batch_size, device)
    return CalibrationResult(rows=rows, chosen=rows[i], final_accuracy=final_acc, target=targets.report(goal),
                             search=info, temperature=temps, ece=ece, test=test_report)
