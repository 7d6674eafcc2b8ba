"""Wall-clock timing helpers: medians over repeats, CUDA-synchronised when needed."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "time_fn", "time_per_sample"]


@dataclass
class Timing:
    """Seconds per call: median, 20th and 80th percentiles over ``repeats`` runs."""

    median: float
    p20: float
    p80: float
    repeats: int

    def scaled(self, factor: float) -> "Timing":
        return Timing(self.median * factor, self.p20 * factor, self.p80 * factor, self.repeats)


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1,
            device: torch.device | None = None) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        runs.append(time.perf_counter() - t0)
    runs.sort()
    q = statistics.quantiles(runs, n=5) if len(runs) >= 2 else [runs[0]] * 4
    return Timing(statistics.median(runs), q[0], q[-1], len(runs))


@torch.inference_mode()
def time_per_sample(step: Callable[[torch.Tensor], object], x: torch.Tensor, batch_size: int,
                    *, repeats: int = 5, warmup: int = 1) -> Timing:
    """Seconds per sample of running ``step`` over ``x`` [M, ...] in batches of ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    m = x.shape[0]
    if m == 0:
        raise ValueError("x must hold at least one sample to time")
    batches = [x[i:i + batch_size] for i in range(0, m, batch_size)]

    def run():
        for xb in batches:
            step(xb)

    return time_fn(run, repeats=repeats, warmup=warmup, device=x.device).scaled(1.0 / m)
