"""The two ops as torch sees them: one schema each, defined here once, one fake each, and
an implementation registered per device.

=============================  ===========================================================
dispatch key                   implementation of ``exit_step`` and ``gather_rows``
=============================  ===========================================================
``CPU``                        the C++ kernels (``branchynet._C``, csrc/exit_step.cpp)
``CUDA``                       the CUDA kernels (``branchynet._C`` built with CUDA), or
                               else the Triton kernels (kernels/exit_step.py), registered
                               by :func:`register_triton_for_cuda`
``CompositeExplicitAutograd``  the PyTorch implementation (ops/_torch.py): every device
                               that no compiled kernel serves, CPU and CUDA included when
                               nothing is built
fake (``Meta``)                the shape functions below: torch.compile, FakeTensor, opcheck
=============================  ===========================================================

A device key wins over ``CompositeExplicitAutograd``, so importing ``branchynet._C``
(whose ``TORCH_LIBRARY_IMPL`` blocks register the C++ kernels, before or after the
schemas below exist) is all it takes for its kernels to serve their devices.
"""

from __future__ import annotations

import torch

from ._torch import exit_step_torch, gather_rows_torch

__all__ = ["EXIT_STEP_SCHEMA", "GATHER_ROWS_SCHEMA", "register_triton_for_cuda", "exit_step_fake",
           "gather_rows_fake"]

#: ``out_*`` are written in place, only at the rows that leave; the three returns are new.
#: ``patience_state`` ([B, 2] int64, criterion 3 only) is read and written at every row of
#: the call. The argument order is that of every implementation and of
#: :func:`branchynet.ops.exit_step`.
EXIT_STEP_SCHEMA = (
    "exit_step(Tensor logits, Tensor rows, float threshold, int exit_index, "
    "Tensor(a!) out_logits, Tensor(b!) out_pred, Tensor(c!) out_exit, Tensor(d!) out_entropy, "
    "int criterion=0, bool last=False, Tensor(e!)? patience_state=None) -> (Tensor, Tensor, Tensor)"
)
GATHER_ROWS_SCHEMA = "gather_rows(Tensor features, Tensor index) -> Tensor"


def exit_step_fake(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                   criterion=0, last=False, patience_state=None):
    """``(survivors [K], survivor_rows [K], count [1])``, int64, on the logits' device; the
    out_* buffers and the patience state are mutated in place (``Tensor(a!)``), nothing to
    do for them here."""
    k = logits.shape[0]
    return (logits.new_empty((k,), dtype=torch.int64), logits.new_empty((k,), dtype=torch.int64),
            logits.new_empty((1,), dtype=torch.int64))


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


def _own_outputs(step):
    """``step`` as a registered kernel: an op's outputs may alias neither its inputs nor
    each other, and the PyTorch path's few-row form returns three views of one buffer
    (one allocation instead of three at B = 1): those are copied, K elements each."""
    def kernel(*args, **kwargs):
        out = step(*args, **kwargs)
        if out[0].untyped_storage().data_ptr() == out[1].untyped_storage().data_ptr():
            return tuple(t.clone() for t in out)
        return tuple(out)
    kernel.__name__ = kernel.__qualname__ = step.__name__
    return kernel


def _define() -> torch.library.Library:
    lib = torch.library.Library("branchynet", "DEF")
    lib.define(EXIT_STEP_SCHEMA)
    lib.define(GATHER_ROWS_SCHEMA)
    torch.library.register_fake("branchynet::exit_step", exit_step_fake, lib=lib)
    torch.library.register_fake("branchynet::gather_rows", gather_rows_fake, lib=lib)
    lib.impl("exit_step", _own_outputs(exit_step_torch), "CompositeExplicitAutograd")
    lib.impl("gather_rows", gather_rows_torch, "CompositeExplicitAutograd")
    return lib


# Kept alive for the life of the process: the registrations go with the object.
_LIB = _define()
_TRITON_LIB: torch.library.Library | None = None


def register_triton_for_cuda(triton_module) -> None:
    """Serve CUDA tensors with the Triton kernels (when the extension has no CUDA kernels);
    idempotent. As torchvision attaches its Triton kernels to an existing op."""
    global _TRITON_LIB
    if _TRITON_LIB is not None:
        return
    _TRITON_LIB = torch.library.Library("branchynet", "IMPL")
    _TRITON_LIB.impl("exit_step", _own_outputs(triton_module.exit_step_triton), "CUDA")
    _TRITON_LIB.impl("gather_rows", triton_module.gather_rows_triton, "CUDA")
