"""Which implementations of the exit op exist in this process, and which one serves a device.

Four implementations, one argument order (that of :data:`~branchynet.ops._library.EXIT_STEP_SCHEMA`):

============  =====================================  ======================================
backend       where it runs                           what it is
============  =====================================  ======================================
``cuda``      CUDA, from the compiled ``branchynet._C`` fused CUDA C++ kernel
``triton``    CUDA (CPU only under TRITON_INTERPRET)  fused Triton kernel
``cpp``       CPU, from the compiled ``branchynet._C`` fused C++ loop (one pass, no temporaries)
``torch``     any device                              the reference, and the fallback
============  =====================================  ======================================

``"auto"`` is the implementation the dispatcher runs for the device (``cuda > triton >
torch`` on a GPU, ``cpp > torch`` on the CPU), once it has passed the first-use check
(:mod:`branchynet.ops._verify`). A missing extension or Triton is a fallback (logged at
debug level), never an error, unless the backend is asked for by name.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from typing import Callable, NamedTuple

import torch

from .. import _build
from ..config import PATIENCE_ID
from . import _library, _verify
from ._torch import exit_step_torch, gather_rows_torch

log = logging.getLogger("branchynet.ops")

BACKENDS = ("cuda", "triton", "cpp", "torch")

# The compiled extension registers its kernels on import: the ahead-of-time branchynet._C,
# or a cached just-in-time build. A missing one is built on first use (ensure_extension),
# not at import: `branchynet build` and BRANCHYNET_JIT=0 must be able to come first.
EXT, EXT_ERROR = _build.load_extension(build_if_missing=False)
_EXT_TRIED = False
# Held for the whole (minute-long) build: another thread asking for the backends meanwhile
# waits for it instead of seeing no extension and settling on torch for good.
_EXT_LOCK = threading.Lock()

TRITON = None
TRITON_ERROR: str | None = None
try:
    from ..kernels import exit_step as TRITON  # type: ignore[no-redef]
except Exception as err:
    TRITON_ERROR = f"{type(err).__name__}: {err}"
    log.debug("Triton kernels not available (%s); the triton backend is off", TRITON_ERROR)


def ensure_extension() -> None:
    """Build the extension just in time if it is missing, once per process; then attach
    the Triton kernels to CUDA if the extension brought no CUDA kernels."""
    global EXT, EXT_ERROR, _EXT_TRIED
    if _EXT_TRIED:
        return
    with _EXT_LOCK:
        if _EXT_TRIED:
            return
        if EXT is None:
            EXT, EXT_ERROR = _build.load_extension(build_if_missing=True)
        if EXT is None:
            log.debug("branchynet._C not available (%s); the cuda and cpp backends are off", EXT_ERROR)
        if TRITON is not None and not ext_has_cuda():
            _library.register_triton_for_cuda(TRITON)
        _EXT_TRIED = True  # only once the load or build is over


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def ext_has_cuda() -> bool:
    return EXT is not None and bool(EXT.has_cuda())


def available_backends(device: torch.device | str) -> list:
    """Backends that can run the exit op on ``device``, fastest first."""
    ensure_extension()
    dev = torch.device(device)
    out = []
    if dev.type == "cuda" and ext_has_cuda():
        out.append("cuda")
    if TRITON is not None and (dev.type == "cuda" or (dev.type == "cpu" and triton_interpret())):
        out.append("triton")
    if dev.type == "cpu" and EXT is not None:
        out.append("cpp")
    out.append("torch")
    return out


def dispatched_backend(device: torch.device) -> str:
    """The implementation ``torch.ops.branchynet.exit_step`` runs for ``device``."""
    if device.type == "cuda":
        return "cuda" if ext_has_cuda() else ("triton" if TRITON is not None else "torch")
    return "cpp" if device.type == "cpu" and EXT is not None else "torch"


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` into a concrete backend for ``device``; refuse unavailable ones.

    ``auto`` never picks Triton on the CPU: the interpreter is for tests, not speed.
    The first use of a fused backend on a device runs a quick check against the
    reference (:mod:`branchynet.ops._verify`); a backend that fails it is skipped with
    a warning, named or not (``BRANCHYNET_VERIFY=0`` turns the check off).
    """
    dev = torch.device(device)
    if backend == "auto":
        for b in available_backends(dev):
            if b == "triton" and dev.type != "cuda":
                continue
            if _verify.passes(b, dev):  # first use on this device: checked against torch
                return _note_unchecked_triton(b, dev)
        return "torch"  # pragma: no cover - torch is always available
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in available_backends(dev):
        why = {
            "cuda": EXT_ERROR or "the extension was built without CUDA or the device is not CUDA",
            "cpp": EXT_ERROR or "the C++ kernels run on CPU tensors",
            "triton": TRITON_ERROR or "Triton runs on CUDA devices (on the CPU only with TRITON_INTERPRET=1)",
        }.get(backend, "")
        raise RuntimeError(f"backend={backend!r} is not available on device {dev}: {why}")
    if not _verify.passes(backend, dev):  # warned once; the next backend that passes
        return resolve_backend("auto", dev)
    return _note_unchecked_triton(backend, dev)


_TRITON_WARNED = False


def _note_unchecked_triton(backend: str, dev: torch.device) -> str:
    """One warning per process when the Triton kernels go to a GPU under a Triton whose
    compiled kernels were never checked for spills: they are correct (checked against
    the reference on first use) but their speed is unmeasured."""
    global _TRITON_WARNED
    if backend == "triton" and dev.type == "cuda" and not TRITON.triton_checked() and not _TRITON_WARNED:
        _TRITON_WARNED = True
        import triton

        warnings.warn(
            f"Triton {triton.__version__} is outside the versions branchynet's kernels were checked "
            f"with ({', '.join(TRITON.CHECKED_TRITON)}): the answers are checked against the reference, "
            "but registers and spills are not; `TRITON_INTERPRET=0 python -m branchynet.kernels.aot` "
            "compiles them for sm_90 and reports spills", RuntimeWarning, stacklevel=3)
    return backend


def implementation(backend: str):
    """``(exit_step, gather_rows)`` of a resolved backend, without argument checks.

    ``exit_step`` takes the op's arguments in its order: ``(logits, rows, threshold,
    exit_index, out_logits, out_pred, out_exit, out_entropy, criterion=0, last=False,
    patience_state=None)``
    with the criterion as its integer id, and returns ``(survivors, survivor_rows,
    count [1])``. The compiled backends are the dispatcher op (which runs their kernels
    on their devices); ``torch`` and ``triton`` are their Python functions, so that an
    override runs what it names on any device.
    """
    if backend in ("cuda", "cpp"):
        return torch.ops.branchynet.exit_step.default, torch.ops.branchynet.gather_rows.default
    if backend == "triton":
        return TRITON.exit_step_triton, TRITON.gather_rows_triton
    if backend == "torch":
        return exit_step_torch, gather_rows_torch
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class ExitOp(NamedTuple):
    """The exit op bound to one backend, for a loop that calls it once per exit.

    ``step(logits, rows, threshold, exit_index, out, criterion, last)`` is the op in its
    argument order with the four output buffers (and, for the patience criterion, its
    state as a fifth) as one list ``out``: an empty list is filled with new buffers of K
    rows (the first exit, whose rows are 0..K-1). It returns
    ``(survivors, survivor_rows, count)``, ``count`` an int or a [1] tensor (``int()``
    of it is the one host read-back per exit). No argument checks: the caller makes
    the buffers. ``traceable`` is the same op as torch.compile can trace it (the
    dispatcher op, with a fake), or None where the dispatcher would run another
    implementation on that device (an override): then the caller keeps it out of graphs.
    """

    backend: str
    step: Callable
    gather: Callable
    traceable: Callable | None


def new_outputs(b: int, c: int, dtype: torch.dtype, device: torch.device, patience: bool = False) -> list:
    """The exit op's four output buffers for B rows, uninitialised: logits [B, C] of
    ``dtype``, pred and exit [B] int64, entropy [B] float32; with ``patience`` a fifth,
    the patience state [B, 2] int64 (:func:`new_patience_state`)."""
    out = [torch.empty(b, c, dtype=dtype, device=device),
           torch.empty(b, dtype=torch.int64, device=device),
           torch.empty(b, dtype=torch.int64, device=device),
           torch.empty(b, dtype=torch.float32, device=device)]
    if patience:
        out.append(new_patience_state(b, device))
    return out


def new_patience_state(b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The patience criterion's per-row state for B rows: [B, 2] int64 (previous exit's
    prediction, streak), uninitialised: exit 0 writes every row without reading it."""
    return torch.empty(b, 2, dtype=torch.int64, device=device)


def _generic_step(exit_step):
    # ``out`` holds the four output buffers, and the patience state as a fifth under the
    # patience criterion (the op's last argument).
    def step(logits, rows, threshold, exit_index, out, criterion, last):
        if not out:
            out += new_outputs(logits.shape[0], logits.shape[1], logits.dtype, logits.device,
                               criterion == PATIENCE_ID)
        return exit_step(logits, rows, threshold, exit_index, *out[:4], criterion=criterion, last=last,
                         patience_state=out[4] if len(out) == 5 else None)
    return step


def _cpp_step(direct, fallback):
    # The C++ kernel without the dispatcher, allocating the first exit's buffers itself
    # and returning the count as an int: ~8 us less per B = 1 call than the dispatcher
    # path (schema parsing, four allocations from Python, a count tensor), a tenth of
    # the engine's budget there. A trace (torch.compile of a caller) sees the op instead.
    is_compiling = torch.compiler.is_compiling

    def step(logits, rows, threshold, exit_index, out, criterion, last):
        if is_compiling():
            return fallback(logits, rows, threshold, exit_index, out, criterion, last)
        if not out and criterion == PATIENCE_ID:  # the state too: allocated here, not by the extension
            out += new_outputs(logits.shape[0], logits.shape[1], logits.dtype, logits.device, True)
        if out:
            return direct(logits, rows, threshold, exit_index, *out[:4], criterion, last, *out[4:])
        survivors, survivor_rows, count, *new = direct(
            logits, rows, threshold, exit_index, None, None, None, None, criterion, last)
        out += new
        return survivors, survivor_rows, count
    return step


def bound(backend: str, device: torch.device) -> ExitOp:
    """:class:`ExitOp` of a resolved backend on ``device`` (not checked: see
    :func:`branchynet.ops.bind`)."""
    exit_step, gather = implementation(backend)
    step = _generic_step(exit_step)
    direct = getattr(EXT, "exit_step_direct", None) if backend == "cpp" else None
    if direct is not None:
        step = _cpp_step(direct, step)
    traceable = torch.ops.branchynet.exit_step.default if backend == dispatched_backend(device) else None
    return ExitOp(backend, step, gather, traceable)


def _triton_status() -> str:
    if TRITON is None:
        return f"not available ({TRITON_ERROR})"
    import triton

    checked = "checked" if TRITON.triton_checked() else "NOT among the checked " + "/".join(TRITON.CHECKED_TRITON)
    return f"available (Triton {triton.__version__}, {checked})"


def status() -> dict:
    """What is built and importable, for ``branchynet info``."""
    ensure_extension()
    return {
        "extension": "loaded" if EXT is not None else f"not available ({EXT_ERROR})",
        "extension_cuda": ext_has_cuda(),
        "extension_cpu": EXT is not None,
        "triton_kernels": _triton_status(),
        "auto_cpu": resolve_backend("auto", "cpu"),
        "auto_cuda": resolve_backend("auto", "cuda") if torch.cuda.is_available() else None,
    }


if EXT is not None:
    ensure_extension()
