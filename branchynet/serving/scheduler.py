"""Which stage runs next: the rule of :class:`~branchynet.serving.ExitServer`, on queues
of rows and a clock the caller gives (the real one in the server, a virtual one in a
simulation), so the rule can be tested and replayed without threads or a model.

1. The deepest stage whose queue holds ``max_batch`` rows: it finishes requests already
   in flight, at full batch.
2. Else the deepest stage whose oldest row has waited its budget. Stage 1's budget is
   ``max_wait_s``. A deeper stage's budget is at least two stage-1 runs (their running
   mean, :meth:`Scheduler.ran`): a shorter one would run every deep batch on the
   survivors of one stage-1 run, the per-batch compaction that pooling exists to avoid.
   When nothing is queued upstream nothing more can join, and the budget is
   ``max_wait_s`` again.
3. Else nothing: sleep until :meth:`Scheduler.wake` (or a new row).

When closing (draining), every non-empty queue is ready, deepest first.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Scheduler"]


class _Chunk:
    __slots__ = ("items", "t")

    def __init__(self, items, t: float):
        self.items, self.t = items, t  # items: rows, sliceable, len() = how many


class Scheduler:
    """Queues of rows per stage and the rule that picks the next stage to run.

    Args:
        num_stages: N. max_batch: most rows a run takes. max_wait_s: stage 1's budget.

    Rows are added as *items*, anything with ``len()`` and slicing (the server's hidden
    states with their requests; a list of request ids in a simulation), each with the
    time it joined the queue.
    """

    def __init__(self, num_stages: int, max_batch: int, max_wait_s: float) -> None:
        self.num_stages, self.max_batch, self.max_wait_s = num_stages, max_batch, max_wait_s
        self.queues = [deque() for _ in range(num_stages)]
        self.rows = [0] * num_stages
        self.stage1_s = 0.0  # running mean of a stage-1 run

    def add(self, n: int, items, t: float) -> None:
        """Rows ``items`` join stage n's queue at time t."""
        if len(items):
            self.queues[n].append(_Chunk(items, t))
            self.rows[n] += len(items)

    def ran(self, n: int, seconds: float) -> None:
        """A run of stage n took ``seconds`` (stage 1's feed the deep stages' budget)."""
        if n == 0:
            self.stage1_s = seconds if self.stage1_s == 0.0 else 0.8 * self.stage1_s + 0.2 * seconds

    def budget(self, n: int) -> float:
        """How long the oldest row of stage n waits for more rows to join."""
        if n == 0 or not any(self.rows[:n]):
            return self.max_wait_s
        return max(self.max_wait_s, 2 * self.stage1_s)

    def pick(self, now: float, closing: bool = False) -> int | None:
        """The stage to run at time ``now``, or None (wait)."""
        ready = [n for n in range(self.num_stages) if self.rows[n] >= self.max_batch]
        if not ready:
            ready = [n for n, q in enumerate(self.queues)
                     if q and (closing or now - q[0].t >= self.budget(n))]
        return max(ready) if ready else None

    def wake(self) -> float | None:
        """The earliest time a queue's budget runs out (None: every queue is empty)."""
        times = [q[0].t + self.budget(n) for n, q in enumerate(self.queues) if q]
        return min(times) if times else None

    def take(self, n: int) -> list:
        """Up to ``max_batch`` rows of stage n, oldest first, as the items they were added
        in (the last one sliced if it does not fit; its rest keeps its place)."""
        q, out, left = self.queues[n], [], self.max_batch
        while q and left:
            c = q.popleft()
            if len(c.items) > left:
                q.appendleft(_Chunk(c.items[left:], c.t))
                c = _Chunk(c.items[:left], c.t)
            out.append(c.items)
            left -= len(c.items)
        self.rows[n] -= self.max_batch - left
        return out

    def clear(self) -> list:
        """Every queued item, queues emptied (closing without draining)."""
        out = [c.items for q in self.queues for c in q]
        for n, q in enumerate(self.queues):
            q.clear()
            self.rows[n] = 0
        return out
