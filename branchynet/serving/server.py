"""ExitServer: early exit for a stream of single requests, batched per stage.

A queue per stage holds the rows waiting for it (their hidden state and their request).
One worker thread owns the model and the device: it picks a stage (the scheduler), runs
it on up to ``max_batch_size`` rows through the engine's region for that stage (stage,
branch, exit op), answers the rows that leave at once (their futures resolve), and
appends the survivors to the next stage's queue, where they wait with the survivors of
earlier and later runs (``rebatch=True``). With ``rebatch=False`` each batch is carried
through every stage at once, as :class:`~branchynet.EarlyExitEngine` does.

Which stage runs next, and why, is :mod:`branchynet.serving.scheduler`'s rule.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..engine import EarlyExitEngine
from ..exits import exit_scores
from ..models.branchynet import BranchyNet
from ..ops._backends import new_outputs
from .buffers import StageBuffer
from .scheduler import Scheduler

__all__ = ["ExitServer", "ExitAnswer", "Overloaded"]


class Overloaded(RuntimeError):
    """``max_queued`` rows are already waiting: the request was refused, not queued."""


@dataclass(frozen=True)
class ExitAnswer:
    """The answer for one sample.

    Attributes:
        pred: predicted class. exit: 0-based exit it left at.
        score: its score under the server's criterion at that exit (the entropy for
            ``"entropy"``; for ``"patience"`` the streak of agreeing exits that ended
            there). entropy: the softmax entropy at that exit.
        logits: [C] that exit's logits, on the CPU.
        latency_s: seconds from :meth:`ExitServer.submit` to the answer.
    """

    pred: int
    exit: int
    score: float
    entropy: float
    logits: torch.Tensor
    latency_s: float


class _Request:
    __slots__ = ("future", "t_submit", "deadline", "patience")

    def __init__(self, future: Future, t_submit: float, deadline: float | None):
        self.future, self.t_submit, self.deadline = future, t_submit, deadline
        # Under the patience criterion: [previous exit's prediction, streak], carried
        # from run to run (each run's exit-op buffers are its own).
        self.patience = None


def _settle(future: Future, result=None, error: BaseException | None = None) -> bool:
    # A future may already be done (cancelled by its caller, or timed out): skip it.
    try:
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
        return True
    except InvalidStateError:
        return False


class ExitServer:
    """Serve single samples with early exit, batching each stage over many requests.

    Args:
        model: a :class:`~branchynet.BranchyNet`, or a plain ``nn.Module`` (one stage, no
            side exit: the same dynamic batching, the baseline to compare with).
        thresholds: as for :class:`~branchynet.EarlyExitEngine` (default: the model's).
        max_batch_size: most rows a stage runs at once.
        max_wait_ms: how long a row may wait for stage 1 to fill (see the module
            docstring for the deeper stages).
        rebatch: pool the survivors of several runs per stage (True), or carry each batch
            through every stage at once (False).
        max_queued: most rows waiting in all queues; :meth:`submit` raises
            :class:`Overloaded` beyond it.
        backend, compile, criterion, patience: as for the engine (compiled stages with a
            dynamic batch dimension; ``criterion="patience", patience=P`` for PABEE, each
            request's streak carried from one stage's run to the next).
        record: keep the scheduling record (:meth:`record`).

    Example:
        >>> with ExitServer(model, max_batch_size=64) as server:
        ...     answer = server.submit(x).result()    # x [1, 28, 28]: one sample
        ...     answer.pred, answer.exit
    """

    def __init__(self, model: nn.Module, thresholds=None, *, max_batch_size: int = 256,
                 max_wait_ms: float = 2.0, rebatch: bool = True, max_queued: int = 4096,
                 backend: str = "auto", compile=False, criterion: str | None = None,
                 record: bool = False, patience: int | None = None) -> None:
        if isinstance(model, BranchyNet):
            net = model
        elif isinstance(model, nn.Module):
            net = BranchyNet([model], [nn.Identity()])
        else:
            raise TypeError(f"model must be a BranchyNet or an nn.Module, got {type(model).__name__}")
        for name, value in (("max_batch_size", max_batch_size), ("max_queued", max_queued)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) \
                or not max_wait_ms >= 0 or math.isinf(max_wait_ms):
            raise ValueError(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        self._engine = EarlyExitEngine(net, thresholds, backend=backend, criterion=criterion,
                                       compile=compile, buckets=False if compile else None, patience=patience)
        p = next(net.parameters(), None)
        self._device = p.device if p is not None else torch.device("cpu")
        self._dtype = p.dtype if p is not None and p.is_floating_point() else None
        self._shape = net.input_shape  # None: taken from the first sample
        self._n = net.num_exits
        self._rebatch, self._max_queued = rebatch, max_queued
        self._compiled = bool(compile)
        # (C, logits dtype): for compiled stages from the first stage-1 run, for patience
        # from the first stage-1 run's outputs.
        self._spec = None
        self._sched = Scheduler(self._n, max_batch_size, max_wait_ms / 1e3)
        # The rows' state per stage, in queue order (the scheduler's items are lists of
        # their requests, in the same order): a run reads a view of the first rows, the
        # survivors are gathered straight to the end of the next stage's buffer.
        self._queues = [StageBuffer(2 * max_batch_size) for _ in range(self._n)]
        self._cv = threading.Condition()
        # The request deadlines' own thread, on the same lock: a request times out at its
        # deadline even while the worker is busy in a long stage run.
        self._reap_cv = threading.Condition(self._cv)
        self._closed = False
        self._drain = True
        self._deadlines = []  # heap of (deadline, n, request)
        self._reaper = None
        self._seq = itertools.count()  # ties of equal deadlines: first come, first failed
        self._stats = {"stage_runs": [0] * self._n, "stage_rows": [0] * self._n, "exits": [0] * self._n,
                       "answered": 0, "failed": 0, "overloaded": 0}
        self._latency = deque(maxlen=100_000)
        # The scheduling record (record=True): arrivals, and every run's start, stage, rows
        # and seconds, on the server's clock; what a simulation replays. ``busy``: per run,
        # the worker's whole time on it (taking the rows, the run, answering, queueing the
        # survivors), what a cost model of this server must charge a run.
        self._t0 = time.perf_counter()
        self._record = {"arrivals": [], "runs": [], "busy": []} if record else None
        self._worker = threading.Thread(target=self._work, name="branchynet-exit-server", daemon=True)
        self._worker.start()

    # -- the caller's side -----------------------------------------------------------------

    def submit(self, x: torch.Tensor, *, timeout_s: float | None = None) -> Future:
        """Queue one sample; returns a future of its :class:`ExitAnswer`.

        Args:
            x: one sample of the model's input shape, no batch dimension, of the model's
                floating dtype (any device: moved to the model's).
            timeout_s: fail this request alone with ``TimeoutError`` if it is not answered
                by then.

        Raises:
            Overloaded: ``max_queued`` rows are waiting. RuntimeError: the server is closed.
            TypeError, ValueError: ``x`` is not such a sample.
        """
        x = self._check_sample(x)
        if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
            raise ValueError(f"timeout_s must be a number > 0 or None, got {timeout_s!r}")
        now = time.perf_counter()
        req = _Request(Future(), now, None if timeout_s is None else now + timeout_s)
        with self._cv:
            if self._closed:
                raise RuntimeError("the ExitServer is closed: submit() after close()")
            waiting = sum(self._sched.rows)
            if waiting >= self._max_queued:
                self._stats["overloaded"] += 1
                raise Overloaded(f"{waiting} rows are waiting (max_queued={self._max_queued}); retry later")
            self._queues[0].append(x.unsqueeze(0))
            self._sched.add(0, [req], now)
            if self._record is not None:
                self._record["arrivals"].append(now - self._t0)
            if req.deadline is not None:
                heapq.heappush(self._deadlines, (req.deadline, next(self._seq), req))
                if self._reaper is None:
                    self._reaper = threading.Thread(target=self._reap, name="branchynet-exit-server-timeouts",
                                                    daemon=True)
                    self._reaper.start()
                self._reap_cv.notify()
            self._cv.notify()
        return req.future

    async def predict(self, x: torch.Tensor, *, timeout_s: float | None = None) -> ExitAnswer:
        """:meth:`submit` for asyncio callers: the answer, awaited."""
        return await asyncio.wrap_future(self.submit(x, timeout_s=timeout_s))

    def stats(self) -> dict:
        """Counters since start: ``stage_runs`` and ``stage_rows`` (per stage), ``exits``
        (answers per exit), ``queued`` (rows waiting per stage now), ``answered``,
        ``failed``, ``overloaded``, and ``latency_s`` (p50 and p99 of the last 100,000
        answers; None before the first)."""
        with self._cv:
            out = {k: (list(v) if isinstance(v, list) else v) for k, v in self._stats.items()}
            out["queued"] = list(self._sched.rows)
            lat = np.fromiter(self._latency, dtype=np.float64)
        out["latency_s"] = ({"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}
                            if lat.size else {"p50": None, "p99": None})
        return out

    @property
    def alive(self) -> bool:
        """True while the server accepts requests and its worker runs (a health check)."""
        return not self._closed and self._worker.is_alive()

    def record(self) -> dict:
        """What the scheduler saw and did (``record=True``): ``arrivals`` (seconds since
        start, one per accepted request), ``runs`` (``(start s, stage, rows, seconds)``
        per stage run: the stage, its branch and exit op, and the answers' outputs), for
        replaying it (:func:`branchynet.serving.simulate`), and ``busy`` (``(stage, rows,
        seconds)`` per run: the worker's whole time on it, from taking the rows to being
        free again, for a cost model of the server, :func:`~branchynet.serving.
        stage_time_from_record`)."""
        if self._record is None:
            raise RuntimeError("build the server with record=True to keep its record")
        with self._cv:
            return {key: list(v) for key, v in self._record.items()}

    def close(self, drain: bool = True) -> None:
        """Stop accepting requests; answer everything queued (``drain``) or fail it."""
        with self._cv:
            if not self._closed:
                self._closed, self._drain = True, drain
            self._cv.notify_all()
        self._worker.join()
        with self._cv:
            self._reap_cv.notify()
        if self._reaper is not None:
            self._reaper.join()

    def __enter__(self) -> "ExitServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_sample(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (one sample, no batch dimension), got {type(x).__name__}")
        if not x.is_floating_point() or (self._dtype is not None and x.dtype != self._dtype):
            raise TypeError(f"x must be a {self._dtype or 'floating-point'} tensor (the model's dtype), "
                            f"got {x.dtype}")
        if self._shape is None:
            with self._cv:
                if self._shape is None:
                    self._shape = tuple(x.shape)  # a model without input_shape: the first sample's
        if tuple(x.shape) != self._shape:
            raise ValueError(f"x must be one sample of shape {list(self._shape)} (no batch dimension), "
                             f"got {list(x.shape)}")
        return x.to(self._device)

    # -- the worker ------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cv:
                job = self._next_job()
                if job is None:
                    return
            self._run(*job)

    def _next_job(self):
        """Under the lock: ``(stage, state, requests, time taken, rows taken)`` of the next
        run, or None to stop."""
        while True:
            now = time.perf_counter()
            if self._closed and not self._drain:
                err = RuntimeError("the ExitServer was closed before this request was answered "
                                   "(close(drain=False))")
                for reqs in self._sched.clear():
                    self._fail(reqs, err)
                for q in self._queues:
                    q.clear()
                return None
            n = self._sched.pick(now, closing=self._closed)
            if n is not None:
                reqs = [r for taken in self._sched.take(n) for r in taken]
                h, live = self._live(self._queues[n].front(len(reqs)), reqs)
                if live:
                    return n, h, live, now, len(reqs)
                self._queues[n].pop_front(len(reqs))
                continue  # every row taken had timed out or was cancelled
            if self._closed:
                return None  # drained
            wake = self._sched.wake()
            self._cv.wait(None if wake is None else max(0.0, wake - now))

    def _reap(self) -> None:
        """Fail each request at its deadline (the timeouts' thread, until the worker ends)."""
        with self._cv:
            while True:
                now = time.perf_counter()
                while self._deadlines and self._deadlines[0][0] <= now:
                    deadline, _, r = heapq.heappop(self._deadlines)
                    self._fail([r], TimeoutError(f"no answer within the request's timeout "
                                                 f"({deadline - r.t_submit:.3g} s)"))
                if not self._worker.is_alive():
                    return
                wait = self._deadlines[0][0] - now if self._deadlines else None
                self._reap_cv.wait(wait)

    @staticmethod
    def _live(h: torch.Tensor, reqs: list):
        """The taken rows' state and requests without those already settled (timed out,
        or cancelled by their caller)."""
        live = [i for i, r in enumerate(reqs) if not r.future.done()]
        if len(live) == len(reqs):
            return h, reqs
        if live:
            h = h[torch.tensor(live, device=h.device)]
        return h, [reqs[i] for i in live]

    def _fail(self, reqs: list, err: BaseException) -> None:
        for r in reqs:
            if _settle(r.future, error=err):
                self._stats["failed"] += 1

    def _run(self, n: int, h: torch.Tensor, reqs: list, t_taken: float, taken: int) -> None:
        """Stage n on the taken rows (the first ``taken`` of its queue; ``h`` their live
        ones' state) and, without rebatching, every later stage on the survivors; answers
        the leavers, queues the survivors."""
        queue = self._queues[n]
        while True:
            k = len(reqs)
            try:
                with torch.inference_mode():
                    h, stay, reqs = self._stage(n, h, reqs, time.perf_counter())
                    if reqs and self._rebatch:  # the next buffer is the worker's alone: no lock
                        self._queues[n + 1].gather(h, stay)
                    elif reqs:
                        h = self._engine._plan(h.device, self._compiled)[1](h, stay)
            except Exception as err:  # a failing stage fails its run's requests, not the server
                with self._cv:
                    self._fail(reqs, err)
                    if queue is not None:
                        queue.pop_front(taken)
                return
            with self._cv:
                if queue is not None:  # the run is over: its rows leave the queue's buffer
                    queue.pop_front(taken)
                    queue = None
                n += 1
                now = time.perf_counter()
                if reqs and self._rebatch:
                    self._sched.add(n, reqs, now)
                if self._record is not None:
                    self._record["busy"].append((n - 1, k, now - t_taken))
                t_taken = now
            if not reqs or self._rebatch:
                return

    def _stage(self, n: int, h: torch.Tensor, reqs: list, t0: float):
        """One run of stage n (started at t0): answers the rows that leave; returns the
        stage's output, the survivors' rows in it and their requests."""
        eng = self._engine
        k = h.shape[0]
        rows = eng._rows(k, h.device)
        patience = eng._patience is not None
        if self._compiled and self._spec is None:
            self._spec = eng._spec(h)
        if self._compiled or (patience and n):
            # Compiled regions write into buffers made before the stage runs; under
            # patience the rows' streaks so far go in (exit 0 reads none).
            out = new_outputs(k, *self._spec, h.device, patience)
            if patience and n:
                out[4].copy_(torch.tensor([r.patience for r in reqs], dtype=torch.int64))
        else:
            out = []
        regions, _ = eng._plan(h.device, self._compiled)
        h, (survivors, _, count) = regions[n](h, rows, out)
        if self._spec is None:
            self._spec = (out[0].shape[1], out[0].dtype)
        stay = survivors[:0 if n == self._n - 1 else int(count)]
        if patience and stay.numel():
            for i, state in zip(stay.tolist(), out[4].index_select(0, stay).tolist()):
                reqs[i].patience = state
        leave = torch.ones(k, dtype=torch.bool, device=h.device)
        leave[stay] = False
        idx = leave.nonzero().squeeze(1)
        logits = out[0].index_select(0, idx).cpu()
        pred = out[1].index_select(0, idx).tolist()
        ent = out[3].index_select(0, idx).tolist()
        crit = eng.criterion
        if crit == "patience":
            score = out[4][:, 1].index_select(0, idx).tolist()
        else:
            score = ent if crit == "entropy" else exit_scores(logits.float(), crit)[0].tolist()
        now = time.perf_counter()
        answered = 0
        with self._cv:
            # The run counts (and is recorded) before its answers go out: a caller who
            # has every answer also sees every run.
            self._sched.ran(n, now - t0)
            if self._record is not None:
                self._record["runs"].append((t0 - self._t0, n, k, now - t0))
            for j, i in enumerate(idx.tolist()):
                r = reqs[i]
                lat = now - r.t_submit
                if _settle(r.future, ExitAnswer(pred[j], n, score[j], ent[j], logits[j], lat)):
                    answered += 1
                    self._latency.append(lat)
            st = self._stats
            st["stage_runs"][n] += 1
            st["stage_rows"][n] += k
            st["exits"][n] += answered
            st["answered"] += answered
        return h, stay, [reqs[i] for i in stay.tolist()]
