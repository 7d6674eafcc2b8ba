"""The exit op and the survivor gather, with backend dispatch.

One op, four backends:

============  =====================================  ======================================
backend       where it runs                           what it is
============  =====================================  ======================================
``torch``     any device                              reference and fallback
``triton``    CUDA (CPU only under TRITON_INTERPRET)  fused Triton kernel
``cuda``      CUDA, from the compiled ``branchynet._C`` fused CUDA C++ kernel
``cpp``       CPU, from the compiled ``branchynet._C`` fused C++ loop (one pass, no
                                                      temporaries; 0.88-6.2x the torch path
                                                      in benchmarks/results/cpu-epyc-2core/report.md)
============  =====================================  ======================================

``backend="auto"`` picks ``cuda > triton > torch`` on a CUDA device and ``cpp > torch``
on the CPU. A missing
extension or Triton is a fallback (logged at debug level), never an error, unless the
backend is asked for by name.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import torch

from .. import _build
from ..config import criterion_id
from ..exits import _check_logits
from . import _verify
from ._fake import register as _register_fakes
from ._torch import exit_step_torch, gather_rows_torch

__all__ = [
    "exit_step",
    "gather_rows",
    "available_backends",
    "resolve_backend",
    "backend_status",
    "kernels",
    "BACKENDS",
]

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "triton", "cpp", "torch")

# --- optional backends -----------------------------------------------------------------

# The compiled extension registers torch.ops.branchynet.* on import: the ahead-of-time
# branchynet._C, or a cached just-in-time build. A missing one is built on first use
# (_ensure_ext), not at import: `branchynet build` and BRANCHYNET_JIT=0 must come first.
_EXT, _EXT_ERROR = _build.load_extension(build_if_missing=False)
_EXT_TRIED = False
# Held for the whole (minute-long) build: another thread asking for the backends meanwhile
# waits for it instead of seeing no extension and settling on torch for good.
_EXT_LOCK = threading.Lock()


def _ensure_ext() -> None:
    """Build the extension just in time if it is missing; once per process."""
    global _EXT, _EXT_ERROR, _EXT_TRIED
    if _EXT_TRIED:
        return
    with _EXT_LOCK:
        if _EXT_TRIED:
            return
        if _EXT is None:
            _EXT, _EXT_ERROR = _build.load_extension(build_if_missing=True)
        if _EXT is not None:
            _register_fakes()  # shapes for torch.compile / FakeTensor tracing of the compiled ops
        else:
            log.debug("branchynet._C not available (%s); the cuda and cpp backends are off", _EXT_ERROR)
        _EXT_TRIED = True  # only once the load or build is over


if _EXT is not None:
    _ensure_ext()

_TRITON = None
_TRITON_ERROR: str | None = None
try:
    from ..kernels import exit_step as _TRITON  # type: ignore[no-redef]
except Exception as err:
    _TRITON_ERROR = f"{type(err).__name__}: {err}"
    log.debug("Triton kernels not available (%s); the triton backend is off", _TRITON_ERROR)


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _ext_has_cuda() -> bool:
    return _EXT is not None and bool(_EXT.has_cuda())


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run the exit op on ``device``, fastest first."""
    _ensure_ext()
    dev = torch.device(device)
    out = []
    if dev.type == "cuda" and _ext_has_cuda():
        out.append("cuda")
    if _TRITON is not None and (dev.type == "cuda" or (dev.type == "cpu" and _triton_interpret())):
        out.append("triton")
    if dev.type == "cpu" and _EXT is not None:
        out.append("cpp")
    out.append("torch")
    return out


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device``; refuse unavailable ones.

    ``auto`` never picks Triton on the CPU: the interpreter is for tests, not speed.
    The first use of a fused backend on a device runs a quick check against the torch
    reference (:mod:`branchynet.ops._verify`); a backend that fails it is skipped with
    a warning, named or not (``BRANCHYNET_VERIFY=0`` turns the check off).
    """
    dev = torch.device(device)
    if backend == "auto":
        for b in available_backends(dev):
            if b == "triton" and dev.type != "cuda":
                continue
            if _verify.passes(b, dev):  # first use on this device: checked against torch
                return b
        return "torch"  # pragma: no cover - torch is always available
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in available_backends(dev):
        why = {
            "cuda": _EXT_ERROR or "the extension was built without CUDA or the device is not CUDA",
            "cpp": _EXT_ERROR or "the C++ kernels run on CPU tensors",
            "triton": _TRITON_ERROR or "Triton runs on CUDA devices (on the CPU only with TRITON_INTERPRET=1)",
        }.get(backend, "")
        raise RuntimeError(f"backend={backend!r} is not available on device {dev}: {why}")
    if not _verify.passes(backend, dev):  # warned once; the next backend that passes
        return resolve_backend("auto", dev)
    return backend


def backend_status() -> dict:
    """What is built and importable, for ``branchynet info``."""
    _ensure_ext()
    return {
        "extension": "loaded" if _EXT is not None else f"not available ({_EXT_ERROR})",
        "extension_cuda": _ext_has_cuda(),
        "extension_cpu": _EXT is not None,
        "triton_kernels": "available" if _TRITON is not None else f"not available ({_TRITON_ERROR})",
        "auto_cpu": resolve_backend("auto", "cpu"),
        "auto_cuda": resolve_backend("auto", "cuda") if torch.cuda.is_available() else None,
    }


# --- the op ----------------------------------------------------------------------------

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
    # out-of-bounds write in Triton: refuse it here, on every device (one read-back).
    if k and bool(((rows < 0) | (rows >= b)).any()):
        bad = rows[(rows < 0) | (rows >= b)][:3].tolist()
        raise ValueError(f"rows must index the B = {b} rows of the output buffers, got {bad}")
    if isinstance(threshold, torch.Tensor):
        if threshold.numel() != 1:
            raise ValueError(f"threshold must be one number, got a tensor of shape {tuple(threshold.shape)}")
        threshold = threshold.item()
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a number, got {type(threshold).__name__}")
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0 and not NaN, got {threshold}")
    return float(threshold)


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
):
    """One exit point: decide, write the exiting rows, compact the survivors.

    For each of the K rows still in flight: softmax with a stable max, entropy (fp32
    accumulation), the criterion's score, argmax, and the test ``score < threshold``
    (every row leaves when ``last``). A leaving row ``i`` writes its logits, prediction,
    ``exit_index`` and entropy into the output buffers at row ``rows[i]`` of the original
    batch; the other rows of the buffers are left untouched.

    Args:
        logits: [K, C] fp32/fp16/bf16, this exit's logits for the rows in flight.
        rows: [K] int64, original batch row of each of the K rows (unique), in
            ``[0, B)``: checked here (one host read-back on a GPU; the engine's unchecked
            path, :func:`kernels`, skips it).
        threshold: T >= 0 for this exit (ignored when ``last``).
        exit_index: 0-based index of this exit, written to ``out_exit``.
        out_logits: [B, C] contiguous, same dtype as ``logits``.
        out_pred, out_exit: [B] int64. out_entropy: [B] float32.
        criterion: ``"entropy"`` (the paper's), ``"max_prob"`` or ``"margin"``.
        last: the final exit, which takes every remaining row.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``(survivors [K] int64, survivor_rows [K] int64, count [1] int64)``, all on the
        device: the first ``count`` entries of ``survivors`` are the local indices (into
        the K rows) of the rows that stay, and of ``survivor_rows`` their original rows;
        the entries past ``count`` are unspecified. The order of the survivors is
        unspecified for the fused kernels (the torch backend keeps input order).
    """
    threshold = _check_exit_args(logits, rows, threshold, out_logits, out_pred, out_exit, out_entropy)
    cid = criterion_id(criterion)
    be = resolve_backend(backend, logits.device)
    if logits.dtype == torch.float64 and be == "triton":
        raise TypeError("backend 'triton' takes float32, float16 or bfloat16 logits, got float64")
    step, _ = kernels(be)
    return step(logits, rows, threshold, cid, int(exit_index), bool(last),
                out_logits, out_pred, out_exit, out_entropy)


def _exit_step_ext(logits, *args):
    return torch.ops.branchynet.exit_step(logits.contiguous(), *args)


def _gather_ext(features, index):
    return torch.ops.branchynet.gather_rows(features, index)


def kernels(backend: str):
    """The unchecked ``(exit_step, gather_rows)`` implementations of a resolved backend.

    For callers that build the op's buffers themselves (the engine): skipping the
    argument checks saves ~25 us per exit, which is a tenth of a B-LeNet sample on a CPU.
    ``exit_step`` takes ``(logits, rows, threshold, criterion_id, exit_index, last,
    out_logits, out_pred, out_exit, out_entropy)``.
    """
    if backend in ("cuda", "cpp"):
        return _exit_step_ext, _gather_ext
    if backend == "triton":
        return _TRITON.exit_step_triton, _TRITON.gather_rows_triton
    if backend == "torch":
        return exit_step_torch, gather_rows_torch
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


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
    return kernels(resolve_backend(backend, features.device))[1](features, index)
