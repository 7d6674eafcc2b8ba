"""First-use check of the fused backends.

The Triton and CUDA kernels are tested here only under the interpreter and by compiling;
they first run on real hardware on the user's machine. So the first time a process
resolves a fused backend (``cuda``, ``triton``, ``cpp``) on a device, this module runs it
once against the PyTorch reference on a few hundred rows (every criterion, a side exit
and the last exit, poisoned output buffers, and the gather): a few milliseconds on a GPU
once the kernels are compiled. On a mismatch (or an exception) it warns once, naming the
backend and the failed check, and :func:`branchynet.ops.resolve_backend` falls back to
the next backend. ``BRANCHYNET_VERIFY=0`` turns the check off.

The samples, buffers and comparisons are the verification harness's
(:mod:`branchynet.testing`), the ones the tests and ``branchynet selftest`` use.
"""

from __future__ import annotations

import threading
import warnings

import torch

from .._build import env_flag

__all__ = ["ENV", "passes", "compare_exit_step", "compare_gather", "compare_bound", "quick_check", "reset"]

#: Environment variable: ``0`` turns the first-use check off.
ENV = "BRANCHYNET_VERIFY"

_RESULTS: dict = {}  # (backend, device) -> None (passed) or the failed check's description
_LOCK = threading.Lock()

#: The check's sample: K = 300 rows of C = 10 out of B = 310, fp32, with the harness's
#: special rows (flat, NaN, confident, one-hot at +-1e4).
_K, _C, _B = 300, 10, 310

# The comparisons moved to the harness; these names stay importable from here.
_MOVED = ("compare_exit_step", "compare_gather", "compare_bound", "gap_threshold", "poisoned_buffers", "POISON")


def __getattr__(name):
    if name in _MOVED:
        from .. import testing

        return getattr(testing, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _device_key(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def reset() -> None:
    """Forget every result (tests; a process that changed its kernels)."""
    with _LOCK:
        _RESULTS.clear()


def passes(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` gave the reference's answers on ``device`` in this process
    (checked on the first call, then remembered). ``torch`` is the reference itself."""
    if backend == "torch" or not env_flag(ENV, default=True):
        return True
    if torch.compiler.is_compiling():  # never run (or trace) the check inside a graph
        return True
    key = (backend, _device_key(torch.device(device)))
    with _LOCK:
        if key not in _RESULTS:
            failure = quick_check(backend, key[1])
            _RESULTS[key] = failure
            if failure is not None:
                warnings.warn(
                    f"branchynet: the {backend!r} exit-op backend failed its first-use check on "
                    f"{key[1]} ({failure}); falling back to the next backend. `branchynet selftest` "
                    f"runs the full check; {ENV}=0 turns this one off.", RuntimeWarning, stacklevel=3)
        return _RESULTS[key] is None


def quick_check(backend: str, device: torch.device) -> str | None:
    """One pass of the backend against the reference: None, or the failed check."""
    from .. import testing
    from ..config import OP_CRITERIA, PATIENCE_ID
    from . import _backends

    try:
        # The implementation itself, without the public op's checks and backend
        # resolution (which would come back here).
        step, gather = _backends.implementation(backend)
        logits = testing.sample_logits(_K, _C, torch.float32, device, seed=1000 + _C, special=True)
        rows = testing.sample_rows(_K, _B, device, seed=0)
        for crit, name in enumerate(OP_CRITERIA):
            t = testing.gap_threshold(logits, crit)
            for last in (False, True):
                failure = testing.compare_exit_step(step, logits, rows, _B, t, crit, 1, last).failure
                if failure is not None:
                    return f"exit_step, {name}, {'last' if last else 'side'} exit, {_K} x {_C} fp32: {failure}"
        feats = torch.randn(_K, 4, 3, 3, generator=torch.Generator().manual_seed(1)).to(device)
        feats = feats.contiguous(memory_format=torch.channels_last)
        failure = testing.compare_gather(gather, feats, rows.remainder(_K).flip(0)[:_K // 2])
        if failure is not None:
            return f"gather_rows, {_K // 2} of {_K} channels_last rows: {failure}"
        # The engine's entry: the bound op (for cpp, the extension's own, beside the op).
        bound = _backends.bound(backend, torch.device(device))
        for crit in (0, PATIENCE_ID):
            failure = testing.compare_bound(bound.step, logits, crit, testing.gap_threshold(logits, crit))
            if failure is not None:
                return f"the bound op (the engine's), two exits, {OP_CRITERIA[crit]}, {_K} x {_C} fp32: {failure}"
    except Exception as err:  # a kernel that cannot run is as unusable as a wrong one
        return f"raised {type(err).__name__}: {err}"
    return None
