"""The rows waiting for one stage, in one preallocated tensor on the model's device.

A stage's queue keeps its rows' state contiguous, in queue order: a run takes the first k
rows as a view (no concatenation of many small tensors: on a GPU no launch per queued
item), the survivors of a run are gathered by one ``index_select`` straight into the next
stage's buffer at its fill offset, and after a run the rows left over move to the front
(at most one batch of them). The scheduler (:mod:`branchynet.serving.scheduler`) keeps
the order and the arrival times; this keeps the tensors, so the two take the same rows.

Who writes where: stage 1's buffer is appended to by the submitting threads under the
server's lock, one sample each, while the worker may be reading the view of its run; the
view covers rows [0, k) and the appends go at or after ``fill >= k``, so they never
touch it, and the front is moved (:meth:`StageBuffer.pop_front`) only after the run, under
the lock. Deeper buffers are touched by the worker alone. A buffer that runs out of room
is reallocated at twice the size (the old one stays alive while a view of it is in use).
"""

from __future__ import annotations

import torch

__all__ = ["StageBuffer"]


class StageBuffer:
    """Rows of one shape in a growing tensor ``[capacity, *row_shape]``, first-in first-out.

    Args:
        capacity: rows to allocate on the first append (grows by doubling beyond).

    The row shape, dtype and device are the first appended rows'.
    """

    __slots__ = ("buf", "fill", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.buf: torch.Tensor | None = None
        self.fill = 0
        self.capacity = capacity

    def _room(self, like: torch.Tensor, k: int) -> torch.Tensor:
        """The slice ``[fill, fill + k)`` to write k rows like ``like`` [*, *row_shape]."""
        need = self.fill + k
        if self.buf is not None and like.shape[1:] != self.buf.shape[1:]:
            raise ValueError(f"rows of shape {list(like.shape[1:])} for a queue of rows of shape "
                             f"{list(self.buf.shape[1:])}")
        # Allocated as a normal tensor even from inside inference mode (the worker gathers
        # there): the front is moved outside it, and an inference tensor refuses that.
        if self.buf is None:
            with torch.inference_mode(False):
                self.buf = like.new_empty((max(self.capacity, need), *like.shape[1:]))
        elif need > self.buf.shape[0]:
            with torch.inference_mode(False):
                grown = self.buf.new_empty((max(2 * self.buf.shape[0], need), *self.buf.shape[1:]))
            grown[: self.fill].copy_(self.buf[: self.fill])
            self.buf = grown
        return self.buf[self.fill:need]

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
        """The first k rows, a view (valid until :meth:`pop_front`)."""
        if not 0 < k <= self.fill:
            raise ValueError(f"k must be in [1, {self.fill}] (the rows queued), got {k}")
        return self.buf[:k]

    def pop_front(self, k: int) -> None:
        """Drop the first k rows (taken by a run that is over); the rest move to the front."""
        if not 0 <= k <= self.fill:
            raise ValueError(f"k must be in [0, {self.fill}] (the rows queued), got {k}")
        rest = self.fill - k
        if rest and k:
            # The regions overlap when rest > k: copy through a temporary.
            src = self.buf[k:self.fill]
            self.buf[:rest].copy_(src.clone() if rest > k else src)
        self.fill = rest

    def clear(self) -> None:
        self.fill = 0
