"""The exit op and the survivor gather: ``torch.ops.branchynet.exit_step`` and
``torch.ops.branchynet.gather_rows``, one schema each, an implementation per device.

The ops as torch sees them (schemas, fakes, which kernel serves which device) are in
:mod:`branchynet.ops._library`; which implementations this process has, and the
``backend=`` override, in :mod:`branchynet.ops._backends`. This module is the door:

- :func:`exit_step`, :func:`gather_rows`: the ops with their arguments checked, for
  callers and tests; ``backend="auto"`` runs what the dispatcher runs for the device.
- :func:`bind`: the op bound to a device for a loop that calls it once per exit (the
  engine): no checks, its own fastest entry where there is one.
- :func:`available_backends`, :func:`resolve_backend`, :func:`backend_status`.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch

from ..config import PATIENCE_ID, criterion_id
from ..exits import _check_logits
from . import _backends, _library  # noqa: F401  (_library defines the ops on import)
from ._backends import BACKENDS, ExitOp, available_backends, implementation, new_patience_state, resolve_backend

__all__ = [
    "exit_step",
    "gather_rows",
    "bind",
    "ExitOp",
    "available_backends",
    "resolve_backend",
    "backend_status",
    "implementation",
    "BACKENDS",
    "new_patience_state",
]


def __getattr__(name: str):
    # The extension's state changes when it is built on first use: read it live.
    if name in ("_EXT", "_EXT_ERROR", "_TRITON", "_TRITON_ERROR"):
        return getattr(_backends, name[1:])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def backend_status() -> dict:
    """What is built and importable, for ``branchynet info``."""
    return _backends.status()


def bind(device: torch.device | str, backend: str = "auto") -> ExitOp:
    """The exit op for ``device``, resolved once, for a loop that calls it at every exit.

    Args:
        device: where the logits will be.
        backend: ``"auto"`` or a backend name (an override: see :data:`BACKENDS`).

    Returns:
        :class:`~branchynet.ops._backends.ExitOp` ``(backend, step, gather, traceable)``.
    """
    dev = torch.device(device)
    return _backends.bound(resolve_backend(backend, dev), dev)


def kernels(backend: str):
    """Deprecated: use :func:`implementation` (same result)."""
    warnings.warn("branchynet.ops.kernels() is deprecated: use branchynet.ops.implementation()",
                  DeprecationWarning, stacklevel=2)
    return implementation(backend)


def _check_exit_args(logits, rows, threshold, out_logits, out_pred, out_exit, out_entropy):
    _check_logits(logits)  # rank 2, a float dtype, C >= 1: the reference's own check
    for name, t in (("rows", rows), ("out_logits", out_logits),
                    ("out_pred", out_pred), ("out_exit", out_exit), ("out_entropy", out_entropy)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits are on {logits.device}")
    k, c = logits.shape
    if rows.dtype != torch.int64 or rows.shape != (k,):
        raise ValueError(f"rows must be int64 of shape [{k}], got {rows.dtype} {tuple(rows.shape)}")
    if out_logits.dim() != 2 or out_logits.shape[1] != c:
        raise ValueError(f"out_logits must have shape [B, {c}], got {tuple(out_logits.shape)}")
    b = out_logits.shape[0]
    if out_logits.dtype != logits.dtype:
        raise TypeError(f"out_logits dtype {out_logits.dtype} must match logits dtype {logits.dtype}")
    for name, t, dt in (("out_pred", out_pred, torch.int64), ("out_exit", out_exit, torch.int64),
                        ("out_entropy", out_entropy, torch.float32)):
        if t.dtype != dt or t.shape != (b,):
            raise ValueError(f"{name} must be {dt} of shape [{b}], got {t.dtype} {tuple(t.shape)}")
    if not out_logits.is_contiguous():
        raise ValueError("out_logits must be contiguous")
    # A row outside the buffers is a device-side assert on CUDA (the context dies) and an
    # out-of-bounds write in Triton; two equal rows race for one output row on a GPU.
    # Refuse both here, on every device, with one read-back for the two tests.
    if k:
        outside = (rows < 0) | (rows >= b)
        ordered = rows.sort().values
        same = ordered[1:] == ordered[:-1]
        any_outside, any_same = torch.stack([outside.any(), same.any()]).tolist()
        if any_outside:
            raise ValueError(f"rows must index the B = {b} rows of the output buffers, got "
                             f"{rows[outside][:3].tolist()}")
        if any_same:
            twice = ordered[1:][same].unique()[:3].tolist()
            raise ValueError(f"rows must be unique, got {', '.join(map(str, twice))} twice")
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be one number, got a tensor of shape {tuple(threshold.shape)}")
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0 and not NaN, got {threshold}")
    return float(threshold)


def _check_exit_index(exit_index) -> int:
    # A negative index reads as "no exit" to whoever reads out_exit.
    if isinstance(exit_index, bool):
        raise TypeError("exit_index must be an integer >= 0, got a bool")
    try:
        index = operator.index(exit_index)
    except TypeError:
        raise TypeError(f"exit_index must be an integer >= 0, got {type(exit_index).__name__}") from None
    if index < 0:
        raise ValueError(f"exit_index must be an integer >= 0, got {index}")
    return index


def exit_step(
    logits: torch.Tensor,
    rows: torch.Tensor,
    threshold: float,
    exit_index: int,
    out_logits: torch.Tensor,
    out_pred: torch.Tensor,
    out_exit: torch.Tensor,
    out_entropy: torch.Tensor,
    *,
    criterion: str = "entropy",
    last: bool = False,
    backend: str = "auto",
    patience_state: torch.Tensor | None = None,
):
    """One exit point: decide, write the exiting rows, compact the survivors.

    For each of the K rows still in flight: softmax with a stable max, entropy (fp32
    accumulation), the criterion's score, argmax, and the test ``score < threshold``
    (every row leaves when ``last``). A leaving row ``i`` writes its logits, prediction,
    ``exit_index`` and entropy into the output buffers at row ``rows[i]`` of the original
    batch; the other rows of the buffers are left untouched.

    ``criterion="patience"`` (PABEE) has no score: row ``i`` (original row ``r``) has the
    streak ``cnt = state[r, 1] + 1`` if its prediction equals ``state[r, 0]`` (the previous
    exit's), else 0, and 0 at ``exit_index`` 0 (the state is not read there); the op
    writes ``state[r] = (pred, cnt)`` for every row of the call, and the row leaves when
    ``cnt >= threshold`` (the patience P) and its entropy is not NaN, or when ``last``.

    Args:
        logits: [K, C] fp32/fp16/bf16, this exit's logits for the rows in flight.
        rows: [K] int64, original batch row of each of the K rows, unique and in
            ``[0, B)``: checked here (one host read-back on a GPU; the engine's bound op,
            :func:`bind`, skips it).
        threshold: T >= 0 for this exit (ignored when ``last``).
        exit_index: 0-based index of this exit (an integer >= 0), written to ``out_exit``.
        out_logits: [B, C] contiguous, same dtype as ``logits``.
        out_pred, out_exit: [B] int64. out_entropy: [B] float32.
        criterion: ``"entropy"`` (the paper's), ``"max_prob"``, ``"margin"`` or
            ``"patience"``.
        last: the final exit, which takes every remaining row.
        backend: ``"auto"`` (what ``torch.ops.branchynet.exit_step`` runs for the device),
            or ``"cuda"``, ``"triton"``, ``"cpp"``, ``"torch"`` to run that one (tests,
            benchmarks, ``branchynet selftest``).
        patience_state: [B, 2] int64, contiguous, on the logits' device: each original
            row's previous prediction and streak, for ``criterion="patience"`` only
            (required there). Indexed by original row, it needs no gather when the
            survivors are compacted.

    Returns:
        ``(survivors [K] int64, survivor_rows [K] int64, count [1] int64)``, all on the
        device: the first ``count`` entries of ``survivors`` are the local indices (into
        the K rows) of the rows that stay, and of ``survivor_rows`` their original rows;
        the entries past ``count`` are unspecified. The order of the survivors is
        unspecified for the fused kernels (the torch backend keeps input order).
    """
    threshold = _check_exit_args(logits, rows, threshold, out_logits, out_pred, out_exit, out_entropy)
    exit_index = _check_exit_index(exit_index)
    cid = criterion_id(criterion, patience=True)
    _check_patience_state(patience_state, cid, logits, out_logits.shape[0])
    step = implementation(resolve_backend(backend, logits.device))[0]
    return step(logits, rows, threshold, exit_index, out_logits, out_pred, out_exit, out_entropy,
                criterion=cid, last=bool(last), patience_state=patience_state)


def _check_patience_state(state, cid: int, logits: torch.Tensor, b: int) -> None:
    if cid != PATIENCE_ID:
        if state is not None:
            raise ValueError("patience_state is only for criterion='patience'")
        return
    if state is None:
        raise ValueError("criterion='patience' needs patience_state, an int64 tensor [B, 2] "
                         "(branchynet.ops.new_patience_state(B, device))")
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"patience_state must be a torch.Tensor, got {type(state).__name__}")
    if state.dtype != torch.int64 or state.shape != (b, 2):
        raise ValueError(f"patience_state must be int64 of shape [{b}, 2], got {state.dtype} {tuple(state.shape)}")
    if state.device != logits.device:
        raise ValueError(f"patience_state is on {state.device} but logits are on {logits.device}")
    if not state.is_contiguous():
        raise ValueError("patience_state must be contiguous")


def gather_rows(features: torch.Tensor, index: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Gather the survivors' feature maps: ``features[index]`` along dim 0.

    Args:
        features: [K, ...] any dtype, contiguous or channels_last.
        index: [M] int64 local indices (M <= K), on the same device.

    Returns:
        [M, ...], channels_last when ``features`` is.
    """
    if not isinstance(features, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("features and index must be torch.Tensors")
    if features.dim() < 1:
        raise ValueError("features must have a batch dimension (rank >= 1)")
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(f"index must be a 1-D int64 tensor, got {index.dtype} of rank {index.dim()}")
    if index.device != features.device:
        raise ValueError(f"index is on {index.device} but features are on {features.device}")
    k = features.shape[0]
    if index.numel() and bool(((index < 0) | (index >= k)).any()):  # one read-back on a GPU
        raise ValueError(f"index must be in [0, {k}), got {index[(index < 0) | (index >= k)][:3].tolist()}")
    return implementation(resolve_backend(backend, features.device))[1](features, index)
