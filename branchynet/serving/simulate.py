"""The serving schedule on a virtual clock: :class:`~branchynet.serving.ExitServer`'s
decisions for a stream of arrivals, without threads, a model or a device.

One worker, as in the server: before each decision every request that has arrived joins
stage 1's queue (each its own item, at its own arrival time), then
:class:`~branchynet.serving.scheduler.Scheduler` picks the stage to run; if none is ready
the clock jumps to the next arrival or the next budget expiry. A run of stage n on k rows
takes ``stage_time(n, k)`` seconds; the rows whose exit is n are answered when it ends,
the others join stage n+1's queue then (``rebatch=True``) or are carried through stage
n+1, n+2, ... at once (``rebatch=False``), as the server does.

What decides the schedule is each request's arrival time and exit, and the cost of a run,
so the same rule can be asked "what if": another load (:func:`poisson_arrivals`), other
thresholds (other exits), another device (:func:`stage_time_from_table`), or the server's
own record replayed (``stage_time`` = the recorded run times) to check the rule is what
ran. Not simulated: per-request timeouts, cancellation, ``max_queued``, closing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .scheduler import Scheduler

__all__ = ["SimResult", "simulate", "stage_time_from_profile", "stage_time_from_table",
           "stage_time_from_record", "poisson_arrivals"]


@dataclass(frozen=True, eq=False)  # holds arrays: compare fields, not results
class SimResult:
    """What the virtual server did with R requests on N stages.

    Attributes:
        runs: one ``(start_s, stage, rows, seconds)`` per stage run, in order (the
            layout of :meth:`ExitServer.record`'s ``runs``); stage is 0-based.
        latency_s: [R] float64 seconds from arrival to answer, in request order.
        answer_s: [R] float64 virtual time of each answer (seconds, the arrivals' clock).
        exit_counts: [N] answers per exit.
        throughput: requests answered per second, R / (last answer - first arrival)
            (``inf`` if that span is 0, 0.0 without requests).
        p50_s, p99_s: percentiles of ``latency_s`` in seconds (nan without requests).
        mean_rows: [N] rows per run of each stage (nan for a stage that never ran): how
            full the batches were, the number pooling survivors exists to raise.
    """

    runs: list
    latency_s: np.ndarray
    answer_s: np.ndarray
    exit_counts: list
    throughput: float
    p50_s: float
    p99_s: float
    mean_rows: list


def _durations(stage_time) -> Callable[[int, int], float]:
    """stage_time as a function (n, k) -> seconds: a callable as given, a sequence read in
    order (a record replayed), with a clear error when it runs out."""
    if callable(stage_time):
        return stage_time
    if isinstance(stage_time, (str, bytes)) or not isinstance(stage_time, (Sequence, np.ndarray)):
        raise TypeError("stage_time must be a callable (stage, rows) -> seconds or a sequence of "
                        f"run durations in seconds, got {type(stage_time).__name__}")
    seq = [float(s) for s in stage_time]
    pos = [0]

    def replay(n: int, k: int) -> float:
        i = pos[0]
        if i >= len(seq):
            raise ValueError(f"stage_time: the {len(seq)} recorded run durations ran out at run {i + 1} "
                             f"(stage {n}, {k} rows): the simulation makes more runs than the "
                             "record, so its decisions differ from the recorded ones")
        pos[0] = i + 1
        return seq[i]

    return replay


def _check(arrivals, exits, num_stages, max_batch_size, max_wait_ms):
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) \
            or not max_wait_ms >= 0 or math.isinf(max_wait_ms):
        raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
    t = np.asarray(arrivals, dtype=np.float64).reshape(-1)
    e = np.asarray(exits).reshape(-1)
    if t.shape != e.shape:
        raise ValueError(f"arrivals and exits must hold one value per request, got {t.size} and {e.size}")
    if not np.all(np.isfinite(t)) or np.any(np.diff(t) < 0):
        raise ValueError("arrivals must be finite and ascending (seconds)")
    if e.size and (not np.issubdtype(e.dtype, np.integer) or e.min() < 0 or e.max() >= num_stages):
        raise ValueError(f"exits must be ints in [0, {num_stages - 1}] (the stage each request "
                         f"leaves at), got {e.dtype} values in [{e.min()}, {e.max()}]")
    return t, e.astype(np.int64)


def simulate(arrivals, exits, stage_time, *, num_stages: int, max_batch_size: int = 256,
             max_wait_ms: float = 2.0, rebatch: bool = True, wake_lag_s: float = 0.0) -> SimResult:
    """Serve requests on a virtual clock with :class:`ExitServer`'s schedule.

    Args:
        arrivals: [R] arrival times in seconds, ascending.
        exits: [R] ints, the 0-based stage each request leaves at (under the model's
            thresholds; the last stage, N - 1, answers the rest).
        stage_time: a callable ``(stage, rows) -> seconds`` (a cost model, e.g.
            :func:`stage_time_from_profile`), or a sequence of run durations in seconds
            used in order, one per run (to replay :meth:`ExitServer.record`'s runs).
        num_stages: N. max_batch_size, max_wait_ms, rebatch: as for :class:`ExitServer`.
        wake_lag_s: how late a worker sleeping until a budget's expiry wakes (a thread
            timer's lag: ~0.1 ms on a Linux VM); 0 wakes it on time.

    Returns:
        :class:`SimResult`.

    Raises:
        ValueError: bad arguments, or a ``stage_time`` sequence that runs out.
    """
    t, ex = _check(arrivals, exits, num_stages, max_batch_size, max_wait_ms)
    if not wake_lag_s >= 0 or math.isinf(wake_lag_s):
        raise ValueError(f"wake_lag_s must be a finite number >= 0, got {wake_lag_s!r}")
    cost = _durations(stage_time)
    sched = Scheduler(num_stages, max_batch_size, max_wait_ms / 1e3)
    ex_list, last = ex.tolist(), num_stages - 1
    answer = np.full(t.size, np.nan)
    runs = []
    now, nxt = (float(t[0]) if t.size else 0.0), 0  # nxt: the first request not yet arrived

    def run(n: int, ids: list, now: float):
        """Stage n on ``ids`` at ``now`` (and, without rebatching, the later stages on the
        survivors); returns the time it ends."""
        while True:
            d = float(cost(n, len(ids)))
            if not d >= 0 or math.isinf(d):
                raise ValueError(f"stage_time gave {d!r} s for stage {n} on {len(ids)} rows: "
                                 "expected a finite number >= 0")
            sched.ran(n, d)
            runs.append((now, n, len(ids), d))
            now += d
            stay = [] if n == last else [i for i in ids if ex_list[i] != n]
            answer[ids if n == last else [i for i in ids if ex_list[i] == n]] = now
            n, ids = n + 1, stay
            if ids and rebatch:
                sched.add(n, ids, now)
            if not ids or rebatch:
                return now

    while True:
        while nxt < t.size and t[nxt] <= now:
            sched.add(0, [nxt], float(t[nxt]))
            nxt += 1
        n = sched.pick(now)
        if n is not None:
            now = run(n, [i for item in sched.take(n) for i in item], now)
            continue
        # The worker sleeps until the next arrival (a submit wakes it) or a budget's expiry
        # (a timer, which fires wake_lag_s late).
        wake = sched.wake()
        times = [x for x in (float(t[nxt]) if nxt < t.size else None,
                             None if wake is None else wake + wake_lag_s) if x is not None]
        if not times:
            break
        # A budget expiry at t + budget can round to a clock where (now - t) < budget by
        # one ulp: step past it rather than wake at the same instant again.
        now = min(times) if min(times) > now else float(np.nextafter(now, math.inf))
    return _result(t, answer, ex, runs, num_stages)


def _result(t: np.ndarray, answer: np.ndarray, ex: np.ndarray, runs: list, num_stages: int) -> SimResult:
    lat = answer - t
    counts = np.bincount(ex, minlength=num_stages).tolist()
    rows = np.zeros(num_stages)
    nruns = np.zeros(num_stages)
    for _, n, k, _ in runs:
        rows[n] += k
        nruns[n] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rows = (rows / nruns).tolist()
    if t.size:
        span = float(answer.max() - t[0])
        throughput = t.size / span if span > 0 else math.inf
        p50, p99 = (float(np.percentile(lat, q)) for q in (50, 99))
    else:
        throughput, p50, p99 = 0.0, math.nan, math.nan
    return SimResult(runs=runs, latency_s=lat, answer_s=answer, exit_counts=counts,
                     throughput=throughput, p50_s=p50, p99_s=p99, mean_rows=mean_rows)


# -- costs of a run ------------------------------------------------------------------------

def _interpolate(rows, seconds, what: str) -> Callable[[float], float]:
    """seconds(k): linear between the measured (rows, seconds) points, through (0, 0) below
    the smallest when 0 is not measured (as :meth:`LatencyProfile.predict` does), and
    along the last segment's slope beyond the largest (a batch larger than any measured
    costs what the trend of the largest ones says, not the largest's time)."""
    x = [float(r) for r in rows]
    y = [float(s) for s in seconds]
    if not x or len(x) != len(y) or x != sorted(set(x)) or x[0] < 0:
        raise ValueError(f"{what}: rows must be ascending distinct numbers >= 0 with one time each, "
                         f"got rows {list(rows)} and {len(y)} times")
    if not all(math.isfinite(s) and s >= 0 for s in y):
        raise ValueError(f"{what}: seconds must be finite and >= 0, got {y}")
    if x[0] > 0:
        x, y = [0.0] + x, [0.0] + y
    xs, ys = np.array(x), np.array(y)
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0

    def seconds_at(k: float) -> float:
        if k <= xs[-1]:
            return float(np.interp(k, xs, ys))
        return float(ys[-1] + slope * (k - xs[-1]))

    return seconds_at


def _per_stage(curves: list) -> Callable[[int, int], float]:
    def stage_time(n: int, k: int) -> float:
        if not 0 <= n < len(curves):
            raise IndexError(f"stage {n}: the costs cover stages 0 to {len(curves) - 1}")
        return curves[n](k)

    return stage_time


def stage_time_from_profile(profile) -> Callable[[int, int], float]:
    """A run's cost ``(stage n, rows k) -> seconds`` from a measured
    :class:`~branchynet.latency.LatencyProfile`: its segment n (gather, stage, branch, exit
    op) interpolated linearly between the measured batch sizes, ``t(0) = 0``, and
    extrapolated linearly beyond the largest along its last two points."""
    return _per_stage([_interpolate(profile.sizes, seg, f"profile segment {n}")
                       for n, seg in enumerate(profile.segment)])


def stage_time_from_table(table: dict) -> Callable[[int, int], float]:
    """A run's cost ``(stage n, rows k) -> seconds`` from a table of measured or assumed
    times (another device's), ``{"stages": [{"rows": [...], "seconds": [...]}, ...]}`` one
    entry per stage, interpolated as :func:`stage_time_from_profile` does."""
    stages = table.get("stages") if isinstance(table, dict) else None
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError('table must be {"stages": [{"rows": [...], "seconds": [...]}, ...]} '
                         "with one entry per stage")
    curves = []
    for n, s in enumerate(stages):
        if not isinstance(s, dict) or "rows" not in s or "seconds" not in s:
            raise ValueError(f'table stage {n}: expected {{"rows": [...], "seconds": [...]}}, got {s!r}')
        curves.append(_interpolate(s["rows"], s["seconds"], f"table stage {n}"))
    return _per_stage(curves)


def stage_time_from_record(busy, num_stages: int | None = None) -> Callable[[int, int], float]:
    """A run's cost ``(stage n, rows k) -> seconds`` from what a server spent on its runs:
    the ``busy`` entries of :meth:`ExitServer.record` (``(stage, rows, seconds)``, the
    worker's whole time on a run: taking the rows, the run, answering, queueing).

    Per stage, the runs are grouped by rows in powers of two (1, 2-3, 4-7, ...), each
    group's median rows and median seconds taken (robust to the odd descheduled run), and
    the curve interpolated between them as :func:`stage_time_from_profile` does. A server
    of a model with no compute gives the server's own cost of a run, to add to segment
    times measured alone.
    """
    entries = list(busy["busy"] if isinstance(busy, dict) else busy)
    if not entries:
        raise ValueError("busy: no runs recorded (build the server with record=True and serve some requests)")
    n_stages = num_stages if num_stages is not None else 1 + max(int(e[0]) for e in entries)
    curves = []
    for n in range(n_stages):
        groups: dict = {}
        for stage, k, sec in entries:
            if int(stage) == n and k >= 1:
                groups.setdefault(int(k).bit_length(), []).append((k, sec))
        if not groups:
            raise ValueError(f"busy: stage {n} never ran in the record")
        pts = sorted((float(np.median([k for k, _ in g])), float(np.median([s for _, s in g])))
                     for g in groups.values())
        curves.append(_interpolate([k for k, _ in pts], [s for _, s in pts], f"record stage {n}"))
    return _per_stage(curves)


def poisson_arrivals(rate_per_s: float, n: int, seed: int = 0) -> np.ndarray:
    """[n] float64 arrival times in seconds of a Poisson stream of ``rate_per_s`` requests
    per second (exponential gaps, the first one after 0), the same for the same seed."""
    if not rate_per_s > 0 or math.isinf(rate_per_s):
        raise ValueError(f"rate_per_s must be a finite number > 0, got {rate_per_s!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(1.0 / rate_per_s, n))
