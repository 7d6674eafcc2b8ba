"""The Python exit-op backends (``torch``, ``triton``) as one registered custom op.

``torch.ops.branchynet.exit_step`` (the compiled extension) is already a dispatcher op
with a fake (:mod:`branchynet.ops._fake`). The PyTorch reference and the Triton launcher
are plain Python: traced by ``torch.compile`` they would break the graph at their host
reads (``int(leave.sum())`` on the CPU) or launch code dynamo cannot follow. Wrapped here
as ``torch.ops.branchynet.exit_step_py`` (a ``torch.library.custom_op`` that mutates its
four output buffers, with the extension op's fake), the compiled stages of
:class:`branchynet.EarlyExitEngine` call them with no graph break.

Registered on first use (:func:`exit_step_op`), so importing branchynet stays cheap.
"""

from __future__ import annotations

import torch

from ._fake import exit_step_fake

__all__ = ["exit_step_op", "QUALNAME"]

QUALNAME = "branchynet::exit_step_py"
_OP = None


def _impl(logits: torch.Tensor, rows: torch.Tensor, threshold: float, criterion: int, exit_index: int,
          last: bool, backend: str, out_logits: torch.Tensor, out_pred: torch.Tensor,
          out_exit: torch.Tensor, out_entropy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from . import kernels

    step = kernels(backend)[0]
    out = step(logits, rows, threshold, criterion, exit_index, last, out_logits, out_pred, out_exit,
               out_entropy)
    # A custom op's outputs may not alias its inputs or each other; the torch path's
    # few-row form returns three views of one int64 buffer (one allocation instead of
    # three at B = 1), so those are copied here: K elements each, on the compiled path only.
    if out[0].untyped_storage().data_ptr() == out[1].untyped_storage().data_ptr():
        return tuple(t.clone() for t in out)
    return tuple(out)


def _fake(logits, rows, threshold, criterion, exit_index, last, backend,
          out_logits, out_pred, out_exit, out_entropy):
    if backend not in ("torch", "triton"):
        raise ValueError(f"exit_step_py runs the 'torch' and 'triton' backends, got {backend!r}")
    return exit_step_fake(logits, rows, threshold, criterion, exit_index, last,
                          out_logits, out_pred, out_exit, out_entropy)


def exit_step_op():
    """``torch.ops.branchynet.exit_step_py``: ``(logits, rows, threshold, criterion,
    exit_index, last, backend, out_logits, out_pred, out_exit, out_entropy) ->
    (survivors [K], survivor_rows [K], count [1])``, registering it on the first call.

    ``backend`` is ``"torch"`` or ``"triton"``; the contract is that of
    :func:`branchynet.ops.exit_step` (criterion as its integer id).
    """
    global _OP
    if _OP is None:
        if not hasattr(torch.ops.branchynet, "exit_step_py"):
            op = torch.library.custom_op(
                QUALNAME, mutates_args=("out_logits", "out_pred", "out_exit", "out_entropy"))(_impl)
            op.register_fake(_fake)
        _OP = torch.ops.branchynet.exit_step_py.default
    return _OP
