"""A B-model against its own backbone, timed per batch size (``branchynet bench``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BenchRow", "BenchResult", "bench_against_backbone"]


@dataclass
class BenchRow:
    """One batch size: seconds per sample (medians) of the backbone and of the engine."""

    batch: int
    backbone: float
    engine: float
    ideal_gain: float

    @property
    def gain(self) -> float:
        return self.backbone / self.engine

    @property
    def efficiency(self) -> float:
        """The gain as a share of the FLOP ideal: what the engine's overhead leaves."""
        return self.gain / self.ideal_gain


@dataclass
class BenchResult:
    """The engine's thresholds, its exit profile on the samples, its backend, one row per
    batch size."""

    thresholds: list
    exit_fractions: list
    backend: str
    rows: list


def bench_against_backbone(model, x: torch.Tensor, batch_sizes, *, backend: str = "auto", repeats: int = 5,
                           samples_b1: int = 200, per_sample_b1: bool = False) -> BenchResult:
    """Time ``model``'s engine (at its own thresholds) and its backbone alone on ``x``.

    Args:
        model: a BranchyNet in eval mode, on ``x``'s device.
        x: samples [N, ...]; every batch size must be at most N.
        batch_sizes: the batch sizes to time.
        backend: the exit-op backend.
        repeats: timing repeats (medians reported).
        samples_b1: samples timed at B=1 (fewer than N: one at a time is slow).
        per_sample_b1: at B=1, time the engine's per-sample mode.
    """
    from .engine import EarlyExitEngine
    from .flops import profile_flops
    from .timing import time_per_sample

    engine = EarlyExitEngine(model, backend=backend)
    baseline = model.backbone_only().eval()
    res = engine(x)
    ideal = profile_flops(model).ideal_speedup(res.exit_fractions)
    rows = []
    for b in batch_sizes:
        xs = x[: max(b, samples_b1 if b == 1 else x.shape[0])]
        tb = time_per_sample(baseline, xs, b, repeats=repeats)
        te = time_per_sample(engine.per_sample if b == 1 and per_sample_b1 else engine, xs, b, repeats=repeats)
        rows.append(BenchRow(b, tb.median, te.median, ideal))
    return BenchResult(list(engine.thresholds), res.exit_fractions, engine.backend_for(x.device), rows)
