"""Latency of the batched engine predicted from measured segment times.

The engine runs stage n, branch n and the exit op on the samples still in flight, so in
a batch of B samples segment n sees ``k_n = B * r_n`` of them, where ``r_n`` is the share
of samples that reach exit n. Each segment is timed once at a ladder of batch sizes
(1, 2, 4, ..., B); the time of any threshold combination is then predicted from its exit
profile alone, without running it::

    time per sample = sum_n t_n(B * r_n) / B,   r_n = f_n + ... + f_{N-1}

with ``t_n`` interpolated linearly between the measured sizes (``t_n(0) = 0``: a
segment no sample reaches is skipped, which is what the engine does). A fractional
``k`` is an expectation: ``t_n(0.3) = 0.3 t_n(1)`` is the mean cost when 30 % of the
batches have one survivor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import criterion_id
from .models.branchynet import BranchyNet

__all__ = ["LatencyProfile", "measure_latency", "measure_path_times"]


@dataclass
class LatencyProfile:
    """Measured seconds per call of every segment at several batch sizes.

    Attributes:
        batch_size: B, the batch size the engine runs at (the largest size measured).
        sizes: the batch sizes measured, ascending, the last one ``batch_size``.
        segment: N lists of ``len(sizes)`` seconds: segment n (the gather of the
            survivors for n > 0, stage n, branch n and the exit op) at each size.
        device: where it was measured, for the record.
    """

    batch_size: int
    sizes: list
    segment: list
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        sizes = [int(s) for s in self.sizes]
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1 or sizes[-1] != self.batch_size:
            raise ValueError(f"sizes must be ascending distinct ints >= 1 ending at batch_size "
                             f"{self.batch_size}, got {self.sizes}")
        self.sizes = sizes
        if not self.segment or any(len(s) != len(sizes) for s in self.segment):
            raise ValueError(f"segment must hold one list of {len(sizes)} times (one per size) per "
                             f"exit, got {[len(s) for s in self.segment]}")
        self.segment = [[float(t) for t in s] for s in self.segment]

    @property
    def num_exits(self) -> int:
        return len(self.segment)

    def predict(self, fractions) -> np.ndarray:
        """Predicted seconds per sample for exit profiles.

        Args:
            fractions: [R, N] (or [N]) shares of samples leaving at each exit, rows sum to 1.

        Returns:
            [R] float64 seconds per sample (a float for one profile).
        """
        f = np.asarray(fractions, dtype=np.float64)
        one = f.ndim == 1
        f = np.atleast_2d(f)
        if f.shape[1] != self.num_exits:
            raise ValueError(f"fractions: expected {self.num_exits} values per row, got {f.shape[1]}")
        # share reaching exit n = the share leaving at n or later
        reach = np.flip(np.cumsum(np.flip(f, 1), 1), 1)
        reach[:, 0] = 1.0
        k = self.batch_size * np.clip(reach, 0.0, 1.0)
        xs = np.array([0.0] + self.sizes)
        total = np.zeros(f.shape[0])
        for n, times in enumerate(self.segment):
            total += np.interp(k[:, n], xs, np.array([0.0] + times))
        out = total / self.batch_size
        return float(out[0]) if one else out

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "sizes": list(self.sizes),
                "segment": [list(s) for s in self.segment], "device": self.device}


def _ladder(batch_size: int) -> list:
    sizes, s = [], 1
    while s < batch_size:
        sizes.append(s)
        s *= 2
    return sizes + [batch_size]


@torch.inference_mode()
def measure_latency(model: BranchyNet, example: torch.Tensor, *, criterion: str | None = None,
                    backend: str = "auto", repeats: int = 5,
                    sizes: Sequence[int] | None = None) -> LatencyProfile:
    """Time every segment of ``model`` at the batch sizes it can see in the engine.

    Args:
        model: the BranchyNet, on the device to time.
        example: [B, ...] inputs on the model's device; B is the engine's batch size.
        criterion: the exit criterion (default the model's).
        backend: the exit-op backend timed (as the engine's ``backend``).
        repeats: timed calls per segment and size (the median is kept).
        sizes: batch sizes to time (default 1, 2, 4, ... up to B, and B).

    Returns:
        :class:`LatencyProfile` at batch size B.
    """
    from .ops import bind
    from .ops._backends import new_outputs
    from .timing import time_fn

    b = example.shape[0]
    if b < 1:
        raise ValueError("example must hold at least one sample [B, ...] (B is the batch size)")
    sizes = _ladder(b) if sizes is None else sorted({int(s) for s in sizes} | {b})
    if sizes[0] < 1 or sizes[-1] > b:
        raise ValueError(f"sizes must lie in [1, {b}] (the example's batch), got {sizes}")
    cid = criterion_id(criterion or model.exit_config.criterion)
    op = bind(example.device, backend)  # the exit op as the engine runs it
    was_training = model.training
    model.eval()
    n_exits = model.num_exits
    segment = [[] for _ in range(n_exits)]
    try:
        h_in = example
        for n, (stage, branch) in enumerate(zip(model.stages, model.branches)):
            h_out = stage(h_in)
            z = branch(h_out)
            last = n == n_exits - 1
            for k in sizes:
                hk = h_in[:k]
                idx = torch.arange(k, device=example.device)
                rows = idx.clone()
                outs = new_outputs(k, z.shape[1], z.dtype, z.device)

                def run(hk=hk, idx=idx, rows=rows, outs=outs, n=n, last=last, stage=stage, branch=branch):
                    h = op.gather(hk, idx) if n > 0 else hk
                    # threshold 0: nobody leaves, every survivor's row is compacted (the
                    # most work the op can do after the decision)
                    return op.step(branch(stage(h)), rows, 0.0, n, outs, cid, last)

                segment[n].append(time_fn(run, repeats=repeats, device=example.device).median)
            h_in = h_out
    finally:
        model.train(was_training)
    return LatencyProfile(batch_size=b, sizes=sizes, segment=segment, device=str(example.device))


def measure_path_times(model: BranchyNet, example: torch.Tensor, *, repeats: int = 10) -> list:
    """Measured seconds per sample of reaching each exit: the segments on the way (stage,
    branch and exit op) timed at the batch size B of ``example`` [B, ...].

    Path n is this time model's prediction for every sample leaving at exit n, so the
    cost of an exit profile ``f`` is ``f @ paths``: a cruder model than
    :meth:`LatencyProfile.predict`, which times the smaller batches after compaction.
    """
    profile = measure_latency(model, example, repeats=repeats, sizes=[example.shape[0]])
    return profile.predict(np.eye(profile.num_exits)).tolist()
