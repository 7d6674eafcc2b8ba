"""First-use check of the fused backends, and the comparison the self-test shares.

The Triton and CUDA kernels are tested here only under the interpreter and by compiling;
they first run on real hardware on the user's machine. So the first time a process
resolves a fused backend (``cuda``, ``triton``, ``cpp``) on a device, this module runs it
once against the PyTorch reference on a few hundred rows (every criterion, a side exit
and the last exit, poisoned output buffers, and the gather): a few milliseconds on a GPU
once the kernels are compiled. On a mismatch (or an exception) it warns once, naming the
backend and the failed check, and :func:`branchynet.ops.resolve_backend` falls back to
the next backend. ``BRANCHYNET_VERIFY=0`` turns the check off.
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import torch

from ..exits import _scores
from ._torch import exit_step_torch, gather_rows_torch

__all__ = ["ENV", "passes", "compare_exit_step", "compare_gather", "compare_bound", "quick_check", "reset"]

#: Environment variable: ``0`` turns the first-use check off.
ENV = "BRANCHYNET_VERIFY"

_RESULTS: dict = {}  # (backend, device) -> None (passed) or the failed check's description
_LOCK = threading.Lock()

_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
             torch.float64: torch.int64}
POISON = {"pred": -7, "exit": -9, "entropy": -3.0}


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
    if backend == "torch" or os.environ.get(ENV, "1").strip() == "0":
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


def poisoned_buffers(b: int, c: int, dtype, device, *, strided: bool = False):
    """Output buffers full of values no kernel writes (NaN logits, negative ids): a write
    to a row that did not leave, or a missing write, shows. ``strided``: the per-row
    outputs are every other element of a wider buffer."""
    def vec(fill, dt):
        if strided:
            return torch.full((b, 2), fill, dtype=dt, device=device)[:, 0]
        return torch.full((b,), fill, dtype=dt, device=device)

    return (torch.full((b, c), float("nan"), dtype=dtype, device=device), vec(POISON["pred"], torch.int64),
            vec(POISON["exit"], torch.int64), vec(POISON["entropy"], torch.float32))


def gap_threshold(logits: torch.Tensor, criterion: int) -> float:
    """A threshold in the widest gap of the middle half of the reference scores: about
    half the rows leave, and none sits within fp32 rounding of it. A positive threshold
    when every score is equal (C = 1), so every finite row leaves."""
    score = _scores(logits.detach().cpu(), criterion)[0].double()
    s = score[torch.isfinite(score)].unique().sort().values
    if s.numel() == 0:
        return 0.5
    if s.numel() == 1:
        return float(s[0]) + 0.25
    lo, hi = s.numel() // 4, max(s.numel() * 3 // 4, s.numel() // 4 + 1)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    i = lo + int(gaps.argmax())
    return float((s[i] + s[i + 1]) / 2)


def compare_exit_step(step, logits, rows, b, threshold, criterion, exit_index, last, *, strided=False):
    """Run ``step`` (an unchecked exit-op implementation) and the reference on the same
    inputs and poisoned buffers. Returns ``(failure or None, worst entropy error)``."""
    k, c = logits.shape
    dev = logits.device
    want = poisoned_buffers(b, c, logits.dtype, dev, strided=strided)
    got = poisoned_buffers(b, c, logits.dtype, dev, strided=strided)
    r_surv, _, r_count = exit_step_torch(logits, rows, threshold, exit_index, *want, criterion, last)
    g_surv, g_rows, g_count = step(logits, rows, threshold, exit_index, *got, criterion=criterion, last=last)
    n = int(r_count)
    if int(g_count) != n:
        return f"survivor count {int(g_count)}, reference {n}", math.inf
    if not torch.equal(g_surv[:n].sort().values, r_surv[:n].sort().values):
        return "survivors differ", math.inf
    if not torch.equal(g_rows[:n], rows[g_surv[:n]]):
        return "survivor_rows do not match the survivors", math.inf
    if not torch.equal(got[2], want[2]):
        bad = int((got[2] != want[2]).sum())
        return f"exit index differs at {bad} of {b} rows (rows written that should not be, or missed)", math.inf
    if not torch.equal(got[1], want[1]):
        return f"pred differs at {int((got[1] != want[1]).sum())} rows", math.inf
    iv = _INT_VIEW[logits.dtype]
    if not torch.equal(got[0].view(iv), want[0].view(iv)):
        return "logits not copied bit for bit", math.inf
    ge, we = got[3].double(), want[3].double()
    nan_g, nan_w = torch.isnan(ge), torch.isnan(we)
    if not torch.equal(nan_g, nan_w):
        return "NaN entropies differ", math.inf
    diff = (ge - we).abs()[~nan_w]
    err = float(diff.max()) if diff.numel() else 0.0
    # fp32 accumulation (the GPU kernels) against the reference's float64.
    tol = 1e-9 if logits.dtype == torch.float64 else 2e-5
    if bool((diff > tol + tol * we[~nan_w].abs()).any()):
        return f"entropy off by {err:.3g}", err
    return None, err


def compare_gather(gather, features: torch.Tensor, index: torch.Tensor):
    """``(failure or None, 0.0)``: the gather must equal ``index_select`` bit for bit,
    with the reference's layout."""
    got = gather(features, index)
    want = gather_rows_torch(features, index)
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"gather shape/dtype {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}", math.inf
    if index.numel() > 1 and got.stride() != want.stride():
        return f"gather strides {got.stride()}, want {want.stride()}", math.inf
    if got.dtype.is_floating_point:
        got, want = got.view(_INT_VIEW.get(got.dtype, torch.int16)), want.view(_INT_VIEW.get(want.dtype, torch.int16))
    if not torch.equal(got, want):
        return "gathered rows differ", math.inf
    return None, 0.0


def _check_logits(k: int, c: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + c)
    z = torch.randn(k, c, generator=g) * (torch.rand(k, 1, generator=g) * 8 + 0.05)
    z[0, :] = 0.0                   # flat row: ties, first index wins
    z[1, c // 2] = float("nan")     # NaN row: NaN entropy, never leaves early
    z[2, :] = -30.0
    z[2, 3] = 30.0                  # confident: tiny entropy and scores
    return z.to(device)


def compare_bound(step, logits: torch.Tensor, criterion: int, threshold: float) -> str | None:
    """The engine's use of the bound op (:func:`branchynet.ops.bind`: its own entry
    where there is one; outputs allocated at the first exit, filled in at the last)
    against the reference on the same two exits. None, or what differs."""
    k, c = logits.shape
    rows = torch.arange(k, device=logits.device)
    got = []
    surv, s_rows, n = step(logits, rows, threshold, 0, got, criterion, False)
    want = poisoned_buffers(k, c, logits.dtype, logits.device)
    r_surv, r_rows, r_count = exit_step_torch(logits, rows, threshold, 0, *want, criterion, False)
    if int(n) != int(r_count):
        return f"survivor count {int(n)}, reference {int(r_count)}"
    n = int(n)
    if not torch.equal(surv[:n].sort().values, r_surv[:n].sort().values):
        return "survivors differ"
    last = torch.flip(logits, (1,)) * 0.5  # the last branch's logits, one row per sample
    step(last[s_rows[:n]], s_rows[:n], 0.0, 1, got, criterion, True)
    exit_step_torch(last[r_rows[:n]], r_rows[:n], 0.0, 1, *want, criterion, True)
    for i, what in ((2, "exit index"), (1, "pred")):
        if not torch.equal(got[i], want[i]):
            return f"{what} differs at {int((got[i] != want[i]).sum())} of {k} rows"
    if not torch.equal(got[0].view(_INT_VIEW[logits.dtype]), want[0].view(_INT_VIEW[logits.dtype])):
        return "logits not copied bit for bit"
    if not torch.allclose(got[3].double(), want[3].double(), rtol=2e-5, atol=2e-5, equal_nan=True):
        return "entropy differs"
    return None


def quick_check(backend: str, device: torch.device) -> str | None:
    """One pass of the backend against the reference: None, or the failed check."""
    from . import _backends

    try:
        step, gather = _backends.implementation(backend)
        logits = _check_logits(300, 10, device)
        b = 310
        rows = torch.randperm(b, generator=torch.Generator().manual_seed(0))[:300].to(device)
        for crit, name in enumerate(("entropy", "max_prob", "margin")):
            t = gap_threshold(logits, crit)
            for last in (False, True):
                failure, _ = compare_exit_step(step, logits, rows, b, t, crit, 1, last)
                if failure is not None:
                    return f"exit_step, {name}, {'last' if last else 'side'} exit, 300 x 10 fp32: {failure}"
        feats = torch.randn(300, 4, 3, 3, generator=torch.Generator().manual_seed(1)).to(device)
        feats = feats.contiguous(memory_format=torch.channels_last)
        failure, _ = compare_gather(gather, feats, rows.remainder(300).flip(0)[:150])
        if failure is not None:
            return f"gather_rows, 150 of 300 channels_last rows: {failure}"
        # The engine's entry (the bound op: for cpp, the extension's own, beside the op).
        failure = compare_bound(_backends.bound(backend, device).step, logits, 0, gap_threshold(logits, 0))
        if failure is not None:
            return f"the bound op (the engine's), two exits, 300 x 10 fp32: {failure}"
    except Exception as err:  # a kernel that cannot run is as unusable as a wrong one
        return f"raised {type(err).__name__}: {err}"
    return None
