"""The rows waiting for one stage, in one preallocated tensor on the model's device.

A stage's queue keeps its rows' state contiguous, in queue order: a run takes the first k
rows as a view (no concatenation of many small tensors: on a GPU no launch per queued
item), the survivors of a run are gathered by one ``index_select`` straight into the next
stage's buffer at its fill offset, and after a run the front moves past the rows it
took. The scheduler (:mod:`branchynet.serving.scheduler`) keeps
the order and the arrival times; this keeps the tensors, so the two take the same rows.

Who writes where: stage 1's buffer is appended to by the submitting threads under the
server's lock, one sample each, while the worker may be reading the view of its run; the
view covers the first k queued rows and the appends go after the last queued row, so
they never touch it, and the front moves (:meth:`StageBuffer.pop_front`) only after the
run, under the lock. Deeper buffers are touched by the worker alone. A buffer whose end is reached is
copied to a new one with room for as many rows again (the old one stays alive while a
view of it is in use).
"""

from __future__ import annotations

import torch

__all__ = ["StageBuffer"]


class StageBuffer:
    """Rows of one shape in a tensor ``[capacity, *row_shape]``, first-in first-out.

    Args:
        capacity: rows to allocate on the first append (more when needed).

    The queued rows are ``buf[head:fill]``. Taking rows from the front only moves
    ``head`` (a stage-1 backlog of thousands of rows is not copied at every run); when
    the end of the tensor is reached the queued rows are copied to the front of a new
    tensor with room for as many again, so each row is copied O(1) times on average, and
    a view of the old tensor that a run is reading stays valid. The row shape, dtype and
    device are the first appended rows'.
    """

    __slots__ = ("buf", "head", "fill", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.buf: torch.Tensor | None = None
        self.head = self.fill = 0
        self.capacity = capacity

    @property
    def rows(self) -> int:
        """Rows queued."""
        return self.fill - self.head

    def _room(self, like: torch.Tensor, k: int) -> torch.Tensor:
        """The slice ``[fill, fill + k)`` to write k rows like ``like`` [*, *row_shape]."""
        if self.buf is not None and like.shape[1:] != self.buf.shape[1:]:
            raise ValueError(f"rows of shape {list(like.shape[1:])} for a queue of rows of shape "
                             f"{list(self.buf.shape[1:])}")
        # Allocated as a normal tensor even from inside inference mode (the worker gathers
        # there): the queue is written outside it too, which an inference tensor refuses.
        if self.buf is None:
            with torch.inference_mode(False):
                self.buf = like.new_empty((max(self.capacity, k), *like.shape[1:]))
        elif self.fill + k > self.buf.shape[0]:
            live = self.rows
            with torch.inference_mode(False):
                new = self.buf.new_empty((max(self.capacity, 2 * (live + k)), *self.buf.shape[1:]))
            new[:live].copy_(self.buf[self.head:self.fill])
            self.buf, self.head, self.fill = new, 0, live
        return self.buf[self.fill:self.fill + k]

    def append(self, rows: torch.Tensor) -> None:
        """Copy ``rows`` [k, *row_shape] to the end."""
        self._room(rows, rows.shape[0]).copy_(rows)
        self.fill += rows.shape[0]

    def gather(self, h: torch.Tensor, index: torch.Tensor) -> None:
        """Append ``h[index]`` (``h`` [m, *row_shape], ``index`` [k] int64 on h's device),
        gathered by one ``index_select`` straight into the buffer."""
        k = index.shape[0]
        if k:
            torch.index_select(h, 0, index, out=self._room(h, k))
            self.fill += k

    def front(self, k: int) -> torch.Tensor:
        """The first k rows, a view (valid while a run reads it, whatever is appended)."""
        if not 0 < k <= self.rows:
            raise ValueError(f"k must be in [1, {self.rows}] (the rows queued), got {k}")
        return self.buf[self.head:self.head + k]

    def pop_front(self, k: int) -> None:
        """Drop the first k rows (taken by a run that is over)."""
        if not 0 <= k <= self.rows:
            raise ValueError(f"k must be in [0, {self.rows}] (the rows queued), got {k}")
        self.head += k
        if self.head == self.fill:  # empty: start again at the front (no view is in use)
            self.head = self.fill = 0

    def clear(self) -> None:
        self.head = self.fill = 0
