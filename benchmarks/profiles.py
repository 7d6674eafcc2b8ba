"""Helpers of the benchmark suites: exit profiles, input cycling, the grid, timing rounds.

Nothing here needs a GPU; the suites (``test_bench_*.py``) and the unit tests
(``tests/test_bench_helpers.py``) import it.

Exit profiles. A profile is the fraction of samples leaving at each exit. The paper's
profiles (Table I: B-LeNet 94.3/5.7 %, B-AlexNet 65.6/25.2/9.2 %, B-ResNet-110
41.5/13.8/44.7 %) are reproduced on random inputs and a randomly initialised network by
choosing each entropy threshold as a quantile of the entropies of the samples that reach
that exit: what is timed then does the work the paper's trained network did, whatever
the weights. ``all_exit`` sends every sample out at the first branch, ``none_exit``
sends every sample to the final classifier (all thresholds 0).
"""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

import branchynet as bn
from branchynet._build import env_flag
from branchynet.engine import EarlyExitEngine
from branchynet.exits import entropy

__all__ = [
    "PAPER_PROFILES",
    "MODEL_NAMES",
    "PROFILE_NAMES",
    "BATCH_SIZES",
    "POOL_SIZE",
    "SAMPLES_PER_ROUND",
    "ProfileThresholds",
    "thresholds_for_profile",
    "split_threshold",
    "profile_fractions",
    "stratified_order",
    "BatchCycler",
    "make_model",
    "make_pool",
    "engine_cases",
    "exit_op_cases",
    "exit_op_bytes",
    "fractions_from_counts",
    "choose_rounds",
    "calibrate",
    "engine_providers",
    "engine_kwargs",
    "reach_fractions",
    "segment_rows",
    "exit_op_providers",
    "raise_dynamo_limits",
    "check_exit_result",
    "full_scope",
    "compile_on_cpu",
    "cpu_name",
    "bench_device",
    "target_seconds",
]

#: Exit fractions of Table I of the paper (arXiv 1709.01686), per network.
PAPER_PROFILES = {
    "b_lenet": [0.943, 0.057],
    "b_alexnet": [0.656, 0.252, 0.092],
    "b_resnet110": [0.415, 0.138, 0.447],
}
MODEL_NAMES = ("b_lenet", "b_alexnet", "b_resnet110")
PROFILE_NAMES = ("paper", "all_exit", "none_exit")
BATCH_SIZES = (1, 8, 64, 256, 1024)
POOL_SIZE = 1024
SEED = 0
#: Samples timed per round: a round at B = 1 runs 32 consecutive samples, so its time
#: is the mean over a window that carries the profile (one sample alone would time one
#: exit, and the median over single-sample rounds would be the commonest exit's time,
#: not the mean cost the ideal speedup describes).
SAMPLES_PER_ROUND = 32


# --- environment ------------------------------------------------------------------------

def full_scope() -> bool:
    """BRANCHYNET_BENCH_FULL=1: the whole grid on the CPU too (the CUDA default)."""
    return env_flag("BRANCHYNET_BENCH_FULL")


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def compile_on_cpu() -> bool:
    """BRANCHYNET_BENCH_COMPILE_CPU=1: run the torch.compile providers on the CPU too."""
    return env_flag("BRANCHYNET_BENCH_COMPILE_CPU")


def bench_device() -> torch.device:
    """BRANCHYNET_BENCH_DEVICE if set, else CUDA when there is one, else the CPU."""
    name = os.environ.get("BRANCHYNET_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def target_seconds(device: torch.device) -> float:
    """Timed seconds per benchmark (BRANCHYNET_BENCH_SECONDS; default 0.5 on CUDA, 1 on CPU).

    0.5 s on a GPU is thousands of rounds of a 100-us call and keeps the full grid
    (~450 benchmarks) near 10 minutes.
    """
    v = os.environ.get("BRANCHYNET_BENCH_SECONDS")
    if v:
        return float(v)
    return 0.5 if torch.device(device).type == "cuda" else 1.0


# --- the grid ---------------------------------------------------------------------------

def engine_cases(device: torch.device | str, full: bool | None = None) -> list:
    """(model, batch, profile) triples the engine suite runs on ``device``.

    CUDA, or ``full``: every model x B in {1, 8, 64, 256, 1024} x every profile. CPU by
    default (2 cores, < 10 minutes): B-LeNet and B-AlexNet at B <= 256, B-ResNet-110 at
    B <= 64, the paper's profile only, plus all-exit and none-exit for B-LeNet at B = 64.
    """
    dev = torch.device(device)
    if full is None:
        full = full_scope()
    if dev.type == "cuda" or full:
        return [(m, b, p) for m in MODEL_NAMES for b in BATCH_SIZES for p in PROFILE_NAMES]
    cases = []
    for m in MODEL_NAMES:
        sizes = (1, 8, 64) if m == "b_resnet110" else (1, 8, 64, 256)
        for b in sizes:
            cases.append((m, b, "paper"))
            if m == "b_lenet" and b == 64:
                cases += [(m, b, "all_exit"), (m, b, "none_exit")]
    return cases


def exit_op_cases() -> list:
    """(B, C) pairs of the exit-op suite."""
    return [(b, c) for b in (1, 64, 1024, 16384) for c in (10, 100, 1000)]


def profile_fractions(model_name: str, profile: str, num_exits: int) -> list:
    """Target fractions per exit for a named profile."""
    if profile == "paper":
        f = PAPER_PROFILES[model_name]
        if len(f) != num_exits:
            raise ValueError(f"{model_name}: the paper's profile has {len(f)} exits, the model {num_exits}")
        return list(f)
    if profile == "all_exit":
        return [1.0] + [0.0] * (num_exits - 1)
    if profile == "none_exit":
        return [0.0] * (num_exits - 1) + [1.0]
    raise ValueError(f"unknown profile {profile!r}; known: {PROFILE_NAMES}")


# --- models and inputs ------------------------------------------------------------------

def make_model(name: str, device: torch.device | str = "cpu", seed: int = SEED) -> bn.BranchyNet:
    """One of the paper's networks with its default (seeded random) init, in eval mode."""
    from branchynet.models.registry import build_model

    torch.manual_seed(seed)
    return build_model(name).to(device).eval()


def make_pool(model: bn.BranchyNet, n: int = POOL_SIZE, seed: int = SEED + 1,
              device: torch.device | str | None = None) -> torch.Tensor:
    """n random inputs [n, *input_shape] (standard normal, seeded; never zeros)."""
    if model.input_shape is None:
        raise ValueError("the model has no input_shape")
    if device is None:
        device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *model.input_shape), generator=g).to(device)


# --- thresholds for a profile -----------------------------------------------------------

class ProfileThresholds(NamedTuple):
    """Thresholds that realise an exit profile on a pool of inputs.

    Attributes:
        thresholds: N-1 entropy thresholds (floats, exact float32 values).
        realised: N fractions the engine gives on the pool with these thresholds.
        exits: [M] int64 (CPU), the exit each pool sample takes in the engine.
        target: the N fractions asked for.
    """

    thresholds: list
    realised: list
    exits: torch.Tensor
    target: list


def split_threshold(sorted_h: np.ndarray, want: int) -> tuple:
    """A float32 threshold T with ``#(h < T)`` as close to ``want`` as ties allow.

    ``sorted_h`` holds float32 entropies in ascending order. T sits halfway between the
    last value that leaves and the first that stays, so a backend whose entropy differs
    by a few ulps from this one still splits the pool at the same place.
    """
    k = len(sorted_h)
    if k == 0 or want <= 0:
        return 0.0, 0
    if want >= k:
        top = float(sorted_h[-1])
        # Above every entropy by a margin no rounding difference can cross.
        return float(np.float32(top * 1.001 + 1e-6)), k
    # Achievable split points: i where sorted_h[i-1] < sorted_h[i] (plus 0 and k).
    cuts = np.flatnonzero(sorted_h[1:] > sorted_h[:-1]) + 1
    cuts = np.concatenate([[0], cuts, [k]])
    i = int(cuts[np.argmin(np.abs(cuts - want))])
    if i == 0:
        return 0.0, 0
    if i == k:
        return float(np.float32(float(sorted_h[-1]) * 1.001 + 1e-6)), k
    lo, hi = np.float32(sorted_h[i - 1]), np.float32(sorted_h[i])
    mid = np.float32((float(lo) + float(hi)) / 2)
    if not (lo < mid <= hi):  # adjacent float32 values: hi itself splits exactly
        mid = hi
    return float(mid), i


def _targets(fractions: Sequence[float], m: int) -> list:
    """Per-exit sample counts for fractions of m samples (cumulative rounding: sums to m)."""
    cum = np.cumsum(np.asarray(fractions, dtype=np.float64))
    cum = cum / cum[-1]
    edges = np.rint(cum * m).astype(int)
    return np.diff(np.concatenate([[0], edges])).tolist()


def fractions_from_counts(counts: Sequence[int]) -> list:
    total = float(sum(counts))
    return [c / total if total else 0.0 for c in counts]


@torch.inference_mode()
def thresholds_for_profile(model: bn.BranchyNet, x_pool: torch.Tensor, fractions: Sequence[float],
                           *, chunk: int = 256, check: bool = True) -> ProfileThresholds:
    """Entropy thresholds so that, on ``x_pool``, ``fractions[n]`` of it leaves at exit n.

    T_1 is a quantile of the exit-0 entropies of the whole pool; T_2 is chosen among the
    samples that stay, so that ``fractions[1]`` of the *whole* pool leaves at exit 1; and
    so on. The last exit takes the rest. Each realised count is within one sample of
    ``fractions[n] * len(x_pool)`` unless entropies tie exactly at the split point.

    Args:
        model: a BranchyNet (eval mode is set).
        x_pool: [M, ...] inputs on the model's device.
        fractions: N non-negative numbers (normalised to sum 1).
        chunk: rows per forward call (bounds memory).
        check: run the engine (torch backend) on the pool with the thresholds and report
            its exit fractions as ``realised`` (otherwise the fractions of this search).

    Returns:
        :class:`ProfileThresholds`.
    """
    n_exits = model.num_exits
    if len(fractions) != n_exits:
        raise ValueError(f"fractions: expected {n_exits} values, got {len(fractions)}")
    if any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be >= 0 and not all 0, got {list(fractions)}")
    model.eval()
    m = x_pool.shape[0]
    if m == 0:
        raise ValueError("x_pool is empty")
    want = _targets(fractions, m)
    thresholds, counts = [], []
    h = x_pool
    for n in range(n_exits - 1):
        stage, branch = model.stages[n], model.branches[n]
        hs, ents = [], []
        for i in range(0, h.shape[0], chunk):
            hi = stage(h[i:i + chunk])
            hs.append(hi)
            ents.append(entropy(branch(hi)).float())
        h = torch.cat(hs) if hs else h
        ent = torch.cat(ents).cpu().numpy() if ents else np.zeros(0, np.float32)
        # NaN entropies never exit (the documented NaN policy): sort them last.
        finite = np.where(np.isnan(ent), np.inf, ent).astype(np.float32)
        t, got = split_threshold(np.sort(finite), want[n])
        thresholds.append(t)
        counts.append(got)
        stay = torch.from_numpy(~(finite < np.float32(t))).to(h.device)
        h = h[stay]
        # Shortfalls and excesses of earlier exits move on to the later ones.
        if n + 1 < n_exits - 1:
            want[n + 1] = max(0, want[n + 1] + (sum(want[:n + 1]) - sum(counts)))
    counts.append(m - sum(counts))
    realised = fractions_from_counts(counts)
    exits = None
    if check:
        eng = EarlyExitEngine(model, thresholds=thresholds, backend="torch", criterion="entropy")
        parts, c = [], [0] * n_exits
        for i in range(0, m, chunk):
            r = eng(x_pool[i:i + chunk])
            parts.append(r.exit.cpu())
            c = [a + b for a, b in zip(c, r.counts)]
        exits = torch.cat(parts)
        realised = fractions_from_counts(c)
    return ProfileThresholds(thresholds, realised, exits, list(fractions))


# --- input cycling ----------------------------------------------------------------------

def stratified_order(exits: torch.Tensor, num_exits: int | None = None) -> torch.Tensor:
    """A permutation that spreads every exit's samples evenly through the pool.

    Sample j of the n_e samples of exit e gets the key (j + 0.5) / n_e; sorting by key
    interleaves the exits in proportion, so every window of w consecutive samples holds
    ``f_e * w`` samples of exit e to within one or two: each batch (and each round of
    B = 1 calls) carries the pool's profile. Within an exit the pool's order is kept.
    """
    exits = exits.to("cpu", torch.int64)
    m = exits.numel()
    if num_exits is None:
        num_exits = int(exits.max()) + 1 if m else 1
    key = torch.empty(m, dtype=torch.float64)
    for e in range(num_exits):
        idx = torch.nonzero(exits == e).flatten()
        if idx.numel():
            key[idx] = (torch.arange(idx.numel(), dtype=torch.float64) + 0.5) / idx.numel()
    # Tie-break by exit so the order is deterministic.
    key = key + exits.to(torch.float64) * 1e-9
    return torch.argsort(key, stable=True)


class BatchCycler:
    """Returns the next batch of ``batch_size`` rows of the pool on each call.

    Batches are contiguous views of the (reordered, once) pool, taken in turn and
    wrapping around, so a benchmark never times one small input over and over; at
    B = 1 it walks through every sample. When ``batch_size`` does not divide the pool,
    the last ``M mod B`` rows are never served.

    Args:
        x_pool: [M, ...] inputs, M >= batch_size.
        batch_size: rows per call.
        order: optional permutation of the M rows applied once (e.g. :func:`stratified_order`).
    """

    def __init__(self, x_pool: torch.Tensor, batch_size: int, order: torch.Tensor | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if x_pool.shape[0] < batch_size:
            raise ValueError(f"the pool holds {x_pool.shape[0]} rows, fewer than batch_size={batch_size}")
        if order is not None:
            x_pool = x_pool.index_select(0, order.to(x_pool.device))
        self.x = x_pool
        self.order = order
        self.batch_size = batch_size
        self.num_batches = x_pool.shape[0] // batch_size
        self._batches = [x_pool[i * batch_size:(i + 1) * batch_size] for i in range(self.num_batches)]
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        xb = self._batches[self.calls % self.num_batches]
        self.calls += 1
        return xb

    def reset(self) -> None:
        """Start again from the first batch (so every provider times the same samples)."""
        self.calls = 0

    def served_rows(self) -> torch.Tensor:
        """Pool rows (indices into the original pool) served since the last reset."""
        b = self.batch_size
        k = torch.arange(self.calls) % self.num_batches
        pos = (k[:, None] * b + torch.arange(b)).flatten()
        return self.order.cpu()[pos] if self.order is not None else pos


# --- timing rounds ----------------------------------------------------------------------

def interleaved_times(fa, fb, inputs, rounds: int) -> tuple:
    """Per round, the mean seconds per call of ``fa`` and then of ``fb`` over ``inputs``:
    the two alternate round by round, so a load that drifts hits both alike.

    Returns:
        ``(times_a, times_b)``, lists of ``rounds`` floats.
    """
    ta, tb = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for x in inputs:
            fa(x)
        t1 = time.perf_counter()
        for x in inputs:
            fb(x)
        t2 = time.perf_counter()
        ta.append((t1 - t0) / len(inputs))
        tb.append((t2 - t1) / len(inputs))
    return ta, tb


def choose_rounds(t_round: float, target_s: float, *, min_rounds: int, max_rounds: int,
                  cycle: int | None = None) -> int:
    """Rounds to time: ``target_s / t_round`` clamped to [min_rounds, max_rounds]; when
    that covers at least one ``cycle`` (rounds that walk the whole pool), a whole number
    of cycles, so the samples timed carry the pool's profile exactly."""
    r = int(math.ceil(target_s / max(t_round, 1e-9)))
    r = max(min_rounds, min(max_rounds, r))
    if cycle and r >= cycle:
        r = max(cycle, (r // cycle) * cycle)
    return r


def calibrate(step: Callable[[], object], iterations: int, *, warmup_s: float,
              min_warmup: int = 2, max_warmup: int | None = None) -> float:
    """Warm up, then time one round of ``iterations`` calls; return its seconds.

    Warm-up runs at least ``min_warmup`` calls and goes on while it is under
    ``warmup_s`` seconds and under ``max_warmup`` calls (a cycle of the pool, so every
    survivor count the timed rounds will see has been seen once). The first call pays
    for compilation, graph capture and allocator growth. ``step`` synchronises itself.
    """
    t0 = time.perf_counter()
    n = 0
    while n < min_warmup or (time.perf_counter() - t0 < warmup_s
                             and (max_warmup is None or n < max_warmup)):
        step()
        n += 1
    t0 = time.perf_counter()
    for _ in range(iterations):
        step()
    return time.perf_counter() - t0


def engine_providers(device: torch.device | str, batch: int) -> list:
    """Providers of the engine suite for ``device`` and batch size ``batch``.

    - ``backbone_eager``: the network without side branches, eager (the baseline).
    - ``backbone_compile``: the same through ``torch.compile`` (CUDA; CPU only with
      BRANCHYNET_BENCH_COMPILE_CPU=1).
    - ``backbone_cudagraph``: the same captured once per batch size in a CUDA graph.
    - ``naive``: :func:`branchynet.baselines.naive_early_exit` (softmax/log/sum/compare,
      boolean indexing per exit).
    - ``per_sample``: :meth:`EarlyExitEngine.per_sample`, the paper's one-at-a-time loop
      (B <= 64 on CUDA, B <= 8 on the CPU, where it is the slowest by far).
    - ``engine_<backend>``: :class:`EarlyExitEngine` with each backend available on
      the device (``cuda``/``triton``/``torch`` on CUDA, ``cpp``/``torch`` on the CPU;
      Triton only on CUDA: on the CPU it is the interpreter).
    - ``engine_<best>_compile``: the engine with ``compile=True`` (or
      BRANCHYNET_BENCH_COMPILE_MODE) and the device's best backend, where
      ``backbone_compile`` runs.
    - ``engine_<best>_buckets``: ``compile=True, buckets=True``: static graphs, one per
      power-of-two bucket (the CPU's alternative to dynamic-shape code), where
      ``backbone_compile`` runs, on the CPU.
    - ``engine_<best>_graphs``: ``compile="reduce-overhead"`` (bucketed CUDA graphs), CUDA.
    """
    from branchynet.ops import available_backends

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out = ["backbone_eager"]
    if cuda or compile_on_cpu():
        out.append("backbone_compile")
    if cuda:
        out.append("backbone_cudagraph")
    out.append("naive")
    if batch <= (64 if cuda else 8):
        out.append("per_sample")
    backends = [b for b in available_backends(dev) if cuda or b != "triton"]
    out += [f"engine_{b}" for b in backends]
    if cuda or compile_on_cpu():
        out.append(f"engine_{backends[0]}_compile")
    if cuda:
        out.append(f"engine_{backends[0]}_graphs")
    elif compile_on_cpu():
        out.append(f"engine_{backends[0]}_buckets")
    return out


def engine_kwargs(provider: str) -> dict:
    """EarlyExitEngine keyword arguments of an ``engine_*`` provider."""
    rest = provider[len("engine_"):]
    mode = os.environ.get("BRANCHYNET_BENCH_COMPILE_MODE") or True
    for suffix, extra in (("_compile", {"compile": mode}), ("_buckets", {"compile": mode, "buckets": True}),
                          ("_graphs", {"compile": "reduce-overhead"})):
        if rest.endswith(suffix):
            return {"backend": rest[: -len(suffix)], **extra}
    return {"backend": rest}


def reach_fractions(fractions: Sequence[float]) -> list:
    """Share of the samples that reach each exit (run its stage and branch)."""
    return [float(sum(fractions[n:])) for n in range(len(fractions))]


def segment_rows(batch: int, fractions: Sequence[float]) -> list:
    """``(rows, weight)`` per exit for the segment-time ideal: the rows stage n and its
    branch see in a call of ``batch`` samples with this profile. Where fewer than one
    row is expected (B = 1 and the deeper exits), the segment runs on one row in that
    share of the calls: ``(1, expected rows)``; otherwise ``(round(expected), 1)``."""
    out = []
    for r in reach_fractions(fractions):
        k = batch * r
        out.append((1, k) if k < 1 else (max(1, int(round(k))), 1.0))
    return out


def raise_dynamo_limits() -> None:
    """Let dynamo keep one graph per shape for every shape the suites run.

    One compiled graph per (model, batch size) and per exit-op shape: 15 backbones and 12
    op shapes share a few code objects, past dynamo's default limit of 8 (beyond which it
    silently falls back to eager and the "compiled" numbers would be eager ones).
    """
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 256))


def exit_op_providers(device: torch.device | str) -> list:
    """Providers of the exit-op suite: ``op_eager`` (exit_step_torch), ``op_compile``
    (torch.compile of it; CUDA, CPU with BRANCHYNET_BENCH_COMPILE_CPU=1), ``op_triton``,
    ``op_cuda`` (CUDA) and ``op_cpp`` (CPU) where the device has them, and ``copy`` (a
    device-to-device copy moving as many bytes as the op must)."""
    from branchynet.ops import available_backends

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    out = ["op_eager"]
    if cuda or compile_on_cpu():
        out.append("op_compile")
    avail = available_backends(dev)
    if cuda and "triton" in avail:
        out.append("op_triton")
    if "cuda" in avail:
        out.append("op_cuda")
    if "cpp" in avail:
        out.append("op_cpp")
    out.append("copy")
    return out


# --- correctness before timing ----------------------------------------------------------

def check_exit_result(res, ref, thresholds: Sequence[float], *, rel_tol: float = 1e-3) -> None:
    """Assert ``res`` and ``ref`` (two ExitResults of the same batch) agree.

    Rows may differ only where an entropy sits within ``rel_tol`` of the threshold of
    the exit where the two paths part (a few ulps of numerics between backends).
    """
    assert sum(res.counts) == sum(ref.counts) == ref.exit.shape[0], (res.counts, ref.counts)
    e1, e2 = res.exit.cpu(), ref.exit.cpu()
    same = e1 == e2
    for i in torch.nonzero(~same).flatten().tolist():
        n = min(int(e1[i]), int(e2[i]))
        h = float(res.entropy[i]) if int(e1[i]) == n else float(ref.entropy[i])
        t = float(thresholds[n])
        assert abs(h - t) <= rel_tol * max(1.0, abs(t)), (
            f"row {i}: exit {int(e1[i])} vs reference {int(e2[i])}, entropy {h} far from T={t}")
    if bool(same.any()):
        p1, p2 = res.pred.cpu()[same], ref.pred.cpu()[same]
        assert bool((p1 == p2).all()), "predictions differ from the reference"
        torch.testing.assert_close(res.entropy.cpu()[same], ref.entropy.cpu()[same], rtol=1e-4, atol=1e-5)


# --- the exit op's bytes ----------------------------------------------------------------

def exit_op_bytes(b: int, c: int, n_exit: int, elem: int = 4) -> dict:
    """Bytes the exit op must move for K = b rows, C classes, ``n_exit`` rows leaving.

    Reads: the logits once (b*C*elem) and the row map (b int64). Writes: for each leaving
    row its logits, prediction (int64), exit index (int64) and entropy (fp32); for each
    staying row its local and original index (2 int64); the count (int64). The survivors'
    feature gather is a separate op and is not counted here.
    """
    n_stay = b - n_exit
    parts = {
        "logits_read": b * c * elem,
        "rows_read": b * 8,
        "exit_rows_write": n_exit * (c * elem + 8 + 8 + 4),
        "survivor_index_write": n_stay * 16 + 8,
    }
    parts["total"] = sum(parts.values())
    return parts
