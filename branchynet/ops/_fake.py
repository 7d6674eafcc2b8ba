"""Fake (meta) implementations of the compiled ops, for torch.compile and FakeTensor.

``torch.ops.branchynet.exit_step`` and ``torch.ops.branchynet.gather_rows`` are defined
in C++ (csrc/exit_step.cpp) when ``branchynet._C`` is imported. These functions tell the
compiler the shapes, dtypes and strides of their results without running a kernel. They
must agree with the kernels exactly, strides included (``opcheck`` compares them).

:func:`register` is called by :mod:`branchynet.ops` right after ``_C`` imports.
"""

from __future__ import annotations

import torch

__all__ = ["register", "exit_step_fake", "gather_rows_fake"]

_OPS = ("branchynet::exit_step", "branchynet::gather_rows")
_registered = False


def exit_step_fake(logits, rows, threshold, criterion, exit_index, last,
                   out_logits, out_pred, out_exit, out_entropy):
    """``(survivors [K], survivor_rows [K], count [1])``, int64, on the logits' device.

    The out_* buffers are mutated in place (declared ``Tensor(a!)`` in the schema), so
    there is nothing to do for them here.
    """
    k = logits.shape[0]
    return (
        logits.new_empty((k,), dtype=torch.int64),
        logits.new_empty((k,), dtype=torch.int64),
        logits.new_empty((1,), dtype=torch.int64),
    )


def _keeps_channels_last(features: torch.Tensor) -> bool:
    # The rule of gather_rows_torch and of both kernels: only a 4-D tensor that is
    # channels_last and not also plain-contiguous comes out channels_last.
    return (features.dim() == 4 and not features.is_contiguous()
            and features.is_contiguous(memory_format=torch.channels_last))


def gather_rows_fake(features, index):
    """``[M, *features.shape[1:]]``, the features' dtype, channels_last kept."""
    fmt = torch.channels_last if _keeps_channels_last(features) else torch.contiguous_format
    return torch.empty((index.shape[0], *features.shape[1:]), dtype=features.dtype,
                       device=features.device, memory_format=fmt)


def _has_op(qualname: str) -> bool:
    ns, name = qualname.split("::")
    return hasattr(getattr(torch.ops, ns), name)


def register() -> bool:
    """Register the fakes once. Returns False when the ops are not defined (no ``_C``).

    Idempotent: a second call is a no-op (torch refuses a second fake for one op).
    """
    global _registered
    if _registered:
        return True
    if not all(_has_op(q) for q in _OPS):
        return False
    reg = getattr(torch.library, "register_fake", None)  # torch >= 2.4
    if reg is None:  # torch 2.2 / 2.3
        reg = torch.library.impl_abstract
    reg(_OPS[0])(exit_step_fake)
    reg(_OPS[1])(gather_rows_fake)
    _registered = True
    return True
